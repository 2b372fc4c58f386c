"""cell review: per-cell AI and verified classes, their change history, the case's WBC count and
the differential frozen with each signed review, an analysed image's measured scale

Revision ID: f2a3b4c5d6e7
Revises: e1f2a3b4c5d6
Create Date: 2026-12-03 15:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'f2a3b4c5d6e7'
down_revision = 'e1f2a3b4c5d6'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'cell_labels',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('case_id', sa.Integer(), nullable=False),
        sa.Column('analysis_id', sa.Integer(), nullable=False),
        sa.Column('cell_index', sa.Integer(), nullable=False),
        sa.Column('ai_class', sa.String(length=32), nullable=False),
        sa.Column('ai_probability', sa.Float(), nullable=True),
        sa.Column('cell_class', sa.String(length=32), nullable=False),
        sa.Column('counted', sa.Boolean(), nullable=False),
        sa.Column('verified', sa.Boolean(), nullable=False),
        sa.Column('changed_by_id', sa.Integer(), nullable=True),
        sa.Column('changed_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['analysis_id'], ['analyses.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['case_id'], ['cases.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['changed_by_id'], ['users.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('analysis_id', 'cell_index', name='uq_cell_label'),
    )
    op.create_index('ix_cell_labels_case_class', 'cell_labels', ['case_id', 'cell_class'])
    op.create_table(
        'cell_changes',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('case_id', sa.Integer(), nullable=False),
        sa.Column('cell_id', sa.Integer(), nullable=False),
        sa.Column('batch', sa.String(length=32), nullable=False),
        sa.Column('from_class', sa.String(length=32), nullable=False),
        sa.Column('from_verified', sa.Boolean(), nullable=False),
        sa.Column('to_class', sa.String(length=32), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.Column('undone', sa.Boolean(), nullable=False),
        sa.Column('undone_by_id', sa.Integer(), nullable=True),
        sa.Column('undone_at', sa.DateTime(), nullable=True),
        sa.Column('signed', sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(['case_id'], ['cases.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['cell_id'], ['cell_labels.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['user_id'], ['users.id']),
        sa.ForeignKeyConstraint(['undone_by_id'], ['users.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_cell_changes_case_id', 'cell_changes', ['case_id'])
    op.create_index('ix_cell_changes_cell_id', 'cell_changes', ['cell_id'])
    op.create_index('ix_cell_changes_batch', 'cell_changes', ['batch'])
    with op.batch_alter_table('cases') as batch:
        batch.add_column(sa.Column('wbc_count', sa.Float(), nullable=True))
    with op.batch_alter_table('reviews') as batch:
        batch.add_column(sa.Column('differential', sa.JSON(), nullable=True))
    with op.batch_alter_table('analyses') as batch:
        batch.add_column(sa.Column('microns_per_pixel', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('analyses') as batch:
        batch.drop_column('microns_per_pixel')
    with op.batch_alter_table('reviews') as batch:
        batch.drop_column('differential')
    with op.batch_alter_table('cases') as batch:
        batch.drop_column('wbc_count')
    op.drop_table('cell_changes')
    op.drop_table('cell_labels')
