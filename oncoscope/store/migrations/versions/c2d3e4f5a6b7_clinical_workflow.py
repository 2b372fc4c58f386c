"""Clinical workflow: readings, report transitions, consults, second-reader policy, site settings;
cases.ai_flag / ready_at / cancel_reason, reviews' second reader, images' pixel spacing

Revision ID: c2d3e4f5a6b7
Revises: b1c2d3e4f5a7
Create Date: 2026-12-04 20:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'c2d3e4f5a6b7'
down_revision = 'b1c2d3e4f5a7'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('cases') as batch:
        batch.add_column(sa.Column('ai_flag', sa.Boolean(), nullable=True))
        batch.add_column(sa.Column('ready_at', sa.DateTime(), nullable=True))
        batch.add_column(sa.Column('cancel_reason', sa.Text(), nullable=False, server_default=''))
    with op.batch_alter_table('case_images') as batch:
        batch.add_column(sa.Column('pixel_spacing', sa.JSON(), nullable=True))
    with op.batch_alter_table('reviews') as batch:
        batch.add_column(sa.Column('second_reader_id', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('second_diagnosis', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('second_agrees', sa.Boolean(), nullable=True))
        batch.add_column(sa.Column('second_read_at', sa.DateTime(), nullable=True))
        batch.create_foreign_key('fk_reviews_second_reader', 'users', ['second_reader_id'], ['id'])
    op.create_table(
        'readings',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('case_id', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('diagnosis', sa.String(length=64), nullable=False),
        sa.Column('comment', sa.Text(), nullable=False),
        sa.Column('override_reason', sa.Text(), nullable=False),
        sa.Column('uncertainty_note', sa.Text(), nullable=False),
        sa.Column('revision', sa.Integer(), nullable=False),
        sa.Column('ai_call', sa.JSON(), nullable=True),
        sa.Column('differential', sa.JSON(), nullable=True),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.Column('current', sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(['case_id'], ['cases.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['user_id'], ['users.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_readings_case', 'readings', ['case_id', 'kind'])
    op.create_table(
        'case_transitions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('case_id', sa.Integer(), nullable=False),
        sa.Column('from_state', sa.String(length=20), nullable=False),
        sa.Column('to_state', sa.String(length=20), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=True),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.Column('note', sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(['case_id'], ['cases.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['user_id'], ['users.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index(op.f('ix_case_transitions_case_id'), 'case_transitions', ['case_id'])
    op.create_table(
        'consults',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('case_id', sa.Integer(), nullable=False),
        sa.Column('asked_by_id', sa.Integer(), nullable=False),
        sa.Column('consultant_id', sa.Integer(), nullable=True),
        sa.Column('question', sa.Text(), nullable=False),
        sa.Column('image_id', sa.Integer(), nullable=True),
        sa.Column('region', sa.JSON(), nullable=True),
        sa.Column('cell_ids', sa.JSON(), nullable=True),
        sa.Column('status', sa.String(length=10), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('closed_at', sa.DateTime(), nullable=True),
        sa.Column('closed_by_id', sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(['case_id'], ['cases.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['asked_by_id'], ['users.id']),
        sa.ForeignKeyConstraint(['consultant_id'], ['users.id']),
        sa.ForeignKeyConstraint(['closed_by_id'], ['users.id']),
        sa.ForeignKeyConstraint(['image_id'], ['case_images.id'], ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index(op.f('ix_consults_case_id'), 'consults', ['case_id'])
    op.create_index('ix_consults_open', 'consults', ['status', 'consultant_id'])
    op.create_table(
        'consult_messages',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('consult_id', sa.Integer(), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['consult_id'], ['consults.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['user_id'], ['users.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index(op.f('ix_consult_messages_consult_id'), 'consult_messages', ['consult_id'])
    op.create_table(
        'analyzer_policies',
        sa.Column('analyzer_id', sa.String(length=64), nullable=False),
        sa.Column('second_reader', sa.String(length=16), nullable=False),
        sa.Column('updated_by_id', sa.Integer(), nullable=True),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['updated_by_id'], ['users.id']),
        sa.PrimaryKeyConstraint('analyzer_id'),
    )
    op.create_table(
        'site_settings',
        sa.Column('key', sa.String(length=64), nullable=False),
        sa.Column('value', sa.JSON(), nullable=False),
        sa.Column('updated_by_id', sa.Integer(), nullable=True),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['updated_by_id'], ['users.id']),
        sa.PrimaryKeyConstraint('key'),
    )
    op.create_index('ix_cases_worklist', 'cases', ['status', 'priority', 'created_at'])


def downgrade() -> None:
    op.drop_index('ix_cases_worklist', table_name='cases')
    for t in ('site_settings', 'analyzer_policies', 'consult_messages', 'consults', 'case_transitions', 'readings'):
        op.drop_table(t)
    with op.batch_alter_table('reviews') as batch:
        batch.drop_constraint('fk_reviews_second_reader', type_='foreignkey')
        for c in ('second_read_at', 'second_agrees', 'second_diagnosis', 'second_reader_id'):
            batch.drop_column(c)
    with op.batch_alter_table('case_images') as batch:
        batch.drop_column('pixel_spacing')
    with op.batch_alter_table('cases') as batch:
        for c in ('cancel_reason', 'ready_at', 'ai_flag'):
            batch.drop_column(c)
