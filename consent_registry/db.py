"""Engines and sessions from a URL passed in, and schema migrations.

SQLite is tuned for durability (WAL with synchronous=FULL: a commit is on disk
when it returns) and for a CLI that runs beside ``cgw serve`` (busy timeout).
PostgreSQL migrations take an advisory lock so that several instances starting
at once do not race.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# The newest migration; tests check it against Alembic's own idea of the head.
# Kept here so that every CLI command need not load Alembic to check the schema.
HEAD_REVISION = "0006"
_MIGRATION_LOCK_KEY = 0x63677721  # "cgw!": any constant shared by all instances


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite parent directories are created."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=8
        )
        event.listen(engine, "connect", _tune_sqlite)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)


def _tune_sqlite(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    from alembic import command

    config = _alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def schema_is_current(engine: Engine) -> bool:
    """True when the database is at the newest migration."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return False
        current = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return current == HEAD_REVISION


def alembic_head() -> str | None:
    """The newest revision among the migration files (for the test of HEAD_REVISION)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def driver_error(exc: BaseException) -> tuple[str, str]:
    """The database driver's error behind a SQLAlchemy one: its type name and
    the first line of its message, for errors told in one line."""
    cause = getattr(exc, "orig", None) or exc
    return type(cause).__name__, (str(cause).splitlines() or [""])[0]


_SQLITE_WRITERS: weakref.WeakKeyDictionary[Engine, WriterTurn] = weakref.WeakKeyDictionary()
_SQLITE_WRITERS_GUARD = threading.Lock()


# How long a writer waits for the turn, as SQLite's busy timeout (``_tune_sqlite``).
TURN_WAIT_SECONDS = 30.0


class WriterTurn:
    """The turn to write to one SQLite file, among threads and processes.

    SQLite has one writer at a time; a second one waits in its busy handler,
    which sleeps in steps of up to 100 ms and does not wake when the lock is
    free. With a dozen threads writing (intake, delivery results, audit),
    those sleeps made the gateway wait far more than it worked (p99 0.8 s at
    40 messages/s). Writers take turns on locks instead, which hand over at
    once: a re-entrant lock among this process's threads and, for the
    outermost holder, ``flock`` on ``<database>.write-lock`` among processes
    (several ``cgw serve`` workers, the CLI). The kernel drops a ``flock``
    when its process dies, so a killed writer never leaves the turn taken.
    """

    def __init__(self, lock_path: Path | None) -> None:
        self._threads = threading.RLock()
        self._path = lock_path
        self._fd: int | None = None
        self._depth = 0

    def __enter__(self) -> WriterTurn:
        self._threads.acquire()
        try:
            if self._depth == 0 and self._path is not None:
                self._take(self._open(self._path))
            self._depth += 1
        except BaseException:
            self._threads.release()
            raise
        return self

    def _open(self, path: Path) -> int:
        if self._fd is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.geteuid() == 0:  # root's CLI must not lock out the gateway's user
                database = path.with_name(path.name.removesuffix(".write-lock"))
                with suppress(FileNotFoundError):
                    owner = database.stat()
                    os.fchown(fd, owner.st_uid, owner.st_gid)
            self._fd = fd
        return self._fd

    @staticmethod
    def _take(fd: int) -> None:
        """``flock``, polled with growing pauses up to ``TURN_WAIT_SECONDS``, as
        SQLite's busy timeout would: a writer that never lets go (a CLI stopped
        with Ctrl-Z mid-transaction) then costs 451s, not a gateway that hangs."""
        pause = 0.0002
        deadline = time.monotonic() + TURN_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    locked = sqlite3.OperationalError("database is locked (the write turn)")
                    raise OperationalError("flock", None, locked) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.002)

    def __exit__(self, *_: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._threads.release()

    def __del__(self) -> None:  # with its engine: tests and the CLI make many
        if self._fd is not None:
            os.close(self._fd)


def write_turn(engine: Engine) -> AbstractContextManager[object]:
    """The turn to write to a SQLite database (no-op for PostgreSQL): see ``WriterTurn``."""
    if engine.dialect.name != "sqlite":
        return nullcontext()
    with _SQLITE_WRITERS_GUARD:
        turn = _SQLITE_WRITERS.get(engine)
        if turn is None:
            database = engine.url.database
            in_file = bool(database) and database != ":memory:"
            lock_path = Path(f"{database}.write-lock") if in_file else None
            turn = _SQLITE_WRITERS[engine] = WriterTurn(lock_path)
    return turn


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    with write_turn(engine), Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
