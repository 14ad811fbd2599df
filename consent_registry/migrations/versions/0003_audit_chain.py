"""audit entries form an HMAC chain: one head row holds the newest number and hash

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""
from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=True),
        sa.Column("mac", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    # Entries written before the chain existed keep a NULL hash; verify reports them.
    op.execute(
        "INSERT INTO audit_head (id, seq, hash) "
        "SELECT 1, COALESCE(MAX(seq), 0), NULL FROM audit_event"
    )
    del head


def downgrade() -> None:
    op.drop_table("audit_head")
