"""codec_models: the archive keeps the file of every model its bitstreams were written with.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 20:05:00
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows are filled by the daemon, not here: a migration must not depend on which models are
    # installed (the daemon keeps those its bitstreams name at start, see nicd.store.kept_models).
    op.create_table('codec_models',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('model_id', sa.String(length=200), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.Column('kept_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('sha256', name=op.f('pk_codec_models'))
    )


def downgrade() -> None:
    op.drop_table('codec_models')
