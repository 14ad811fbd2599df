"""Group commit: several transactions per commit, none lost or spoiled by another;
and the writer process that commits for several worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import cast

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from consent_registry import writes
from consent_registry.db import make_engine
from consent_registry.writes import (
    DirectWrites,
    GroupCommit,
    RemoteWrites,
    WriterGone,
    serve_writes,
)


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


def test_a_wait_given_up_before_its_commit_does_not_stop_the_writer(engine: Engine) -> None:
    writes = GroupCommit(engine)
    try:
        release, _busy = _held_writer(writes)
        given_up = writes.submit(_insert(1))  # e.g. a delivery cancelled at shutdown
        assert given_up.cancel()
        release.set()
        writes.submit(_insert(2)).result(30)  # the writer thread is still there
        assert _stored(engine) == [1, 2]  # the commit stands though nobody waits for it
    finally:
        writes.close()


def test_direct_writes_commit_in_the_callers_thread(engine: Engine) -> None:
    caller = threading.get_ident()
    ran_in = DirectWrites(engine).run(lambda _session: threading.get_ident())
    assert ran_in == caller
    DirectWrites(engine).run(_insert(7))
    assert _stored(engine) == [7]


@dataclass(frozen=True)
class Insert:
    """A transaction as the gateway sends one to the writer process: a value that pickles."""

    n: int

    def __call__(self, session: Session) -> int:
        session.execute(text("INSERT INTO marker (n) VALUES (:n)"), {"n": self.n})
        return self.n * 10


class _Clients(list[RemoteWrites]):
    """The clients of one test, and the event loop (of its own thread) they read on."""

    def __init__(self, clients: list[RemoteWrites], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(clients)
        self.loop = loop


@contextlib.contextmanager
def _remote_writes(connections: list[socket.socket]) -> Iterator[_Clients]:
    """A ``RemoteWrites`` per connection, reading its replies on an event loop
    of its own thread, as a worker's do on the worker's loop; closed at the end."""
    loop = asyncio.new_event_loop()
    clients = _Clients([RemoteWrites(connection, loop) for connection in connections], loop)
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        yield clients
    finally:
        for client in clients:
            asyncio.run_coroutine_threadsafe(client.close(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@contextlib.contextmanager
def _writer_service(engine: Engine, count: int) -> Iterator[_Clients]:
    """``serve_writes`` in a thread, as the writer process runs it, with ``count`` clients."""
    pairs = [socket.socketpair() for _ in range(count)]
    service = threading.Thread(target=serve_writes, args=(engine, [p[1] for p in pairs]))
    service.start()
    try:
        with _remote_writes([p[0] for p in pairs]) as clients:
            yield clients
    finally:
        service.join(30)
        assert not service.is_alive(), "serve_writes did not end when its clients closed"


def test_remote_writes_from_two_processes_commit_and_answer_each(engine: Engine) -> None:
    with _writer_service(engine, 2) as (first, second):
        futures = [first.submit(Insert(n)) for n in range(0, 20, 2)]
        futures += [second.submit(Insert(n)) for n in range(1, 20, 2)]
        results = sorted(f.result(30) for f in futures)
        with pytest.raises(IntegrityError):  # the exception itself crosses back
            second.run(Insert(3))
        assert first.run(Insert(40)) == 400  # and the connection goes on
    assert results == [n * 10 for n in range(20)]
    assert _stored(engine) == [*range(20), 40]


def test_commit_on_the_loop_is_settled_there_and_a_wait_given_up_stops_nothing(
    engine: Engine,
) -> None:
    with _writer_service(engine, 1) as clients:
        (client,) = clients

        async def scenario() -> tuple[list[int], list[dict[str, object]]]:
            faults: list[dict[str, object]] = []
            asyncio.get_running_loop().set_exception_handler(lambda _loop, c: faults.append(c))
            given_up = asyncio.ensure_future(client.commit(Insert(1)))
            await asyncio.sleep(0)  # sent; its reply is still to come
            given_up.cancel()
            return [await client.commit(Insert(2)), await client.commit(Insert(3))], faults

        results, faults = asyncio.run_coroutine_threadsafe(scenario(), clients.loop).result(30)
    assert results == [20, 30]
    assert faults == []  # the reply for the abandoned wait was dropped, not raised
    assert _stored(engine) == [1, 2, 3]


def test_work_that_does_not_pickle_fails_at_the_caller_and_nothing_is_sent(
    engine: Engine,
) -> None:
    with _writer_service(engine, 1) as (client,):
        with pytest.raises((pickle.PicklingError, AttributeError)):
            client.submit(_insert(1))  # a closure: only a value can cross
        assert client.run(Insert(2)) == 20
    assert _stored(engine) == [2]


def test_a_writer_that_is_gone_fails_what_waits_and_what_follows(engine: Engine) -> None:
    ours, theirs = socket.socketpair()
    with _remote_writes([ours]) as (client,):
        waiting = client.submit(Insert(1))
        theirs.close()  # the writer process died before it answered
        with pytest.raises(WriterGone):
            waiting.result(30)
        with pytest.raises(WriterGone):
            client.submit(Insert(2))
    assert _stored(engine) == []


@dataclass(frozen=True)
class InsertWithPayload(Insert):
    """A request larger than one read of the writer (an inline-spooled message is up to 64 kB)."""

    payload: bytes = b""


def test_requests_split_over_reads_or_sharing_one_arrive_whole(engine: Engine) -> None:
    """The writer reads up to 1 MiB at a time: a frame may end in a later read,
    and one read may hold several frames and the start of the next."""
    ours, theirs = socket.socketpair()
    service = threading.Thread(target=serve_writes, args=(engine, [theirs]))
    service.start()
    try:
        with _remote_writes([ours]) as (client,):
            big = InsertWithPayload(1, b"x" * (3 << 20))  # three reads at least
            small = [Insert(n) for n in range(2, 6)]
            futures = [client.submit(big)] + [client.submit(w) for w in small]
            assert [f.result(30) for f in futures] == [10, 20, 30, 40, 50]
    finally:
        service.join(30)
    assert _stored(engine) == [1, 2, 3, 4, 5]


def _frames_on(connection: socket.socket) -> list[tuple[int, object]]:
    """The requests a client sent on ``connection`` so far, in one read: (number, work)."""
    data = connection.recv(1 << 20, socket.MSG_DONTWAIT)
    frames = []
    while data:
        size = int.from_bytes(data[:4], "big")
        frames.append(pickle.loads(data[4 : 4 + size]))
        data = data[4 + size :]
    return frames


def _reply(connection: socket.socket, number: int, value: object) -> None:
    data = pickle.dumps((number, True, value))
    connection.sendall(len(data).to_bytes(4, "big") + data)


def test_a_deferrable_commit_waits_for_the_next_send_and_goes_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(writes, "DEFER_SECONDS", 60.0)  # only the next send can take it
    ours, theirs = socket.socketpair()
    with _remote_writes([ours]) as clients:
        (client,) = clients

        async def scenario() -> list[int]:
            held = asyncio.ensure_future(client.commit(Insert(1), deferrable=True))
            await asyncio.sleep(0)
            with pytest.raises(BlockingIOError):  # held back: nothing was sent
                theirs.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
            urgent = asyncio.ensure_future(client.commit(Insert(2)))
            await asyncio.sleep(0)
            sent = _frames_on(theirs)  # both, in one send, in submission order
            assert [work for _, work in sent] == [Insert(1), Insert(2)]
            for number, work in sent:
                _reply(theirs, number, cast(Insert, work).n * 10)
            return [await held, await urgent]

        assert asyncio.run_coroutine_threadsafe(scenario(), clients.loop).result(30) == [10, 20]
    theirs.close()


def test_a_deferrable_commit_alone_is_sent_after_a_moment(engine: Engine) -> None:
    with _writer_service(engine, 1) as clients:
        (client,) = clients
        done = asyncio.run_coroutine_threadsafe(
            client.commit(Insert(1), deferrable=True), clients.loop
        )
        assert done.result(30) == 10
    assert _stored(engine) == [1]


def test_closing_sends_what_is_held_and_waits_for_its_reply(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writes, "DEFER_SECONDS", 60.0)
    with _writer_service(engine, 1) as clients:
        (client,) = clients

        async def scenario() -> int:
            held = asyncio.ensure_future(client.commit(Insert(1), deferrable=True))
            await asyncio.sleep(0)
            await client.close()
            return await held

        assert asyncio.run_coroutine_threadsafe(scenario(), clients.loop).result(30) == 10
    assert _stored(engine) == [1]


def test_a_writer_gone_fails_a_held_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writes, "DEFER_SECONDS", 60.0)
    ours, theirs = socket.socketpair()
    with _remote_writes([ours]) as clients:
        (client,) = clients
        held = asyncio.run_coroutine_threadsafe(
            client.commit(Insert(1), deferrable=True), clients.loop
        )
        theirs.close()  # the writer process died; the held frame never left
        with pytest.raises(WriterGone):
            held.result(30)
