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
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
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


class Writes(Protocol):
    def run(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in a write transaction; return once it is committed."""
        ...


class DirectWrites:
    """Each transaction on its own, in the caller's thread (the CLI, tests)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def run(self, work: Callable[[Session], T]) -> T:
        with session_scope(self.engine) as session:
            return work(session)


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

    def submit(self, work: Callable[[Session], T]) -> Future[T]:
        """``work``'s result once committed, for callers that must not block."""
        pending = _Pending(work)
        with self._guard:
            if self._closed:
                raise RuntimeError("the writer is closed")
            self._pending.put(pending)
        return pending.done

    def run(self, work: Callable[[Session], T]) -> T:
        return self.submit(work).result()

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
                left.done.set_exception(RuntimeError("the writer stopped before this commit"))

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
                if len(batch) == 1 or not self._commit_together(batch):
                    for pending in batch:
                        self._commit(pending)
            except BaseException as exc:  # never leave a caller waiting
                for pending in batch:
                    if not pending.done.done():
                        pending.done.set_exception(exc)
            if closing:
                return

    def _commit_together(self, batch: list[_Pending]) -> bool:
        """Run the batch under one commit; False when a transaction in it failed.

        Only a failure of the work itself (or its flush) sends the batch back
        to be run one by one. A failed COMMIT fails every member instead:
        with PostgreSQL the connection may have dropped after the server
        committed, and running them again could store a message or a result
        twice.
        """
        with write_turn(self.engine), Session(self.engine, expire_on_commit=False) as session:
            try:
                results = [pending.work(session) for pending in batch]
                session.flush()
            except Exception:
                session.rollback()
                log.warning("a transaction in a group of %d failed; running each alone", len(batch))
                return False
            try:
                session.commit()
            except Exception as exc:
                for pending in batch:
                    pending.done.set_exception(exc)
                return True
        for pending, result in zip(batch, results, strict=True):
            pending.done.set_result(result)
        return True

    def _commit(self, pending: _Pending) -> None:
        try:
            with session_scope(self.engine) as session:
                result = pending.work(session)
        except BaseException as exc:  # handed to the caller, who raises it
            pending.done.set_exception(exc)
        else:
            pending.done.set_result(result)
