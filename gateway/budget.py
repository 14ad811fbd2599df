"""How many octets of message a stage may hold in memory at once.

Delivery holds a whole message (sealed, opened, maybe S/MIME-encrypted, then
dot-stuffed by the SMTP client): about five copies. Eight 25 MB messages at
once would need a gigabyte. Under a budget, small messages go out side by
side while a large one waits its turn, and one larger than the whole budget
goes alone. Waiters are served in order, so a large message is never starved
by a stream of small ones.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 1 << 20


def return_large_buffers_to_the_system() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (for ``cgw serve``).

    glibc raises the threshold after every large free, up to 32 MB, so a
    few large messages later their buffers come from the heap, where they
    fragment and stay: measured, ten 25 MB S/MIME uploads left 470 MB resident
    instead of 110 MB, with a peak of 585 MB instead of 255 MB. Setting the
    threshold turns that adjustment off. Not at glibc's default of 128 kB:
    asyncio's TLS layer reads into a fresh 256 kB buffer every time (and once
    more to learn there is nothing left), and with 128 kB each of those was
    an mmap, an mremap and an munmap: 17 system calls per 4 KB message, and
    a quarter more messages a second without them. False where there is no
    glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))


class OctetBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: collections.deque[object] = collections.deque()
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        """Wait until ``size`` octets fit (or nothing else is held), and hold them."""
        turn = object()
        async with self._changed:
            self._waiting.append(turn)
            try:
                await self._changed.wait_for(
                    lambda: (
                        self._waiting[0] is turn
                        and (self.used == 0 or self.used + size <= self.limit)
                    )
                )
            finally:
                self._waiting.remove(turn)
                self._changed.notify_all()  # the next in line may fit as well
            self.used += size
        try:
            yield
        finally:
            async with self._changed:
                self.used -= size
                self._changed.notify_all()


class MachineTurn:
    """One message larger than a worker's budget in delivery at a time on this
    machine, among all ``cgw serve`` worker processes (``CGW_WORKERS``).

    Each worker's ``OctetBudget`` lets one message larger than the budget go
    alone; with several workers, each would, and their peaks would add up.
    The turn is ``flock`` on a file beside the spool, polled: such a delivery
    takes far longer than the poll, and a waiter that is cancelled while
    polling cannot leave the lock taken (a thread blocked in ``flock`` could).
    """

    POLL_SECONDS = 0.05

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(self.POLL_SECONDS)
            yield
        finally:
            os.close(fd)  # and with it the lock
