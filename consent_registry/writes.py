"""Write transactions: each on its own, or several under one commit.

A gateway under load writes a transaction per accepted message and per
delivery result. Each one took the writer's turn (see ``db.write_turn``),
and a thread holding that turn needs the GIL back after every statement,
while the event loop and the other threads want it too: at 100 messages a
second the turn was held 75-85 % of the time, mostly by threads waiting for
the GIL, and everything else queued behind it.

``GroupCommit`` gives the turn to one writer thread. Transactions submitted
from any thread while it commits are run together, in submission order,
under one commit (one fsync): Postfix's and PostgreSQL's group commit. The
caller still returns only after the commit that holds its transaction, so
"250 means on disk" stands. A transaction that fails must not take the
others down with it: the batch is rolled back and each one is run again on
its own, so only the failing one reports its error. Work handed in must
therefore only touch the session it is given. A COMMIT that fails fails
the whole batch: its outcome may be unknown, and nothing is run twice.

Several worker processes on one SQLite file (``CGW_WORKERS``) share one
writer process instead (``serve_writes``, fed through ``RemoteWrites``).
Each process's own writer thread took the file's write turn in turn, and
held it while waiting for its process's GIL between statements: a
transaction that costs 0.24 ms alone held the turn for about 1.9 ms, and
the turn, busy 80 % of the time, capped the machine. In a process of its
own the writer waits for nothing, and one commit serves every worker. The
work then crosses a socket pair, pickled: it must be a value (a frozen
dataclass with ``__call__``), not a closure.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import pickle
import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from sqlalchemy import Engine
from sqlmodel import Session

from consent_registry.db import session_scope, write_turn

T = TypeVar("T")
log = logging.getLogger(__name__)

# Transactions in one commit at most: enough to absorb a burst, small enough
# that one slow batch does not hold everyone's reply for long.
BATCH_LIMIT = 64

# How long a deferrable transaction may wait to travel to the writer process
# with the next one (``RemoteWrites.commit``).
DEFER_SECONDS = 0.005


class Writes(Protocol):
    def run(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in a write transaction; return once it is committed."""
        ...

    async def commit(self, work: Callable[[Session], T], deferrable: bool = False) -> T:
        """``run`` for the event loop: awaited, never blocking it.

        ``deferrable``: the caller does not mind the transaction starting a
        few milliseconds later (a delivery result, where nobody waits for a
        reply); it may then wait to be sent with the next one.
        """
        ...


class DirectWrites:
    """Each transaction on its own, in the caller's thread (the CLI, tests)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self, work: Callable[[Session], T]) -> T:
        with session_scope(self.engine) as session:
            return work(session)

    async def commit(self, work: Callable[[Session], T], deferrable: bool = False) -> T:
        """Committed before it returns (on the caller's thread, as ``run``)."""
        return self.run(work)


@dataclass
class _Pending:
    work: Callable[[Session], Any]
    done: Future[Any] = field(default_factory=Future)


class GroupCommit:
    """One writer thread committing the transactions of all others, in batches."""

    def __init__(self, engine: Engine, limit: int = BATCH_LIMIT) -> None:
        self.engine = engine
        self.limit = limit
        self._pending: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._guard = threading.Lock()  # nothing is queued behind the stop marker
        self._closed = False
        self._thread = threading.Thread(target=self._write, name="cgw-writer", daemon=True)
        self._thread.start()

    def run(self, work: Callable[[Session], T]) -> T:
        return self.submit(work).result()

    async def commit(self, work: Callable[[Session], T], deferrable: bool = False) -> T:
        return await asyncio.wrap_future(self.submit(work))

    def submit(self, work: Callable[[Session], T]) -> Future[T]:
        """``work``'s result once committed, for callers that must not block."""
        pending = _Pending(work)
        with self._guard:
            if self._closed:
                raise RuntimeError("the writer is closed")
            self._pending.put(pending)
        return pending.done

    def close(self, timeout: float = 30.0) -> None:
        """Commit what was submitted, then end the writer thread.

        A writer stuck in the database for ``timeout`` seconds is left
        behind (it is a daemon thread); what still waits for it is failed,
        so no caller waits for ever.
        """
        with self._guard:
            if self._closed:
                return
            self._closed = True
            self._pending.put(None)
        self._thread.join(timeout)
        while True:
            try:
                left = self._pending.get_nowait()
            except queue.Empty:
                return
            if left is not None:
                _settle(left.done, False, RuntimeError("the writer stopped before this commit"))

    def _write(self) -> None:
        while True:
            first = self._pending.get()
            if first is None:
                return
            batch = [first]
            closing = False
            while len(batch) < self.limit:
                try:
                    more = self._pending.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                batch.append(more)
            try:
                outcomes = commit_batch(self.engine, [pending.work for pending in batch])
            except BaseException as exc:  # never leave a caller waiting
                outcomes = [(False, exc)] * len(batch)
            for pending, (ok, value) in zip(batch, outcomes, strict=True):
                _settle(pending.done, ok, value)
            if closing:
                return


# What one transaction of a batch came to: (True, its result) or (False, its exception).
Outcome = tuple[bool, Any]


def commit_batch(engine: Engine, works: Sequence[Callable[[Session], Any]]) -> list[Outcome]:
    """Run ``works`` under one commit; one by one when one of them fails.

    Only a failure of the work itself (or its flush) sends the batch back
    to be run one by one. A failed COMMIT fails every member instead:
    with PostgreSQL the connection may have dropped after the server
    committed, and running them again could store a message or a result
    twice.
    """
    try:
        if len(works) > 1:
            together = _commit_together(engine, works)
            if together is not None:
                return together
        return [_commit_alone(engine, work) for work in works]
    except Exception as exc:  # before any work ran: e.g. the write turn could not be taken
        return [(False, exc)] * len(works)


def _commit_together(
    engine: Engine, works: Sequence[Callable[[Session], Any]]
) -> list[Outcome] | None:
    with write_turn(engine), Session(engine, expire_on_commit=False) as session:
        try:
            results = [work(session) for work in works]
            session.flush()
        except Exception:
            session.rollback()
            log.warning("a transaction in a group of %d failed; running each alone", len(works))
            return None
        try:
            session.commit()
        except Exception as exc:
            return [(False, exc)] * len(works)
    return [(True, result) for result in results]


def _commit_alone(engine: Engine, work: Callable[[Session], Any]) -> Outcome:
    try:
        with session_scope(engine) as session:
            return (True, work(session))
    except Exception as exc:  # handed to the caller, who raises it
        return (False, exc)


def _settle(future: Future[Any] | asyncio.Future[Any], ok: bool, value: Any) -> None:
    """A commit's outcome to its caller, unless the caller stopped waiting
    (a cancelled wait: the commit stands, its result is not wanted)."""
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


# A frame: its length (4 octets, network order), then a pickle.
_LENGTH = struct.Struct("!I")


# How long a closing worker waits for the writer's last replies (as ``GroupCommit.close``).
REPLIES_DUE_SECONDS = 30.0


class WriterGone(RuntimeError):
    """The writer process closed its end (it stopped, or died)."""


def _frame(item: object) -> bytes:
    data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


class RemoteWrites:
    """Transactions sent to the writer process (``serve_writes``) over a socket.

    ``submit`` and ``run`` (from any thread but the loop's) and ``commit``
    (on the loop) pickle the work and send it; the replies (result or exception) are read
    on the event loop the instance was made on, which hands each to its
    caller's future. (A reader thread of its own woke twice per message,
    waited for the GIL the loop held and handed each reply back through
    ``call_soon_threadsafe``; measured, the loop reading them costs a worker
    a few per cent less CPU per message.) ``commit`` waits on a future of
    the loop's own, which the reply settles directly: no thread-safe
    future, no wake-up of the loop by itself. A deferrable ``commit`` is
    held for up to ``DEFER_SECONDS`` and sent with the next transaction
    (in submission order): each send wakes the writer process, which then
    takes a core from the SMTP sessions; delivery results sent on their
    own were a third of those wake-ups (measured: 1.75 -> 1.2 a message,
    about 5 % less CPU a message over all processes at 4 KB). When the writer is gone,
    what waits fails with ``WriterGone``, and so does every later
    submission: the caller answers 451, never 250.
    """

    def __init__(self, connection: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        """Call it on ``loop``'s thread, or before ``loop`` runs."""
        self._connection = connection
        self._loop = loop
        self._sending = threading.Lock()
        self._guard = threading.Lock()  # _pending and _gone
        self._pending: dict[int, Future[Any] | asyncio.Future[Any]] = {}
        self._gone = False
        self._ids = itertools.count()
        self._replies = _Frames(connection)
        self._ended: asyncio.Future[None] = loop.create_future()  # the writer closed its end
        self._deferred: list[bytes] = []  # frames waiting for the next send (under _sending)
        self._deferred_send: asyncio.TimerHandle | None = None  # the latest they go
        loop.add_reader(connection, self._receive)

    def submit(self, work: Callable[[Session], T]) -> Future[T]:
        """``work``'s result once committed, for a thread other than the loop's."""
        done: Future[T] = Future()
        self._send(work, done)
        return done

    def run(self, work: Callable[[Session], T]) -> T:
        return self.submit(work).result()

    async def commit(self, work: Callable[[Session], T], deferrable: bool = False) -> T:
        """On the instance's loop (a future of another loop's cannot be awaited)."""
        done: asyncio.Future[T] = self._loop.create_future()
        self._send(work, done, deferrable)
        return await done

    def _send(
        self,
        work: Callable[[Session], T],
        future: Future[T] | asyncio.Future[T],
        deferrable: bool = False,
    ) -> None:
        with self._guard:
            if self._gone:
                raise WriterGone("the writer process is gone")
            request = next(self._ids)
            self._pending[request] = future
        try:
            data = _frame((request, work))
            with self._sending:
                if deferrable:
                    self._defer(data)
                    return
                if self._deferred:  # they were submitted first: they go first
                    data = b"".join([*self._deferred, data])
                    self._deferred.clear()
                self._connection.sendall(data)
        except BaseException as exc:
            with self._guard:
                self._pending.pop(request, None)
            if isinstance(exc, OSError):
                raise WriterGone(f"the writer process is gone: {exc}") from exc
            raise

    def _defer(self, frame: bytes) -> None:
        """Hold ``frame`` for the next send, or ``DEFER_SECONDS`` at most (on the loop)."""
        self._deferred.append(frame)
        if self._deferred_send is None or self._deferred_send.cancelled():
            self._deferred_send = self._loop.call_later(DEFER_SECONDS, self._send_deferred)

    def _send_deferred(self) -> None:
        """The held frames, when no other send took them along in time."""
        self._deferred_send = None
        with self._sending:
            data = b"".join(self._deferred)
            self._deferred.clear()
            try:
                if data:
                    self._connection.sendall(data)
            except OSError:
                gone = True
            else:
                gone = False
        if gone:  # what waits for the writer is failed
            self._stop_reading()

    async def close(self) -> None:
        """Send nothing more; wait (up to ``REPLIES_DUE_SECONDS``) for the
        replies still due (on the instance's loop)."""
        if self._deferred_send is not None:
            self._deferred_send.cancel()
        self._send_deferred()
        with self._sending, contextlib.suppress(OSError):
            self._connection.shutdown(socket.SHUT_WR)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REPLIES_DUE_SECONDS):
                await asyncio.shield(self._ended)
        self._stop_reading()

    def _receive(self) -> None:
        for request, ok, value in self._replies.receive():
            with self._guard:
                future = self._pending.pop(request)
            _settle(future, ok, value)
        if not self._replies.open:
            self._stop_reading()

    def _stop_reading(self) -> None:
        if self._deferred_send is not None:
            self._deferred_send.cancel()
        with self._sending:
            self._deferred.clear()  # their callers are failed below, with the rest
        if self._connection.fileno() != -1:
            self._loop.remove_reader(self._connection)
            self._connection.close()
        if not self._ended.done():
            self._ended.set_result(None)
        with self._guard:
            self._gone = True
            pending, self._pending = self._pending, {}
        for future in pending.values():
            _settle(future, False, WriterGone("the writer process stopped before this commit"))


def serve_writes(
    engine: Engine, connections: Sequence[socket.socket], limit: int = BATCH_LIMIT
) -> None:
    """Commit what arrives over ``connections`` until each is closed (blocking).

    One thread does it all: it takes every request that has arrived on any
    connection, commits them together (``commit_batch``), sends each
    connection its replies, and starts over. With a thread to read each
    connection, one to commit and one to send replies, the hand-overs
    between them (futex wake-ups, the GIL passed around) cost the writer
    about as much as the SQL did.
    """
    with selectors.DefaultSelector() as selector:
        for connection in connections:
            selector.register(connection, selectors.EVENT_READ, _Frames(connection))
        waiting: collections.deque[tuple[_Frames, int, Any]] = collections.deque()
        ended: list[_Frames] = []  # the other end closed; replies may still be due
        while selector.get_map() or waiting:
            if selector.get_map():  # block only when nothing waits to be committed
                for key, _ in selector.select(0 if waiting else None):
                    source: _Frames = key.data
                    waiting.extend((source, number, work) for number, work in source.receive())
                    if not source.open:
                        selector.unregister(source.connection)
                        ended.append(source)
            batch = [waiting.popleft() for _ in range(min(limit, len(waiting)))]
            if batch:
                outcomes = commit_batch(engine, [work for _, _, work in batch])
                _send_replies(batch, outcomes)
            due = {source for source, _, _ in waiting}
            for source in [s for s in ended if s not in due]:
                source.connection.close()
                ended.remove(source)


# How much the writer reads from a connection at a time: a few frames of
# inline-spooled messages (up to 64 kB each).
_RECEIVE_SIZE = 1 << 20


class _Frames:
    """The frames arriving on one connection: requests to the writer process,
    or its replies."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.open = True
        # Received into one buffer, kept: a fresh 1 MiB bytes per read was an
        # mmap and munmap each time, a sixth of the writer's time at load.
        self._chunk = bytearray(_RECEIVE_SIZE)
        self._partial = b""  # the start of a frame that has not all arrived

    def receive(self) -> list[Any]:
        """The whole frames that have arrived, unpickled (call when the
        connection is readable); ``open`` turns False when the other end has closed."""
        try:
            size = self.connection.recv_into(self._chunk, flags=socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return []  # woken for nothing: nothing arrived after all
        except OSError:
            size = 0
        if not size:
            self.open = False  # a partial frame is a closed end too
            return []
        with memoryview(self._chunk) as chunk:
            data = memoryview(self._partial + chunk[:size]) if self._partial else chunk[:size]
            with data:
                arrived, used = self._frames(data)
                self._partial = bytes(data[used:])
        return arrived

    def _frames(self, data: memoryview) -> tuple[list[Any], int]:
        """The whole frames at the start of ``data``, and the octets they took."""
        arrived = []
        head = _LENGTH.size
        used = 0
        try:
            while len(data) - used >= head:
                end = used + head + _LENGTH.unpack_from(data, used)[0]
                if len(data) < end:
                    break
                arrived.append(pickle.loads(data[used + head : end]))  # noqa: S301 (our own processes)
                used = end
        except Exception:
            log.exception("a frame between a worker and the writer process could not be read")
            self.open = False
            used = len(data)
        return arrived, used


def _send_replies(batch: Sequence[tuple[_Frames, int, Any]], outcomes: Sequence[Outcome]) -> None:
    """Each connection's replies to ``batch``, in one send per connection."""
    frames: dict[_Frames, list[bytes]] = {}
    for (source, number, _), (ok, value) in zip(batch, outcomes, strict=True):
        try:
            frame = _frame((number, ok, value))
        except Exception as unpicklable:  # an exception that does not pickle: its words do
            error = unpicklable if ok else value
            frame = _frame((number, False, RuntimeError(f"{type(error).__name__}: {error}")))
        frames.setdefault(source, []).append(frame)
    for source, parts in frames.items():
        # A worker that is gone waits for nothing; what it sent is committed all the same.
        with contextlib.suppress(OSError):
            source.connection.sendall(b"".join(parts))
