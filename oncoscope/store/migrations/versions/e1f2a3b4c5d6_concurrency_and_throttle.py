"""case revision (conditional sign/upload), shared sign-in throttle, idempotency records re-check access

Revision ID: e1f2a3b4c5d6
Revises: d7e8f9a0b1c2
Create Date: 2026-12-02 18:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'e1f2a3b4c5d6'
down_revision = 'd7e8f9a0b1c2'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('cases') as batch:
        batch.add_column(sa.Column('revision', sa.Integer(), nullable=False, server_default='0'))
    op.create_table('login_throttle',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('locked_until', sa.DateTime(), nullable=True),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_index('ix_login_throttle_updated', 'login_throttle', ['updated_at'], unique=False)
    # the per-account counters move to login_throttle (one mechanism for every address)
    with op.batch_alter_table('users') as batch:
        batch.drop_column('failed_logins')
        batch.drop_column('locked_until')
    with op.batch_alter_table('idempotency_records') as batch:
        batch.add_column(sa.Column('patient_id', sa.Integer(), nullable=True))
        batch.create_index('ix_idempotency_created', ['created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('idempotency_records') as batch:
        batch.drop_index('ix_idempotency_created')
        batch.drop_column('patient_id')
    with op.batch_alter_table('users') as batch:
        batch.add_column(sa.Column('failed_logins', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('locked_until', sa.DateTime(), nullable=True))
    op.drop_index('ix_login_throttle_updated', table_name='login_throttle')
    op.drop_table('login_throttle')
    with op.batch_alter_table('cases') as batch:
        batch.drop_column('revision')
