"""A spool for tests that need one without a whole gateway: files in a
directory, inline copies in a SQLite database beside it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from consent_registry.db import make_engine, migrate, session_scope
from gateway.crypto_at_rest import StorageKey
from gateway.spool import INLINE_LIMIT, FileSpool, Spool, store_inline


def file_spool(directory: Path, key: StorageKey, inline_limit: int = INLINE_LIMIT) -> FileSpool:
    FileSpool.prepare(directory)
    engine = make_engine(f"sqlite:///{directory.parent / (directory.name + '.db')}")
    migrate(engine)
    return FileSpool(directory, key, engine, inline_limit)


def store(spool: Spool, message_id: str, content: bytes) -> None:
    """A whole message stored as intake stores one (a file, or a committed row)."""
    with spool.batch() as batch, session_scope(spool.engine) as session:
        writer = spool.writer(message_id)
        writer.write(content)
        batch.adopt(writer)
        store_inline(session, batch.inline, datetime.now(UTC))
