"""The spool: sealed messages, durable before the client hears 250.

Two stores, one contract: after ``store`` returns, a power cut or ``kill -9``
cannot lose the message, and only sealed bytes (``crypto_at_rest``) are
kept. A message whose queue row never committed was never acknowledged;
``recover`` removes it at start-up, as Postfix drops unfinished files from
``incoming``.

A message is sealed as it arrives (``SpoolWriter``). Up to ``INLINE_LIMIT``
octets it stays in memory and becomes a row of ``spooled_message`` in the
very transaction that queues it: one commit (one fsync) makes message and
queue rows durable together, and no file is created, fsync'ed, renamed,
read back or unlinked. Most mail is that small: a file per message was half
of what the gateway's threads waited for. A larger message goes on into a
file in ``spool/tmp``, so a 25 MB message is never whole in memory, and
``SpoolBatch.adopt`` makes it durable before the queue rows commit:

- ``FileSpool`` (the default with SQLite): the file is fsync'ed, renamed
  into ``spool/`` and the directory fsync'ed.
- ``DatabaseSpool`` (the default with PostgreSQL): it becomes a row in the
  queue transaction too. Several instances then share the database and
  nothing else: any of them can deliver what another accepted.

Reports (bounces, held notices) quote a header at most, and are always rows.
A row leaves with the transaction that completes its message
(``QueueStore.close_if_complete``); a file after it (``Spool.release``).
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, bindparam, delete, insert
from sqlalchemy import select as select_columns
from sqlmodel import Session, col, select

from consent_registry.db import session_scope
from consent_registry.driver_statements import DriverStatement
from consent_registry.models import SpooledMessage
from gateway.crypto_at_rest import Sealer, StorageKey
from gateway.settings import Settings

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
# PostgreSQL's SQLSTATE for "disk full"; SQLite's result code SQLITE_FULL.
_PG_DISK_FULL = "53100"
_SQLITE_FULL = 13

# Messages up to this many octets are spooled as a row in their queue
# transaction (see above); larger ones as a file. 64 kB: text mail and small
# attachments, a few pages of the database each.
INLINE_LIMIT = 64 << 10

# A spooled copy kept inline: (message id, sealed octets).
InlineCopy = tuple[str, bytes]
_SEALED = select_columns(col(SpooledMessage.sealed)).where(
    col(SpooledMessage.id) == bindparam("id")
)
# Run for every small message: on the driver's cursor.
_INSERT_INLINE = DriverStatement(insert(SpooledMessage))
_FORGET = DriverStatement(delete(SpooledMessage).where(col(SpooledMessage.id) == bindparam("id")))


def store_inline(session: Session, copies: Iterable[InlineCopy], now: datetime) -> None:
    """The inline copies of a batch, in the caller's (queue) transaction."""
    rows = [{"id": mid, "sealed": sealed, "stored_at": now} for mid, sealed in copies]
    if rows:
        _INSERT_INLINE.run_many(session.connection(), rows)


def forget_inline(session: Session, message_id: str) -> None:
    """Remove a complete message's inline copy, in the transaction that completes it."""
    _FORGET.run(session.connection(), {"id": message_id})


def storage_full(exc: BaseException) -> bool:
    """Whether a database error says the disk is full (a temporary condition, 452)."""
    orig = getattr(exc, "orig", None)
    return (
        getattr(orig, "sqlstate", None) == _PG_DISK_FULL
        or getattr(orig, "sqlite_errorcode", None) == _SQLITE_FULL
    )


class SpoolFull(OSError):
    """The disk or quota is full: a temporary condition (452 4.3.1)."""


class Spool(abc.ABC):
    """Where accepted messages wait, sealed, until every recipient is done."""

    def __init__(
        self, directory: Path, key: StorageKey, engine: Engine, inline_limit: int = INLINE_LIMIT
    ) -> None:
        self.key = key
        self.tmp = directory / "tmp"
        self.engine = engine
        self.inline_limit = inline_limit

    def writer(self, message_id: str) -> SpoolWriter:
        """A new message, to be written as it arrives and then adopted (or discarded)."""
        return SpoolWriter(
            message_id,
            self.tmp / f"{message_id}.tmp",
            self.key.sealer(message_id),
            self.inline_limit,
        )

    @abc.abstractmethod
    def adopt(self, writer: SpoolWriter) -> bytes | None:
        """Make a message written to a file durable, or return its sealed octets
        for an inline copy; on any failure nothing is left behind."""

    def load(self, message_id: str) -> bytes:
        """The message; FileNotFoundError when it is not (or no longer) there."""
        with self.engine.connect() as connection:
            sealed = connection.execute(_SEALED, {"id": message_id}).scalar()
        if sealed is not None:
            return self.key.open(sealed, message_id)
        return self._load_file(message_id)

    def _load_file(self, message_id: str) -> bytes:
        raise FileNotFoundError(errno.ENOENT, "not in the spool", message_id)

    def remove(self, message_id: str) -> None:
        """Every copy of a message (at start-up, of one the queue calls done)."""
        with session_scope(self.engine) as session:
            forget_inline(session, message_id)
        self._remove_file(message_id)

    def release(self, message_id: str, size: int) -> None:
        """What is left of a message the queue just completed: its file, if it
        had one (an inline copy left with the completing transaction)."""
        if self.may_have_file(size):
            self._remove_file(message_id)

    def may_have_file(self, size: int) -> bool:
        """Whether a message of ``size`` octets may be in a file (else it is inline)."""
        return size > self.inline_limit

    def stored_ids(self) -> list[str]:
        """Every message in the spool: inline rows and files."""
        with Session(self.engine) as session:
            rows = list(session.exec(select(SpooledMessage.id)).all())
        return rows + self._file_ids()

    @abc.abstractmethod
    def _remove_file(self, message_id: str) -> None: ...

    @abc.abstractmethod
    def _file_ids(self) -> list[str]: ...

    def _remove_old_tmp(self, horizon: float) -> None:
        """Messages whose DATA never ended (the process died while they arrived)."""
        for leftover in self.tmp.glob("*.tmp"):
            if _modified(leftover, default=horizon) < horizon:
                leftover.unlink(missing_ok=True)

    def recover(self, committed: Iterable[str], older_than: float = 3600.0) -> list[str]:
        """Remove never-acknowledged messages older than ``older_than`` seconds.

        Only older ones: a younger one may belong to an intake (of this or
        another process) whose commit is still under way. (Rows are committed
        with their queue rows today; older releases committed them first.)
        """
        horizon = time.time() - older_than
        self._remove_old_tmp(horizon)
        keep = set(committed)
        oldest = datetime.fromtimestamp(horizon, UTC)
        with session_scope(self.engine) as session:
            old = session.exec(
                select(SpooledMessage.id).where(col(SpooledMessage.stored_at) < oldest)
            ).all()
            dropped = [message_id for message_id in old if message_id not in keep]
            for start in range(0, len(dropped), 500):
                chunk = dropped[start : start + 500]
                session.execute(delete(SpooledMessage).where(col(SpooledMessage.id).in_(chunk)))
        return dropped + self._recover_files(keep, horizon)

    @abc.abstractmethod
    def _recover_files(self, keep: set[str], horizon: float) -> list[str]:
        """Files of messages not in ``keep``, older than ``horizon``, removed."""

    @contextlib.contextmanager
    def batch(self) -> Iterator[SpoolBatch]:
        """Messages stored in the block are removed again if the block fails.

        The block stores first and commits the queue rows last: a failure
        anywhere means nothing was acknowledged, so nothing may stay behind.
        """
        batch = SpoolBatch(self)
        try:
            yield batch
        except BaseException:
            for message_id in batch.stored:
                with contextlib.suppress(Exception):
                    self._remove_file(message_id)
            raise


def open_spool(settings: Settings, engine: Engine, key: StorageKey) -> Spool:
    """The spool ``CGW_SPOOL`` names; ``auto`` is the database on PostgreSQL."""
    kind = settings.spool
    if kind == "auto":
        kind = "database" if engine.dialect.name == "postgresql" else "files"
    if kind == "database":
        return DatabaseSpool(settings.spool_dir, key, engine)
    return FileSpool(settings.spool_dir, key, engine)


class DatabaseSpool(Spool):
    """Sealed messages as rows of ``spooled_message`` only: a large one is
    read back from its file in ``tmp`` and becomes a row in the queue
    transaction like a small one (PostgreSQL's commit is durable with its
    default ``synchronous_commit=on``)."""

    def adopt(self, writer: SpoolWriter) -> bytes | None:
        try:
            writer.close(sync=False)  # the commit of the queue rows makes it durable
            return writer.path.read_bytes()
        finally:
            writer.discard()

    # No files here: every copy is a row.
    def _remove_file(self, message_id: str) -> None:
        pass

    def _file_ids(self) -> list[str]:
        return []

    def _recover_files(self, keep: set[str], horizon: float) -> list[str]:
        return []


class FileSpool(Spool):
    def __init__(
        self, directory: Path, key: StorageKey, engine: Engine, inline_limit: int = INLINE_LIMIT
    ) -> None:
        super().__init__(directory, key, engine, inline_limit)
        self.directory = directory

    @staticmethod
    def prepare(directory: Path) -> None:
        """Create the spool directories, readable by the gateway's user only."""
        (directory / "tmp").mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)

    def path(self, message_id: str) -> Path:
        return self.directory / f"{message_id}.msg"

    def adopt(self, writer: SpoolWriter) -> bytes | None:
        try:
            writer.close(sync=True)
            os.rename(writer.path, self.path(writer.message_id))
            _fsync_directory(self.directory)
        except OSError as exc:
            writer.discard()
            raise _spool_error(exc) from exc
        return None

    def _load_file(self, message_id: str) -> bytes:
        return self.key.open_file(self.path(message_id), message_id)

    def _remove_file(self, message_id: str) -> None:
        # No directory fsync: a removal lost to a power cut brings back the
        # copy of a message the queue calls done, and ``recover`` (through
        # the gateway's start-up) removes such copies again.
        self.path(message_id).unlink(missing_ok=True)

    def _file_ids(self) -> list[str]:
        return [p.stem for p in self.directory.glob("*.msg")]

    def _recover_files(self, keep: set[str], horizon: float) -> list[str]:
        dropped = [
            mid
            for mid in self._file_ids()
            if mid not in keep and _modified(self.path(mid), default=horizon) < horizon
        ]
        for message_id in dropped:
            self.path(message_id).unlink(missing_ok=True)
        if dropped:
            _fsync_directory(self.directory)
        return dropped


class SpoolBatch:
    """The messages one transaction stores (see ``Spool.batch``): files made
    durable before it commits (``stored``), and the ``inline`` copies it
    must insert itself (``store_inline``)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.stored: list[str] = []
        self.inline: list[InlineCopy] = []

    def store(self, message_id: str, content: bytes) -> None:
        """A report: sealed, inline (it quotes a header at most)."""
        self.inline.append((message_id, self.spool.key.seal(content, message_id)))

    def adopt(self, writer: SpoolWriter) -> None:
        """A received message (blocking only when it is in a file)."""
        if writer.in_memory:
            writer.close(sync=False)
            self.inline.append((writer.message_id, writer.sealed()))
            return
        sealed = self.spool.adopt(writer)
        if sealed is None:
            self.stored.append(writer.message_id)
        else:
            self.inline.append((writer.message_id, sealed))


class SpoolWriter:
    """One message sealed as it arrives: in memory up to ``inline_limit``
    octets (``in_memory``), then in the spool's ``tmp`` directory.

    Only sealed bytes touch the disk. The file stays in ``tmp`` (which
    ``recover`` cleans) until ``Spool.adopt`` makes it part of the spool.
    While in memory the plaintext is kept too (``content``): intake hands
    it to delivery with the message, which then need not read and open the
    copy it just stored.
    """

    def __init__(self, message_id: str, path: Path, sealer: Sealer, inline_limit: int) -> None:
        self.message_id = message_id
        self.path = path
        self.size = 0  # plaintext octets written
        self._sealer = sealer
        self._inline_limit = inline_limit
        self._held: list[bytes] | None = []  # sealed pieces, until there is a file
        self._plain: list[bytes] | None = []  # the same in plaintext, while in memory
        self._fd: int | None = None
        self._created = False
        self._closed = False
        if inline_limit < 0:
            self._open_file()

    @property
    def in_memory(self) -> bool:
        return self._held is not None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._plain is not None:
            self._plain.append(data)
        self._put(self._sealer.update(data))

    def close(self, sync: bool) -> None:
        """The last chunk written, and with ``sync`` on the disk (if in a file)."""
        assert not self._closed, "a spool writer closes once"
        self._put(self._sealer.finish())
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if sync:
                os.fsync(fd)
        except OSError as exc:
            raise _spool_error(exc) from exc
        finally:
            os.close(fd)

    def sealed(self) -> bytes:
        """All of a closed message kept in memory."""
        assert self._closed and self._held is not None, "only a closed in-memory message"
        return b"".join(self._held)

    def content(self) -> bytes | None:
        """The plaintext of a closed message kept in memory; None for one in a file."""
        if not self._closed or self._plain is None:
            return None
        return b"".join(self._plain)

    def discard(self) -> None:
        """Nothing of the message is left (safe to call more than once)."""
        self._held = [] if self._held is not None else None
        self._plain = [] if self._plain is not None else None
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if self._created:
            self.path.unlink(missing_ok=True)

    def _put(self, sealed: bytes) -> None:
        if self._held is not None:
            if self.size <= self._inline_limit:
                self._held.append(sealed)
                return
            self._open_file()
        self._write(sealed)

    def _open_file(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise _spool_error(exc) from exc
        self._created = True
        held, self._held = self._held or [], None
        self._plain = None
        for piece in held:
            self._write(piece)

    def _write(self, sealed: bytes) -> None:
        assert self._fd is not None, "a spool writer takes no more after close"
        view = memoryview(sealed)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise _spool_error(exc) from exc


def _spool_error(exc: OSError) -> OSError:
    """A full disk or quota is temporary for the client (452), anything else a fault."""
    if exc.errno in _NO_SPACE and not isinstance(exc, SpoolFull):
        return SpoolFull(exc.errno, exc.strerror)
    return exc


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _modified(path: Path, default: float) -> float:
    """A file's mtime; ``default`` if it is gone (another worker process
    removed it between the listing and now)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return default
