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
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from consent_registry.facts_cache import CachedRegistry, CacheMiss
from gateway import replies
from gateway.bounce import FailedRecipient, failure_status
from gateway.budget import MachineTurn, OctetBudget
from gateway.headers import storable
from gateway.policy_gate import PolicyGate
from gateway.protection import ProtectionUnavailable, Protector
from gateway.queue import (
    Claim,
    ClaimedMessage,
    ClaimedRecipient,
    QueueStore,
    RecipientResult,
    RetryPolicy,
    Verdict,
    settle,
)
from gateway.relay import Relay
from gateway.reports import EnqueueReports, Reports
from gateway.spool import Spool
from policies.decision import Decision, Outcome, Protection

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0
# Messages in delivery at once. Each waits on the next hop most of its time,
# so more in flight keep up with intake: 8 delivered 112 S/MIME messages a
# second where intake took 155; 16 delivered 135 (4 KB, 10 clients). Postfix
# allows 20 per destination by default.
DELIVERY_CONCURRENCY = 16
# Octets of message in delivery at once (see ``budget``): 32 MiB of messages
# cost about 160 MB at most; one larger message goes alone. Shared by the
# worker processes of one machine (``CGW_WORKERS``), each taking its part,
# but not less than DELIVERY_MEMORY_PART: with many workers, an ordinary
# attachment would otherwise count as large and wait for the machine's turn.
DELIVERY_MEMORY = 32 << 20
DELIVERY_MEMORY_PART = 8 << 20

_SMIME = Protection.SMIME.value
# What ``DeliveryWorker._prepare`` hands the send: content, settled results,
# recipients to send to, and S/MIME copies by address.
_Prepared = tuple[bytes, dict[str, RecipientResult], list[ClaimedRecipient], dict[str, bytes]]


class DeliveryWorker:
    def __init__(
        self,
        queue: QueueStore,
        spool: Spool,
        relay: Relay,
        retry: RetryPolicy,
        reports: Reports,
        protector: Protector,
        gate: PolicyGate,
        concurrency: int = DELIVERY_CONCURRENCY,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        memory: int = DELIVERY_MEMORY,
        large: MachineTurn | None = None,
    ) -> None:
        self.queue = queue
        self.spool = spool
        self.relay = relay
        self.retry = retry
        self.reports = reports
        self.protector = protector
        self.gate = gate
        self.clock = clock
        self.concurrency = concurrency
        self.memory = OctetBudget(memory)
        self.large = large  # for messages over ``memory``: see ``MachineTurn``
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._reserved = 0  # slots promised to messages being queued (``reserve``)
        # Whether a claim may find work: at start, after ``wake``, after a full
        # claim, when a due time passed. Not after each delivery of handed-over
        # mail: a claim transaction per message was most of the writer's work.
        self._more_due = True
        self._stopping = False

    def wake(self) -> None:
        """Something was queued for a round to claim."""
        self._more_due = True
        self._wake.set()

    def reserve(self, now: datetime) -> Claim | None:
        """A delivery slot for a message about to be queued, if one is free.

        Intake queues the message's recipients already claimed (``Claim``)
        and then calls ``hand_over``: fresh mail goes out without a claim
        transaction or a poll. Without a free slot it is queued unclaimed,
        for a later round. Runs on the event loop, like ``_round``.
        """
        if self._stopping or self._free() <= 0:
            return None
        self._reserved += 1
        return Claim(self.queue.instance, now + self.queue.lease)

    def hand_over(self, message: ClaimedMessage | None) -> None:
        """Deliver what was queued under a ``reserve``d slot; None gives the slot back
        (the store failed, or nothing was due)."""
        self._reserved -= 1
        if self._stopping:  # the rows stay claimed: released at the next start
            return
        if message is not None and message.recipients:
            self._start(message)
        elif self._more_due:
            self._wake.set()

    def _free(self) -> int:
        return self.concurrency - len(self._in_flight) - self._reserved

    def _start(self, message: ClaimedMessage) -> None:
        task = asyncio.create_task(self._deliver(message))
        self._in_flight.add(task)
        task.add_done_callback(self._task_done)

    def stop(self) -> None:
        """End ``run`` after its current step. Not by cancelling it: a
        cancelled task leaves its database call running in a thread, still
        writing after the gateway has closed the database."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Deliver until stopped; a fault (e.g. the database away) is logged and retried."""
        while not self._stopping:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("delivery round failed; trying again in %s s", POLL_SECONDS)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)

    def _claimable(self) -> int:
        """How many slots a claim may take now: the free ones, less a quarter of
        them all while anything is in delivery or being queued.

        The quarter is left for hand-overs. A claim holds its slots until its
        transaction returns; with every free slot held, each message arriving
        meanwhile found none, was queued unclaimed, and so called for the next
        claim: under steady intake a quarter of the messages went through a
        claim and a spool read instead of the hand-over (4 KB, 10 clients).
        When the worker is idle, a claim takes every slot.
        """
        free = self._free()
        if self._in_flight or self._reserved:
            free -= self.concurrency // 4
        return free

    async def _round(self) -> None:
        """Claim what is due and start delivering it, or sleep until there is work."""
        self._wake.clear()
        limit = self._claimable()
        claimed: list[ClaimedMessage] = []
        if limit > 0 and self._more_due:
            self._reserved += limit  # a hand-over meanwhile must not take these slots too
            self._more_due = False  # a wake during the claim sets it again
            try:
                claimed = await asyncio.to_thread(self.queue.claim_due, self.clock(), limit)
            except BaseException:
                self._more_due = True
                raise
            finally:
                self._reserved -= limit
            if len(claimed) >= limit:  # a full claim: more may be due
                self._more_due = True
            for message in claimed:
                self._start(message)
        if not claimed:
            await self._sleep_until_work()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if self._more_due:  # a slot is free for work that waits
            self._wake.set()

    async def _sleep_until_work(self) -> None:
        """Until woken, or until the next recipient falls due (then claim again:
        a deferral's retry time, a lapsed claim, or another instance's mail)."""
        timeout = POLL_SECONDS
        next_due = await asyncio.to_thread(self.queue.next_due)
        if next_due is not None:
            timeout = min(timeout, max((next_due - self.clock()).total_seconds(), 0.05))
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            self._more_due = True

    async def close(self) -> None:
        """Let the relay say goodbye to connections it kept open."""
        await self.relay.close()

    async def drain(self) -> None:
        """Wait for deliveries in flight (used at shutdown)."""
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _deliver(self, message: ClaimedMessage) -> None:
        if self.large is None or message.size <= self.memory.limit:
            async with self.memory.hold(message.size):
                await self._deliver_within_budget(message)
            return
        # Alone among the workers first, holding none of this worker's budget
        # while it waits, so that smaller messages here go on meanwhile.
        async with self.large.hold(), self.memory.hold(message.size):
            await self._deliver_within_budget(message)

    async def _deliver_within_budget(self, message: ClaimedMessage) -> None:
        results: dict[str, RecipientResult] = {}
        content = b""
        try:
            content, prepared, sendable, sealed = await self._prepared(message)
            results.update(prepared)
            for protection, group in _by_protection(sendable).items():
                results.update(await self._send(message, protection, group, content, sealed))
        except Exception as exc:
            # What the next hop already accepted stays accepted: only the rest waits.
            log.exception("delivery of %s failed", message.message_id)
            failure = RecipientResult(Verdict.DEFERRED, f"gateway fault: {type(exc).__name__}")
            for rcpt in message.recipients:
                results.setdefault(rcpt.address, failure)
        for rcpt in message.recipients:
            results.setdefault(
                rcpt.address, RecipientResult(Verdict.DEFERRED, "no answer for recipient")
            )
            result = results[rcpt.address]
            log.info(
                "%s to=<%s> %s: %s",
                message.message_id,
                rcpt.address,
                result.verdict.value,
                result.reply,
                extra={
                    "event": "delivery",
                    "queue_id": message.message_id,
                    "recipient": rcpt.address,
                    "verdict": result.verdict.value,
                },
            )
        try:
            await self._record(message, results, content)
        except Exception:
            # Unrecorded: the claim lapses and the message is tried again (at least once).
            log.exception("could not record the delivery of %s", message.message_id)

    async def _record(
        self, message: ClaimedMessage, results: dict[str, RecipientResult], content: bytes
    ) -> None:
        """Record the results, and queue what the sender is owed in the same transaction.

        A bounce for recipients that failed for good, a notice for recipients
        put back in the quarantine, both inline spool copies: no file work,
        so the event loop awaits the writer itself. A complete message
        leaves the spool (a file copy after the commit, in a thread).
        """
        now = self.clock()
        settled = settle(message, results, now, self.retry.lifetime)
        failed = [
            FailedRecipient(address, failure_status(result.reply), storable(result.reply))
            for address, result in settled.items()
            if result.verdict is Verdict.FAILED
        ]
        held = [(a, r.reply) for a, r in settled.items() if r.verdict is Verdict.HELD]
        with self.spool.batch() as batch:
            reports = self.reports.owed(
                batch,
                "" if message.is_bounce else message.mail_from,
                content,
                message.message_id,
                now,
                failed=failed,
                held=held,
                arrived=message.received_at,
            )
            within = EnqueueReports(self.reports, tuple(reports), now, tuple(batch.inline))
            complete = await self.queue.finish(message, settled, now, self.retry, within)
        if not complete:
            return
        try:
            if self.spool.may_have_file(message.size):
                await asyncio.to_thread(self.spool.release, message.message_id, message.size)
        except Exception:  # recorded all the same: only the copy stays, until the next start
            log.exception(
                "%s is complete but its spool copy could not be removed", message.message_id
            )

    async def _prepared(self, message: ClaimedMessage) -> _Prepared:
        """``_prepare``, on the event loop when it is quick: a small message
        handed over in memory (its S/MIME copy costs microseconds) whose
        registry facts are in memory too; otherwise in one thread hop."""
        content = message.content
        if content is not None:
            registry = self.gate.in_memory()
            if registry is not None:
                with contextlib.suppress(CacheMiss):
                    return self._prepare_with(message, content, registry)
        return await asyncio.to_thread(self._prepare, message)

    def _prepare(self, message: ClaimedMessage) -> _Prepared:
        """Everything blocking before the send: the message from the spool
        (unless it came in memory), and ``_prepare_with`` on one read of the
        registry."""
        content = message.content
        if content is None:
            content = self.spool.load(message.message_id)
        if not self._rechecked(message):
            return content, {}, list(message.recipients), {}
        with self.gate.registry() as registry:
            return self._prepare_with(message, content, registry)

    @staticmethod
    def _rechecked(message: ClaimedMessage) -> bool:
        """Whether the registry has a say: patient recipients, or S/MIME ones."""
        return any(r.patient_id is not None or r.protection == _SMIME for r in message.recipients)

    def _prepare_with(
        self, message: ClaimedMessage, content: bytes, registry: CachedRegistry
    ) -> _Prepared:
        """The message's patient recipients decided again, as the registry
        stands now, and an encrypted copy for each S/MIME recipient.

        Returns the content, the results the recheck and the protection
        already settle, who may be sent to, and the S/MIME copies by address.
        """
        if not self._rechecked(message):
            return content, {}, list(message.recipients), {}
        patients = [r.address for r in message.recipients if r.patient_id is not None]
        decided = self.gate.recheck(message.username, patients, registry) if patients else {}
        results, sendable = self._apply_recheck(message, decided)
        on_file = {
            r.address: registry.certificate(r.certificate_id) if r.certificate_id else None
            for r in sendable
            if r.protection == _SMIME
        }
        sealed: dict[str, bytes] = {}
        for address, certificate in on_file.items():  # each copy only its recipient opens
            try:
                sealed[address] = self.protector.smime(certificate, content)
            except ProtectionUnavailable as exc:
                results[address] = RecipientResult(Verdict.DEFERRED, str(exc))
        return content, results, [r for r in sendable if r.address not in results], sealed

    @staticmethod
    def _apply_recheck(
        message: ClaimedMessage, decided: dict[str, Decision]
    ) -> tuple[dict[str, RecipientResult], list[ClaimedRecipient]]:
        """What the recheck means for each recipient.

        Refused ones fail (the sender gets a bounce); ones without a secure
        channel any more (say, the certificate expired) go back to the
        quarantine (the sender gets a notice); the rest go out with the
        protection decided now. Returns those results and who may be sent to.
        """
        results: dict[str, RecipientResult] = {}
        sendable: list[ClaimedRecipient] = []
        for rcpt in message.recipients:
            decision = decided.get(rcpt.address)
            if decision is None:
                sendable.append(rcpt)
            elif decision.outcome is Outcome.DENY:
                reply = replies.decision(decision, rcpt.address)
                results[rcpt.address] = RecipientResult(Verdict.FAILED, reply)
            elif decision.outcome is Outcome.QUARANTINE:
                results[rcpt.address] = RecipientResult(
                    Verdict.HELD, decision.sentence, decision.reason.value
                )
            else:
                sendable.append(
                    replace(
                        rcpt,
                        protection=decision.protection.value,
                        certificate_id=decision.certificate_id,
                    )
                )
        return results, sendable

    async def _send(
        self,
        message: ClaimedMessage,
        protection: str,
        group: list[ClaimedRecipient],
        content: bytes,
        sealed: dict[str, bytes],
    ) -> dict[str, RecipientResult]:
        addresses = [r.address for r in group]
        if protection != _SMIME:
            verified = {r.address for r in group if r.protection == Protection.TLS_REQUIRED.value}
            return await self.relay.send(
                message.message_id, message.mail_from, addresses, content, verified
            )
        results: dict[str, RecipientResult] = {}
        for address in addresses:  # each recipient gets the copy only their key opens
            results.update(
                await self.relay.send(
                    message.message_id, message.mail_from, [address], sealed[address]
                )
            )
        return results


def _by_protection(recipients: Sequence[ClaimedRecipient]) -> dict[str, list[ClaimedRecipient]]:
    """Recipients that can share one transaction.

    The relays here always demand verified TLS, which meets every protection
    but S/MIME; S/MIME recipients each get their own encrypted copy.
    """
    groups: dict[str, list[ClaimedRecipient]] = {}
    for rcpt in recipients:
        key = _SMIME if rcpt.protection == _SMIME else "transport"
        groups.setdefault(key, []).append(rcpt)
    return groups
