"""Group commit: several transactions per commit, none lost or spoiled by another."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from consent_registry.db import make_engine
from consent_registry.writes import DirectWrites, GroupCommit


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE marker (n INTEGER PRIMARY KEY)"))
    yield engine
    engine.dispose()


def _insert(n: int) -> Callable[[Session], int]:
    def work(session: Session) -> int:
        session.execute(text("INSERT INTO marker (n) VALUES (:n)"), {"n": n})
        return id(session)

    return work


def _stored(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        return [row.n for row in connection.execute(text("SELECT n FROM marker ORDER BY n"))]


def _held_writer(writes: GroupCommit) -> tuple[threading.Event, Future[None]]:
    """Keep the writer busy until the event is set, so that what follows queues up."""
    entered, release = threading.Event(), threading.Event()

    def wait(_session: Session) -> None:
        entered.set()
        release.wait(30)

    busy = writes.submit(wait)
    assert entered.wait(30)
    return release, busy


def test_transactions_submitted_while_the_writer_commits_share_one_commit(
    engine: Engine,
) -> None:
    writes = GroupCommit(engine)
    try:
        release, busy = _held_writer(writes)
        waiting = [writes.submit(_insert(n)) for n in range(5)]
        assert not any(f.done() for f in waiting)
        release.set()
        busy.result(30)
        sessions = {f.result(30) for f in waiting}
        assert len(sessions) == 1  # one session: one transaction, one commit
        assert _stored(engine) == [0, 1, 2, 3, 4]
    finally:
        writes.close()


def test_a_failing_transaction_fails_alone_and_leaves_nothing(engine: Engine) -> None:
    writes = GroupCommit(engine)
    try:
        release, _ = _held_writer(writes)
        before = writes.submit(_insert(1))
        duplicate = writes.submit(_insert(1))
        after = writes.submit(_insert(2))

        def half_then_fail(session: Session) -> None:
            session.execute(text("INSERT INTO marker (n) VALUES (3)"))
            raise ValueError("the work itself failed")

        failing = writes.submit(half_then_fail)
        release.set()
        before.result(30)
        after.result(30)
        with pytest.raises(IntegrityError):
            duplicate.result(30)
        with pytest.raises(ValueError, match="the work itself failed"):
            failing.result(30)
        assert _stored(engine) == [1, 2]  # 3 was rolled back with its transaction
    finally:
        writes.close()


def test_a_failed_commit_fails_the_whole_group_and_runs_nothing_again(engine: Engine) -> None:
    writes = GroupCommit(engine)
    try:
        release, _ = _held_writer(writes)
        runs: list[int] = []

        def counted(n: int) -> Callable[[Session], int]:
            def work(session: Session) -> int:
                runs.append(n)
                return _insert(n)(session)

            return work

        def commit_fails(session: Session) -> None:
            def refuse(_session: Session) -> None:
                raise OSError("the disk went away during COMMIT")

            event.listen(session, "before_commit", refuse, once=True)

        group = [writes.submit(counted(1)), writes.submit(commit_fails), writes.submit(counted(2))]
        release.set()
        for member in group:
            with pytest.raises(OSError, match="during COMMIT"):
                member.result(30)
        assert runs == [1, 2]  # not run again on their own: the commit's outcome is unknown
        assert _stored(engine) == []
    finally:
        writes.close()


def test_close_commits_what_was_submitted_and_refuses_more(engine: Engine) -> None:
    writes = GroupCommit(engine)
    release, _ = _held_writer(writes)
    pending = [writes.submit(_insert(n)) for n in range(3)]
    release.set()
    writes.close()
    assert all(f.done() for f in pending)
    assert _stored(engine) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="closed"):
        writes.submit(_insert(9))


def test_direct_writes_commit_in_the_callers_thread(engine: Engine) -> None:
    caller = threading.get_ident()
    ran_in = DirectWrites(engine).run(lambda _session: threading.get_ident())
    assert ran_in == caller
    DirectWrites(engine).run(_insert(7))
    assert _stored(engine) == [7]
