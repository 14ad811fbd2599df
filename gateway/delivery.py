"""The delivery stage: claim due recipients, send, record, repeat.

One worker task per gateway process. It wakes when a message was accepted,
when the earliest deferred recipient falls due, or after a short poll
interval (other instances may have queued work). Several messages are in
flight at once, up to ``concurrency``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from gateway.queue import ClaimedMessage, QueueStore, RecipientResult, RetryPolicy, Verdict
from gateway.relay import Relay
from gateway.spool import Spool

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0


class DeliveryWorker:
    def __init__(
        self,
        queue: QueueStore,
        spool: Spool,
        relay: Relay,
        retry: RetryPolicy,
        concurrency: int = 8,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.queue = queue
        self.spool = spool
        self.relay = relay
        self.retry = retry
        self.clock = clock
        self.concurrency = concurrency
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            free = self.concurrency - len(self._in_flight)
            claimed = (
                await asyncio.to_thread(self.queue.claim_due, self.clock(), free * 8)
                if free
                else []
            )
            for message in claimed:
                task = asyncio.create_task(self._deliver(message))
                self._in_flight.add(task)
                task.add_done_callback(self._task_done)
            if not claimed:
                await self._sleep_until_work()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()

    async def _sleep_until_work(self) -> None:
        timeout = POLL_SECONDS
        next_due = await asyncio.to_thread(self.queue.next_due)
        if next_due is not None:
            timeout = min(timeout, max((next_due - self.clock()).total_seconds(), 0.05))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def drain(self) -> None:
        """Wait for deliveries in flight (used at shutdown)."""
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _deliver(self, message: ClaimedMessage) -> None:
        addresses = [r.address for r in message.recipients]
        try:
            content = await asyncio.to_thread(self.spool.load, message.message_id)
            results = await self.relay.send(
                message.message_id, message.mail_from, addresses, content
            )
        except Exception as exc:
            log.exception("delivery of %s failed", message.message_id)
            failure = RecipientResult(Verdict.DEFERRED, f"gateway fault: {type(exc).__name__}")
            results = dict.fromkeys(addresses, failure)
        for address in addresses:
            results.setdefault(
                address, RecipientResult(Verdict.DEFERRED, "no answer for recipient")
            )
        done = await asyncio.to_thread(
            self.queue.finish, message, results, self.clock(), self.retry
        )
        for address in addresses:
            log.info("%s to=<%s> %s: %s", message.message_id, address, *_summary(results[address]))
        if done:
            await asyncio.to_thread(self.spool.remove, message.message_id)


def _summary(result: RecipientResult) -> tuple[str, str]:
    return result.verdict.value, result.reply
