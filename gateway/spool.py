"""The spool: sealed messages, durable before the client hears 250.

Two stores, one contract: after ``store`` returns, a power cut or ``kill -9``
cannot lose the message, and only sealed bytes (``crypto_at_rest``) are
kept. A message whose queue row never committed was never acknowledged;
``recover`` removes it at start-up, as Postfix drops unfinished files from
``incoming``.

A message is sealed into ``spool/tmp`` as it arrives (``SpoolWriter``), so a
25 MB message is never whole in memory; ``SpoolBatch.adopt`` then makes it
durable:

- ``FileSpool`` (the default with SQLite): the file is fsync'ed, renamed
  into ``spool/`` and the directory fsync'ed.
- ``DatabaseSpool`` (the default with PostgreSQL): a row, committed. Several
  instances then share the database and nothing else: any of them can
  deliver what another accepted.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, delete
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from consent_registry.db import session_scope
from consent_registry.models import SpooledMessage
from gateway.crypto_at_rest import Sealer, StorageKey
from gateway.settings import Settings

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
# PostgreSQL's SQLSTATE for "disk full".
_PG_DISK_FULL = "53100"


class SpoolFull(OSError):
    """The disk or quota is full: a temporary condition (452 4.3.1)."""


class Spool(abc.ABC):
    """Where accepted messages wait, sealed, until every recipient is done."""

    def __init__(self, directory: Path, key: StorageKey) -> None:
        self.key = key
        self.tmp = directory / "tmp"

    def writer(self, message_id: str) -> SpoolWriter:
        """A new message, to be written as it arrives and then adopted (or discarded)."""
        return SpoolWriter(message_id, self.tmp / f"{message_id}.tmp", self.key.sealer(message_id))

    @abc.abstractmethod
    def adopt(self, writer: SpoolWriter) -> None:
        """Make a written message durable; on any failure nothing is left behind."""

    def store(self, message_id: str, content: bytes) -> None:
        """Seal and durably store a message that is already whole (a report)."""
        writer = self.writer(message_id)
        try:
            writer.write(content)
        except BaseException:
            writer.discard()
            raise
        self.adopt(writer)

    @abc.abstractmethod
    def load(self, message_id: str) -> bytes:
        """The message; FileNotFoundError when it is not (or no longer) there."""

    @abc.abstractmethod
    def remove(self, message_id: str) -> None: ...

    @abc.abstractmethod
    def stored_ids(self) -> list[str]: ...

    def _remove_old_tmp(self, horizon: float) -> None:
        """Messages whose DATA never ended (the process died while they arrived)."""
        for leftover in self.tmp.glob("*.tmp"):
            if _modified(leftover, default=horizon) < horizon:
                leftover.unlink(missing_ok=True)

    @abc.abstractmethod
    def recover(self, committed: Iterable[str], older_than: float = 3600.0) -> list[str]:
        """Remove never-acknowledged messages older than ``older_than`` seconds.

        Only older ones: a younger one may belong to an intake (of this or
        another process) whose commit is still under way.
        """

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
                    self.remove(message_id)
            raise


def open_spool(settings: Settings, engine: Engine, key: StorageKey) -> Spool:
    """The spool ``CGW_SPOOL`` names; ``auto`` is the database on PostgreSQL."""
    kind = settings.spool
    if kind == "auto":
        kind = "database" if engine.dialect.name == "postgresql" else "files"
    if kind == "database":
        return DatabaseSpool(settings.spool_dir, engine, key)
    return FileSpool(settings.spool_dir, key)


class DatabaseSpool(Spool):
    """Sealed messages as rows of ``spooled_message``.

    ``adopt`` commits on its own, before the transaction of the queue rows,
    exactly as the file spool fsyncs before it (PostgreSQL's commit is
    durable with its default ``synchronous_commit=on``).
    """

    def __init__(self, directory: Path, engine: Engine, key: StorageKey) -> None:
        super().__init__(directory, key)
        self.engine = engine

    def adopt(self, writer: SpoolWriter) -> None:
        try:
            writer.close(sync=False)  # the commit below is what makes it durable
            sealed = writer.path.read_bytes()
            with session_scope(self.engine) as session:
                session.add(
                    SpooledMessage(id=writer.message_id, sealed=sealed, stored_at=datetime.now(UTC))
                )
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) == _PG_DISK_FULL:
                raise SpoolFull(errno.ENOSPC, "the database's disk is full") from exc
            raise
        finally:
            writer.discard()

    def load(self, message_id: str) -> bytes:
        with Session(self.engine) as session:
            row = session.get(SpooledMessage, message_id)
            if row is None:
                raise FileNotFoundError(errno.ENOENT, "not in the spool", message_id)
            return self.key.open(row.sealed, message_id)

    def remove(self, message_id: str) -> None:
        with session_scope(self.engine) as session:
            session.execute(delete(SpooledMessage).where(col(SpooledMessage.id) == message_id))

    def stored_ids(self) -> list[str]:
        with Session(self.engine) as session:
            return list(session.exec(select(SpooledMessage.id)).all())

    def recover(self, committed: Iterable[str], older_than: float = 3600.0) -> list[str]:
        self._remove_old_tmp(time.time() - older_than)
        horizon = datetime.now(UTC) - timedelta(seconds=older_than)
        keep = set(committed)
        with session_scope(self.engine) as session:
            old = session.exec(
                select(SpooledMessage.id).where(col(SpooledMessage.stored_at) < horizon)
            ).all()
            dropped = [message_id for message_id in old if message_id not in keep]
            for start in range(0, len(dropped), 500):
                chunk = dropped[start : start + 500]
                session.execute(delete(SpooledMessage).where(col(SpooledMessage.id).in_(chunk)))
        return dropped


class FileSpool(Spool):
    def __init__(self, directory: Path, key: StorageKey) -> None:
        super().__init__(directory, key)
        self.directory = directory

    @staticmethod
    def prepare(directory: Path) -> None:
        """Create the spool directories, readable by the gateway's user only."""
        (directory / "tmp").mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)

    def path(self, message_id: str) -> Path:
        return self.directory / f"{message_id}.msg"

    def adopt(self, writer: SpoolWriter) -> None:
        try:
            writer.close(sync=True)
            os.rename(writer.path, self.path(writer.message_id))
            _fsync_directory(self.directory)
        except OSError as exc:
            writer.discard()
            raise _spool_error(exc) from exc

    def load(self, message_id: str) -> bytes:
        return self.key.open_file(self.path(message_id), message_id)

    def remove(self, message_id: str) -> None:
        # No directory fsync: a removal lost to a power cut brings back the
        # copy of a message the queue calls done, and ``recover`` (through
        # the gateway's start-up) removes such copies again.
        self.path(message_id).unlink(missing_ok=True)

    def stored_ids(self) -> list[str]:
        return [p.stem for p in self.directory.glob("*.msg")]

    def recover(self, committed: Iterable[str], older_than: float = 3600.0) -> list[str]:
        horizon = time.time() - older_than
        self._remove_old_tmp(horizon)
        keep = set(committed)
        dropped = [
            mid
            for mid in self.stored_ids()
            if mid not in keep and _modified(self.path(mid), default=horizon) < horizon
        ]
        for message_id in dropped:
            self.path(message_id).unlink(missing_ok=True)
        if dropped:
            _fsync_directory(self.directory)
        return dropped


class SpoolBatch:
    """The messages one transaction stores (see ``Spool.batch``)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.stored: list[str] = []

    def store(self, message_id: str, content: bytes) -> None:
        self.spool.store(message_id, content)
        self.stored.append(message_id)

    def adopt(self, writer: SpoolWriter) -> None:
        self.spool.adopt(writer)
        self.stored.append(writer.message_id)


class SpoolWriter:
    """One message sealed into the spool's ``tmp`` directory as it arrives.

    Only sealed bytes touch the disk. The file stays in ``tmp`` (which
    ``recover`` cleans) until ``Spool.adopt`` makes it part of the spool.
    """

    def __init__(self, message_id: str, path: Path, sealer: Sealer) -> None:
        self.message_id = message_id
        self.path = path
        self.size = 0  # plaintext octets written
        self._sealer = sealer
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise _spool_error(exc) from exc

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self._write(self._sealer.update(data))

    def close(self, sync: bool) -> None:
        """The last chunk written, and with ``sync`` on the disk."""
        self._write(self._sealer.finish())
        fd, self._fd = self._fd, None
        assert fd is not None, "a spool writer closes once"
        try:
            if sync:
                os.fsync(fd)
        except OSError as exc:
            raise _spool_error(exc) from exc
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Nothing of the message is left (safe to call more than once)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self.path.unlink(missing_ok=True)

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
