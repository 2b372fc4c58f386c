"""cases.priority: STAT or routine, set when the case is created

Revision ID: b1c2d3e4f5a7
Revises: a9b8c7d6e5f4
Create Date: 2026-12-04 18:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'b1c2d3e4f5a7'
down_revision = 'a9b8c7d6e5f4'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('cases') as batch:
        batch.add_column(sa.Column('priority', sa.String(length=10), nullable=False, server_default='routine'))


def downgrade() -> None:
    with op.batch_alter_table('cases') as batch:
        batch.drop_column('priority')
