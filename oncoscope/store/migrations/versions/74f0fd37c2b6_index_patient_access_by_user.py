"""index patient access by user

Revision ID: 74f0fd37c2b6
Revises: be07c4e7575e
Create Date: 2026-11-22 06:18:28.848957
"""
from alembic import op
import sqlalchemy as sa


revision = '74f0fd37c2b6'
down_revision = 'be07c4e7575e'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("patient_access", schema=None) as batch_op:
        batch_op.create_index("ix_patient_access_user", ["user_id", "patient_id"], unique=False)
    bind = op.get_bind()
    if bind.dialect.name in ("mysql", "mariadb"):
        # A downgrade (below) leaves this plain foreign-key index behind; ours covers user_id, so
        # drop it again: otherwise a downgrade + upgrade leaves a schema that differs from the models.
        names = {ix["name"] for ix in sa.inspect(bind).get_indexes("patient_access")}
        if "ix_patient_access_user_fk" in names:
            op.drop_index("ix_patient_access_user_fk", table_name="patient_access")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name in ("mysql", "mariadb"):
        # MariaDB dropped its implicit foreign-key index when ours was created; the foreign key
        # on user_id needs some index, so make sure a plain one exists before dropping ours.
        names = {ix["name"] for ix in sa.inspect(bind).get_indexes("patient_access")}
        if "ix_patient_access_user_fk" not in names:
            op.create_index("ix_patient_access_user_fk", "patient_access", ["user_id"])
    with op.batch_alter_table("patient_access", schema=None) as batch_op:
        batch_op.drop_index("ix_patient_access_user")
