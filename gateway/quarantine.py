"""The quarantine: held messages, reviewed by the practice's privacy officer.

A held recipient is a queue row in state ``quarantined``; its message stays
sealed in the spool (AES-256-GCM, a data key per message wrapped by the
storage key, which is therefore also the quarantine key). This module is the
one place that lets held recipients go:

- ``release`` asks the policy again, as the registry stands now, and queues
  only what it allows (``policies.engine.decide_release``);
- ``reject`` fails them and sends the sender one bounce;
- ``expire`` rejects what was held longer than ``CGW_QUARANTINE_RETENTION``.

The CLI and the gateway's ``RetentionSweep`` share it, and every step is
audited in the transaction that makes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine
from sqlmodel import Session

from consent_registry.db import session_scope
from consent_registry.models import QueueMessage, QueueRecipient
from gateway import replies
from gateway.audit import AuditAction, AuditEntry, AuditLog
from gateway.bounce import FailedRecipient, failure_status
from gateway.crypto_at_rest import SealError
from gateway.policy_gate import PolicyGate
from gateway.queue import QueuedRecipient, QueueStore
from gateway.reports import Reports
from gateway.settings import format_duration
from gateway.spool import Spool, store_inline
from policies.decision import Decision, Outcome
from policies.engine import decide_release

log = logging.getLogger(__name__)

# The sweep looks at least this often, and sooner when a hold runs out earlier.
SWEEP_SECONDS = 60.0


class NotHeld(LookupError):
    """No recipient of this message is held (any more)."""

    def __init__(self, message_id: str) -> None:
        super().__init__(f"no held message {message_id!r} (see: cgw quarantine list)")


@dataclass(frozen=True)
class Released:
    """What a release did: who goes out now, and who stays held (and why)."""

    released: list[tuple[str, Decision]]
    still_held: list[tuple[str, Decision]]


class Quarantine:
    def __init__(
        self,
        queue: QueueStore,
        spool: Spool,
        audit: AuditLog,
        reports: Reports,
        gate: PolicyGate,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.queue = queue
        self.spool = spool
        self.audit = audit
        self.reports = reports
        self.gate = gate
        self.clock = clock

    @property
    def engine(self) -> Engine:
        return self.queue.engine

    def show(self, message_id: str, actor: str) -> bytes:
        """The held message itself, for an admin; the look is audited first."""
        rows = self.queue.held(message_id)
        if not rows:
            raise NotHeld(message_id)
        content = self.spool.load(message_id)
        with session_scope(self.engine) as session:
            self.audit.record(
                session,
                AuditEntry(
                    AuditAction.QUARANTINE_SHOWN,
                    actor,
                    message_id=message_id,
                    detail=f"held for {', '.join(r.recipient for r in rows)}",
                ),
                self.clock(),
            )
        return content

    def release(self, message_id: str, actor: str) -> Released:
        """Queue the held recipients the policy allows now; the rest stay held."""
        rows = self.queue.held(message_id)
        if not rows:
            raise NotHeld(message_id)
        # Decided before the rows are locked: the registry read needs no lock.
        decisions = self.gate.recheck(rows[0].username, [r.recipient for r in rows])
        now = self.clock()
        result = Released([], [])
        with session_scope(self.engine) as session:
            taken = QueueStore.take_held(session, message_id)
            if not taken:
                raise NotHeld(message_id)
            for row in taken:
                decision = decide_release(decisions[row.address])
                if decision.outcome is Outcome.ALLOW:
                    QueueStore.release(
                        session, row, QueuedRecipient.decided(row.address, decision), now
                    )
                    result.released.append((row.address, decision))
                    action = AuditAction.MESSAGE_RELEASED
                else:
                    result.still_held.append((row.address, decision))
                    action = AuditAction.MESSAGE_STILL_HELD
                self._audit(session, action, actor, row, decision, now)
        return result

    def reject(self, message_id: str, actor: str, reason: str | None = None) -> list[str]:
        """Fail every held recipient and bounce the sender; the rejected addresses."""
        detail = f"rejected: {' '.join(reason.split())}" if reason else "rejected"
        return self._reject(
            message_id,
            actor,
            lambda address: replies.rejected_from_quarantine(address, reason),
            detail,
        )

    def expire(self, retention: timedelta) -> list[str]:
        """Reject what was held longer than ``retention``; the message ids."""
        held_for = format_duration(retention)
        expired = []
        for message_id in self.queue.held_before(self.clock() - retention):
            try:
                self._reject(
                    message_id,
                    "gateway",
                    lambda address: replies.held_too_long(address, held_for),
                    f"held longer than {held_for} (CGW_QUARANTINE_RETENTION)",
                )
            except NotHeld:
                continue  # released or rejected meanwhile
            except Exception:
                # One message that cannot be rejected must not keep the rest held.
                log.exception("could not return held message %s to its sender", message_id)
                continue
            expired.append(message_id)
        return expired

    def _reject(
        self, message_id: str, actor: str, reply_for: Callable[[str], str], detail: str
    ) -> list[str]:
        original = self._original(message_id)
        now = self.clock()
        with self.spool.batch() as batch, session_scope(self.engine) as session:
            taken = QueueStore.take_held(session, message_id)
            if not taken:
                raise NotHeld(message_id)
            message = session.get(QueueMessage, message_id)
            assert message is not None
            replies_for = [reply_for(r.address) for r in taken]
            failed = [
                FailedRecipient(r.address, failure_status(reply), reply)
                for r, reply in zip(taken, replies_for, strict=True)
            ]
            # The bounce is sealed before the audit head is locked: every
            # other audited write waits for that lock, and not for an fsync.
            reports = self.reports.owed(
                batch,
                "" if message.is_bounce else message.mail_from,
                original,
                message_id,
                now,
                failed=failed,
                arrived=message.received_at,
            )
            for row, rejected in zip(taken, failed, strict=True):
                QueueStore.reject(session, row, rejected.diagnostic, now)
                self._audit(session, AuditAction.MESSAGE_REJECTED, actor, row, None, now, detail)
            store_inline(session, batch.inline, now)
            self.reports.enqueue(session, reports, now)
            complete = QueueStore.close_if_complete(session, message_id, now)
        if complete:
            try:
                self.spool.release(message_id, message.size)
            except OSError:
                log.warning("rejected %s; its spool file stays until the next start", message_id)
        return [row.address for row in taken]

    def _original(self, message_id: str) -> bytes:
        """The held message, for the header block its bounce quotes; empty if unreadable.

        A damaged or missing file must not stop the rejection: the bounce
        then quotes no header, and the recipients are still failed.
        """
        try:
            return self.spool.load(message_id)
        except (OSError, SealError) as exc:
            log.warning("held message %s cannot be read (%s); bouncing without it", message_id, exc)
            return b""

    def _audit(
        self,
        session: Session,
        action: AuditAction,
        actor: str,
        row: QueueRecipient,
        decision: Decision | None,
        now: datetime,
        detail: str | None = None,
    ) -> None:
        self.audit.record(
            session,
            AuditEntry(
                action=action,
                actor=actor,
                message_id=row.message_id,
                queue_id=row.id,
                patient_id=decision.patient_id if decision else row.patient_id,
                consent_id=decision.consent_id if decision else None,
                recipient=row.address,
                decision=decision.outcome.value if decision else None,
                reason=decision.reason.value if decision else row.reason,
                detail=detail or (f"protection {decision.protection.value}" if decision else None),
            ),
            now,
        )


class RetentionSweep:
    """The gateway's stage that rejects holds older than the retention setting.

    It sleeps until the oldest hold runs out (at most ``SWEEP_SECONDS``), or
    until ``wake`` says a message was held meanwhile.
    """

    def __init__(self, quarantine: Quarantine, retention: timedelta) -> None:
        self.quarantine = quarantine
        self.retention = retention
        self._wake = asyncio.Event()
        self._stopping = False

    def stop(self) -> None:
        """End ``run`` after its current step (see ``DeliveryWorker.stop``)."""
        self._stopping = True
        self._wake.set()

    def wake(self) -> None:
        """Something was held. Only a retention shorter than the sweep's own
        interval can expire before the sweep looks anyway."""
        if self.retention.total_seconds() < SWEEP_SECONDS:
            self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            timeout = SWEEP_SECONDS
            try:
                expired = await asyncio.to_thread(self.quarantine.expire, self.retention)
                if expired:
                    log.info("rejected %d messages held too long: %s", len(expired), expired)
                oldest = await asyncio.to_thread(self.quarantine.queue.oldest_held)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("quarantine retention sweep failed; trying again later")
                oldest = None
            if oldest is not None:
                due = oldest + self.retention - self.quarantine.clock()
                timeout = min(SWEEP_SECONDS, max(due.total_seconds(), 0.05))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
