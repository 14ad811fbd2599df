"""The spool: sealed message files, durable before the client hears 250.

A message is written to ``spool/tmp``, fsync'ed, renamed into ``spool/`` and
the directory fsync'ed: after ``store`` returns, a power cut or ``kill -9``
cannot lose it. Only sealed bytes touch the disk (``crypto_at_rest``). A file
whose queue row never committed was never acknowledged; ``recover`` removes
it at start-up, as Postfix drops unfinished files from ``incoming``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from gateway.crypto_at_rest import StorageKey

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class SpoolFull(OSError):
    """The disk or quota is full: a temporary condition (452 4.3.1)."""


class Spool:
    def __init__(self, directory: Path, key: StorageKey) -> None:
        self.directory = directory
        self.tmp = directory / "tmp"
        self.key = key

    @staticmethod
    def prepare(directory: Path) -> None:
        """Create the spool directories, readable by the gateway's user only."""
        (directory / "tmp").mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)

    def path(self, message_id: str) -> Path:
        return self.directory / f"{message_id}.msg"

    def store(self, message_id: str, content: bytes) -> None:
        """Seal and durably store; on any failure nothing is left behind."""
        sealed = self.key.seal(content, message_id)
        tmp = self.tmp / f"{message_id}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(sealed)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path(message_id))
            _fsync_directory(self.directory)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in _NO_SPACE:
                raise SpoolFull(exc.errno, exc.strerror) from exc
            raise

    @contextlib.contextmanager
    def batch(self) -> Iterator[SpoolBatch]:
        """Files stored in the block are removed again if the block fails.

        The block stores first and commits the queue rows last: a failure
        anywhere means nothing was acknowledged, so nothing may stay behind.
        """
        batch = SpoolBatch(self)
        try:
            yield batch
        except BaseException:
            for message_id in batch.stored:
                with contextlib.suppress(OSError):
                    self.remove(message_id)
            raise

    def load(self, message_id: str) -> bytes:
        return self.key.open(self.path(message_id).read_bytes(), message_id)

    def remove(self, message_id: str) -> None:
        self.path(message_id).unlink(missing_ok=True)
        _fsync_directory(self.directory)

    def stored_ids(self) -> list[str]:
        return [p.stem for p in self.directory.glob("*.msg")]

    def recover(self, committed: Iterable[str], older_than: float = 3600.0) -> list[str]:
        """Remove unfinished and never-acknowledged files; return their ids.

        Only files older than ``older_than`` seconds: a younger one may belong to
        an intake (of this or another process) whose commit is still under way.
        """
        horizon = time.time() - older_than
        for leftover in self.tmp.glob("*.tmp"):
            if leftover.stat().st_mtime < horizon:
                leftover.unlink(missing_ok=True)
        keep = set(committed)
        dropped = [
            mid
            for mid in self.stored_ids()
            if mid not in keep and self.path(mid).stat().st_mtime < horizon
        ]
        for message_id in dropped:
            self.path(message_id).unlink(missing_ok=True)
        if dropped:
            _fsync_directory(self.directory)
        return dropped


class SpoolBatch:
    """The files one transaction stores (see ``Spool.batch``)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.stored: list[str] = []

    def store(self, message_id: str, content: bytes) -> None:
        self.spool.store(message_id, content)
        self.stored.append(message_id)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
