"""a generation counter that triggers move on every change to the registry

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25

The gateway caches registry facts while the counter stands still. SQLite
runs its triggers per row, PostgreSQL per statement. A later migration that
recreates one of these tables on SQLite (batch_alter_table) must create its
triggers again.
"""
from alembic import op
import sqlalchemy as sa

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

REGISTRY_TABLES = (
    "user_account",
    "user_address",
    "patient",
    "patient_address",
    "relationship",
    "consent",
    "recipient_certificate",
)
_BUMP = "UPDATE registry_generation SET value = value + 1 WHERE id = 1"


def upgrade() -> None:
    op.create_table(
        "registry_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("INSERT INTO registry_generation (id, value) VALUES (1, 0)")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            # The schema the migration ran in, whatever a writer's search_path.
            "CREATE FUNCTION cgw_registry_changed() RETURNS trigger LANGUAGE plpgsql "
            f"SET search_path FROM CURRENT AS $$ BEGIN {_BUMP}; RETURN NULL; END $$"
        )
        for table in REGISTRY_TABLES:
            op.execute(
                f"CREATE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
                f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION cgw_registry_changed()"
            )
        return
    for table in REGISTRY_TABLES:
        for event in ("INSERT", "UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_{event.lower()}_changed AFTER {event} ON {table} "
                f"BEGIN {_BUMP}; END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in REGISTRY_TABLES:
            op.execute(f"DROP TRIGGER {table}_changed ON {table}")
        op.execute("DROP FUNCTION cgw_registry_changed()")
    else:
        for table in REGISTRY_TABLES:
            for event in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER {table}_{event}_changed")
    op.drop_table("registry_generation")
