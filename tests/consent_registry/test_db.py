"""The schema: migrations on SQLite and PostgreSQL, and times that stay UTC."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import inspect, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.types import TypeDecorator
from sqlmodel import Session

from consent_registry import db
from consent_registry.db import (
    HEAD_REVISION,
    alembic_head,
    make_engine,
    migrate,
    schema_is_current,
    session_scope,
    write_turn,
)
from consent_registry.models import AuditEvent, UTCDateTime

EXPECTED_TABLES = {
    "user_account",
    "user_address",
    "patient",
    "patient_address",
    "relationship",
    "consent",
    "recipient_certificate",
    "queue_message",
    "queue_recipient",
    "audit_event",
    "audit_head",
    "registry_generation",
}


@pytest.mark.usefixtures("blank_database")
def test_migrations_create_every_table_and_are_idempotent(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert not schema_is_current(engine)
        migrate(engine)
        migrate(engine)  # a second run (a restart, a second instance) changes nothing
        assert schema_is_current(engine)
        assert set(inspect(engine).get_table_names()) >= EXPECTED_TABLES
    finally:
        engine.dispose()


def test_times_are_stored_in_utc_and_read_back_aware(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate(engine)
    berlin = timezone(timedelta(hours=1))
    written = datetime(2026, 3, 29, 1, 30, tzinfo=berlin)
    try:
        with session_scope(engine) as session:
            event = AuditEvent(seq=1, at=written, actor="test", action="test.event")
            session.add(event)
            session.flush()
            seq = event.seq
        with Session(engine) as session:
            read = session.get(AuditEvent, seq)
            assert read is not None
            assert read.at == written
            assert read.at.tzinfo is not None and read.at.utcoffset() == timedelta(0)
            assert read.at == datetime(2026, 3, 29, 0, 30, tzinfo=UTC)
    finally:
        engine.dispose()


_SQLITE = sqlite.dialect()
_OFFSETS = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))


@given(
    st.datetimes(
        min_value=datetime(2, 1, 1),
        max_value=datetime(9998, 12, 31),
        timezones=st.one_of(st.just(UTC), _OFFSETS),
    )
)
def test_sqlite_stores_the_text_sqlalchemys_own_processors_would(written: datetime) -> None:
    """UTCDateTime binds in one step on SQLite: the stored text, and so every
    comparison in SQL, must stay what the two processors made."""
    column = UTCDateTime().dialect_impl(_SQLITE)
    one_step = column.bind_processor(_SQLITE)
    two_steps = TypeDecorator.bind_processor(column, _SQLITE)
    assert one_step is not None and two_steps is not None
    assert one_step(written) == two_steps(written)
    assert one_step(None) is None
    with pytest.raises(ValueError, match="naive datetimes"):
        one_step(written.replace(tzinfo=None))


def test_naive_datetimes_are_refused(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate(engine)
    try:
        with pytest.raises(Exception, match="naive datetimes"), session_scope(engine) as session:
            session.add(
                AuditEvent(seq=1, at=datetime(2026, 1, 1), actor="test", action="test.event")
            )
            session.flush()
    finally:
        engine.dispose()


def test_head_revision_constant_matches_the_migration_files() -> None:
    assert alembic_head() == HEAD_REVISION


_TRY_THE_TURN = """
import fcntl, sys
with open(sys.argv[1], "a") as lock:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("taken")
    else:
        print("free")
"""


def test_a_sqlite_write_turn_is_held_against_other_processes_and_given_back(
    tmp_path: Path,
) -> None:
    # Several ``cgw serve`` processes (and the CLI) on one SQLite file take
    # turns on flock, so that none waits in SQLite's sleeping busy handler.
    database = tmp_path / "cgw.db"
    engine = make_engine(f"sqlite:///{database}")

    def other_process() -> str:
        lock = f"{database}.write-lock"
        done = subprocess.run(
            [sys.executable, "-c", _TRY_THE_TURN, lock], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    try:
        with write_turn(engine), write_turn(engine):  # re-entrant within a thread
            pass
        with session_scope(engine) as session:
            session.execute(text("CREATE TABLE t (x INTEGER)"))
            nested = other_process()
            with write_turn(engine):
                pass
            still = other_process()  # the inner turn's end is not the outer one's
        assert (nested, still, other_process()) == ("taken", "taken", "free")
    finally:
        engine.dispose()


_HOLD_THE_TURN = """
import fcntl, sys
with open(sys.argv[1], "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    print("holding", flush=True)
    sys.stdin.readline()
"""


def test_a_writer_that_never_lets_go_costs_an_error_after_the_busy_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As SQLite's busy timeout would: a CLI stopped mid-transaction (Ctrl-Z)
    # must cost the gateway errors (451 to clients), not a hang.
    monkeypatch.setattr(db, "TURN_WAIT_SECONDS", 0.3)
    database = tmp_path / "cgw.db"
    engine = make_engine(f"sqlite:///{database}")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_THE_TURN, f"{database}.write-lock"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        with (
            pytest.raises(OperationalError, match="database is locked"),
            session_scope(engine) as session,
        ):
            session.execute(text("CREATE TABLE t (x INTEGER)"))
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
        with session_scope(engine) as session:  # the turn is free again, and so is ours
            session.execute(text("CREATE TABLE t (x INTEGER)"))
    finally:
        holder.kill()
        holder.wait()
        engine.dispose()
