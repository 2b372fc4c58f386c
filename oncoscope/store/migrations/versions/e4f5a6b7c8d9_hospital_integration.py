"""hospital integration: cases filed by DICOM study and LIS order, the DICOM inbox, deliveries

Revision ID: e4f5a6b7c8d9
Revises: d3e4f5a6b7c8
Create Date: 2026-12-04 23:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'e4f5a6b7c8d9'
down_revision = 'd3e4f5a6b7c8'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dicom_study_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("accession_number", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("placer_order", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("placer_app", sa.String(length=64), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("order_info", sa.JSON(), nullable=True))
        batch_op.create_unique_constraint("uq_cases_dicom_study_uid", ["dicom_study_uid"])
        batch_op.create_unique_constraint("uq_cases_placer_order", ["placer_order", "placer_app"])
        batch_op.create_index("ix_cases_accession_number", ["accession_number"], unique=False)
    op.create_table(
        "dicom_inbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.Integer(), nullable=True),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("body_part", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=255), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("resolved_at", sa.DateTime(), nullable=True),
        sa.Column("resolved_by_id", sa.Integer(), nullable=True),
        sa.Column("case_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["patient_id"], ["patients.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["resolved_by_id"], ["users.id"]),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_dicom_inbox_open", "dicom_inbox", ["resolved_at", "study_uid"])
    op.create_index("ix_dicom_inbox_patient_id", "dicom_inbox", ["patient_id"])
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("review_version", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("case_id", "review_version", "kind", "target", name="uq_delivery"),
    )
    op.create_index("ix_deliveries_due", "deliveries", ["status", "next_attempt_at"])
    op.create_index("ix_deliveries_case_id", "deliveries", ["case_id"])


def downgrade() -> None:
    op.drop_table("deliveries")  # (with their indexes: MariaDB refuses to drop one a foreign key uses)
    op.drop_table("dicom_inbox")
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_index("ix_cases_accession_number")
        batch_op.drop_constraint("uq_cases_dicom_study_uid", type_="unique")
        batch_op.drop_constraint("uq_cases_placer_order", type_="unique")
        batch_op.drop_column("order_info")
        batch_op.drop_column("placer_app")
        batch_op.drop_column("placer_order")
        batch_op.drop_column("accession_number")
        batch_op.drop_column("dicom_study_uid")
