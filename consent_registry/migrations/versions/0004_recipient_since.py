"""queue recipients record when their current stay began (queued, released, held)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queue_recipient") as batch:
        batch.add_column(sa.Column("since", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE queue_recipient SET since = "
        "(SELECT received_at FROM queue_message WHERE queue_message.id = queue_recipient.message_id)"
    )
    with op.batch_alter_table("queue_recipient") as batch:
        batch.alter_column("since", existing_type=sa.DateTime(timezone=True), nullable=False)
        batch.create_index("ix_queue_recipient_held", ["state", "since"])


def downgrade() -> None:
    with op.batch_alter_table("queue_recipient") as batch:
        batch.drop_index("ix_queue_recipient_held")
        batch.drop_column("since")
