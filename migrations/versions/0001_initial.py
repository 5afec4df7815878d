"""Initial schema: contents, files, jobs, bitstreams, events, daemons.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-22 22:24:34.539455
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('contents',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('width', sa.Integer(), nullable=True),
    sa.Column('height', sa.Integer(), nullable=True),
    sa.Column('first_seen', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('sha256', name=op.f('pk_contents'))
    )
    op.create_table('daemons',
    sa.Column('owner', sa.String(length=200), nullable=False),
    sa.Column('host', sa.String(length=200), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.Float(), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('status_text', sa.Text(), nullable=True),
    sa.Column('processed', sa.Integer(), nullable=False),
    sa.Column('bytes_in', sa.BigInteger(), nullable=False),
    sa.Column('observer_restarts', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('owner', name=op.f('pk_daemons'))
    )
    op.create_table('events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('path', sa.Text(), nullable=True),
    sa.Column('content_sha256', sa.String(length=64), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_events'))
    )
    op.create_table('bitstreams',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('content_sha256', sa.String(length=64), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.Column('data_sha256', sa.String(length=64), nullable=False),
    sa.Column('original_format', sa.String(length=16), nullable=True),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('original_bytes', sa.BigInteger(), nullable=False),
    sa.Column('nicd_bytes', sa.BigInteger(), nullable=False),
    sa.Column('bpp', sa.Float(), nullable=False),
    sa.Column('psnr', sa.Float(), nullable=True),
    sa.Column('ssim', sa.Float(), nullable=True),
    sa.Column('ms_ssim', sa.Float(), nullable=True),
    sa.Column('jpeg_bytes_at_equal_ssim', sa.BigInteger(), nullable=True),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('quality', sa.Integer(), nullable=True),
    sa.Column('target_ssim', sa.Float(), nullable=True),
    sa.Column('target_psnr', sa.Float(), nullable=True),
    sa.Column('encode_seconds', sa.Float(), nullable=True),
    sa.Column('decode_seconds', sa.Float(), nullable=True),
    sa.Column('baseline_seconds', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['content_sha256'], ['contents.sha256'], name=op.f('fk_bitstreams_content_sha256_contents')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_bitstreams')),
    sa.UniqueConstraint('content_sha256', name=op.f('uq_bitstreams_content_sha256'))
    )
    op.create_table('files',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('root', sa.Text(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=True),
    sa.Column('mtime_ns', sa.BigInteger(), nullable=True),
    sa.Column('ctime_ns', sa.BigInteger(), nullable=True),
    sa.Column('inode', sa.BigInteger(), nullable=True),
    sa.Column('dev', sa.BigInteger(), nullable=True),
    sa.Column('content_sha256', sa.String(length=64), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('first_seen', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("state IN ('new','hashed','failed','missing','deleted')", name=op.f('ck_files_state')),
    sa.ForeignKeyConstraint(['content_sha256'], ['contents.sha256'], name=op.f('fk_files_content_sha256_contents')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_files')),
    sa.UniqueConstraint('path', name=op.f('uq_files_path'))
    )
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.create_index('ix_files_content_sha256', ['content_sha256'], unique=False)
        batch_op.create_index('ix_files_root_state', ['root', 'state'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('content_sha256', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires_at', sa.Float(), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("state IN ('pending','running','done','failed','skipped')", name=op.f('ck_jobs_state')),
    sa.ForeignKeyConstraint(['content_sha256'], ['contents.sha256'], name=op.f('fk_jobs_content_sha256_contents')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs')),
    sa.UniqueConstraint('content_sha256', name=op.f('uq_jobs_content_sha256'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_state_attempts_id', ['state', 'attempts', 'id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_state_attempts_id')

    op.drop_table('jobs')
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.drop_index('ix_files_root_state')
        batch_op.drop_index('ix_files_content_sha256')

    op.drop_table('files')
    op.drop_table('bitstreams')
    op.drop_table('events')
    op.drop_table('daemons')
    op.drop_table('contents')
