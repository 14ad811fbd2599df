"""queue recipients remember the policy decision (protection, reason, patient, certificate)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queue_recipient") as batch:
        batch.add_column(sa.Column("protection", sa.String(length=16), nullable=False, server_default="none"))
        batch.add_column(sa.Column("reason", sa.String(length=48), nullable=True))
        batch.add_column(sa.Column("patient_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("certificate_id", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("queue_recipient") as batch:
        batch.drop_column("certificate_id")
        batch.drop_column("patient_id")
        batch.drop_column("reason")
        batch.drop_column("protection")
