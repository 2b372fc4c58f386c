"""analyses.enqueued_at: when a job was last handed to the external queue

Revision ID: d7e8f9a0b1c2
Revises: c4a1d2e3f5b6
Create Date: 2026-11-22 11:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'd7e8f9a0b1c2'
down_revision = 'c4a1d2e3f5b6'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('analyses') as batch:
        batch.add_column(sa.Column('enqueued_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('analyses') as batch:
        batch.drop_column('enqueued_at')
