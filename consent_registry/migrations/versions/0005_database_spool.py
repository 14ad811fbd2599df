"""sealed messages can live in the database: the spool of several instances

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "spooled_message",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_spooled_message_stored_at", "spooled_message", ["stored_at"])


def downgrade() -> None:
    op.drop_index("ix_spooled_message_stored_at", table_name="spooled_message")
    op.drop_table("spooled_message")
