"""bitstreams.refine_steps: the latent refinement the encoder was asked for (`codec.refine_steps`).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 04:45:00
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for the bitstreams written before refinement existed: they were not refined.
    with op.batch_alter_table('bitstreams', schema=None) as batch_op:
        batch_op.add_column(sa.Column('refine_steps', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('bitstreams', schema=None) as batch_op:
        batch_op.drop_column('refine_steps')
