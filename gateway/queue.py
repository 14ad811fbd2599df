"""The delivery queue: per-recipient state in the database, with leased claims.

States: ``queued`` (new) and ``deferred`` (a 4xx or a connection failure;
``next_attempt_at`` says when) are due for delivery; ``delivered`` and
``failed`` are final. A worker *claims* due rows for a lease; a claim that
is never finished (the process died) lapses when the lease expires, and an
instance releases its own claims when it starts again. Delivery is therefore
at least once: a message is sent twice only if the process dies between the
next hop's 250 and the update below.
"""

from __future__ import annotations

import enum
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from consent_registry.db import session_scope
from consent_registry.models import QueueMessage, QueueRecipient
from gateway.audit import AuditAction, AuditEntry, AuditLog, storable
from policies.retry import expired, next_attempt


class RecipientState(enum.StrEnum):
    QUEUED = "queued"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"
    QUARANTINED = "quarantined"  # held by policy; released or rejected by an admin


DUE_STATES = (RecipientState.QUEUED.value, RecipientState.DEFERRED.value)
# A message's sealed content stays in the spool while any recipient is open.
OPEN_STATES = (*DUE_STATES, RecipientState.QUARANTINED.value)


class Verdict(enum.StrEnum):
    """What the next hop made of one recipient."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True)
class RecipientResult:
    verdict: Verdict
    reply: str


@dataclass(frozen=True)
class QueuedRecipient:
    """A recipient as accepted: the policy's decision travels with it."""

    address: str
    protection: str = "none"
    reason: str | None = None
    patient_id: int | None = None
    certificate_id: int | None = None
    quarantined: bool = False


@dataclass(frozen=True)
class ClaimedRecipient:
    row_id: int
    address: str
    attempts: int
    protection: str = "none"
    certificate_id: int | None = None
    patient_id: int | None = None


@dataclass(frozen=True)
class ClaimedMessage:
    message_id: str
    mail_from: str
    received_at: datetime
    recipients: tuple[ClaimedRecipient, ...]
    is_bounce: bool = False
    username: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    backoff: timedelta
    backoff_max: timedelta
    lifetime: timedelta


@dataclass(frozen=True)
class Finished:
    """After one delivery attempt: is the message complete, and who failed for good."""

    complete: bool
    failed: list[tuple[str, str]]


@dataclass(frozen=True)
class QueueRow:
    message_id: str
    mail_from: str
    recipient: str
    state: str
    attempts: int
    next_attempt_at: datetime
    received_at: datetime
    last_error: str | None
    reason: str | None = None
    username: str | None = None


class QueueStore:
    def __init__(
        self, engine: Engine, instance: str, lease: timedelta, audit: AuditLog | None = None
    ) -> None:
        self.engine = engine
        self.instance = instance
        self.lease = lease
        self.audit = audit

    @staticmethod
    def enqueue(
        session: Session,
        message_id: str,
        mail_from: str,
        username: str | None,
        size: int,
        recipients: Sequence[QueuedRecipient],
        now: datetime,
        is_bounce: bool = False,
    ) -> None:
        """Add a message and its recipients in the caller's transaction."""
        session.add(
            QueueMessage(
                id=message_id,
                mail_from=mail_from,
                username=username,
                size=size,
                received_at=now,
                is_bounce=is_bounce,
            )
        )
        for rcpt in recipients:
            state = RecipientState.QUARANTINED if rcpt.quarantined else RecipientState.QUEUED
            session.add(
                QueueRecipient(
                    message_id=message_id,
                    address=rcpt.address,
                    state=state.value,
                    next_attempt_at=now,
                    updated_at=now,
                    protection=rcpt.protection,
                    reason=rcpt.reason,
                    patient_id=rcpt.patient_id,
                    certificate_id=rcpt.certificate_id,
                )
            )

    def release_own_claims(self) -> int:
        """At start: claims this instance held before it died are free again."""
        with session_scope(self.engine) as session:
            result = session.execute(
                update(QueueRecipient)
                .where(col(QueueRecipient.claimed_by) == self.instance)
                .values(claimed_by=None, claimed_until=None)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def claim_due(self, now: datetime, limit: int) -> list[ClaimedMessage]:
        with session_scope(self.engine) as session:
            query = (
                select(QueueRecipient)
                .where(col(QueueRecipient.state).in_(DUE_STATES))
                .where(col(QueueRecipient.next_attempt_at) <= now)
                .where(
                    (col(QueueRecipient.claimed_until).is_(None))
                    | (col(QueueRecipient.claimed_until) < now)
                )
                .order_by(col(QueueRecipient.next_attempt_at))
                .limit(limit)
            )
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = session.exec(query).all()
            by_message: dict[str, list[ClaimedRecipient]] = defaultdict(list)
            for row in rows:
                row.claimed_by = self.instance
                row.claimed_until = now + self.lease
                session.add(row)
                assert row.id is not None
                by_message[row.message_id].append(
                    ClaimedRecipient(
                        row.id,
                        row.address,
                        row.attempts,
                        row.protection,
                        row.certificate_id,
                        row.patient_id,
                    )
                )
            if not by_message:
                return []
            messages = session.exec(
                select(QueueMessage).where(col(QueueMessage.id).in_(list(by_message)))
            ).all()
            return [
                ClaimedMessage(
                    m.id,
                    m.mail_from,
                    m.received_at,
                    tuple(by_message[m.id]),
                    m.is_bounce,
                    m.username,
                )
                for m in messages
            ]

    def finish(
        self,
        claimed: ClaimedMessage,
        results: dict[str, RecipientResult],
        now: datetime,
        retry: RetryPolicy,
    ) -> Finished:
        """Record what the next hop said, and which recipients failed for good now."""
        failed: list[tuple[str, str]] = []
        with session_scope(self.engine) as session:
            for claimed_rcpt in claimed.recipients:
                row = session.get(QueueRecipient, claimed_rcpt.row_id)
                assert row is not None
                result = results[claimed_rcpt.address]
                self._apply(session, row, result, claimed, now, retry)
                if row.state == RecipientState.FAILED.value:
                    failed.append((row.address, row.last_error or ""))
            open_rows = session.exec(
                select(QueueRecipient.id)
                .where(QueueRecipient.message_id == claimed.message_id)
                .where(col(QueueRecipient.state).in_(OPEN_STATES))
            ).first()
            if open_rows is not None:
                return Finished(False, failed)
            message = session.get(QueueMessage, claimed.message_id)
            assert message is not None
            message.done_at = now
            session.add(message)
            return Finished(True, failed)

    def _apply(
        self,
        session: Session,
        row: QueueRecipient,
        result: RecipientResult,
        claimed: ClaimedMessage,
        now: datetime,
        retry: RetryPolicy,
    ) -> None:
        verdict, reply = result.verdict, storable(result.reply)
        if verdict is Verdict.DEFERRED and expired(claimed.received_at, now, retry.lifetime):
            verdict, reply = Verdict.FAILED, f"queue lifetime exceeded; last error: {reply}"
        row.attempts += 1
        row.last_error = None if verdict is Verdict.DELIVERED else reply
        row.claimed_by = None
        row.claimed_until = None
        row.updated_at = now
        if verdict is Verdict.DEFERRED:
            row.state = RecipientState.DEFERRED.value
            row.next_attempt_at = next_attempt(
                row.attempts, now, retry.backoff, retry.backoff_max, random.random()
            )
            action = AuditAction.MESSAGE_DEFERRED
        elif verdict is Verdict.DELIVERED:
            row.state = RecipientState.DELIVERED.value
            action = AuditAction.MESSAGE_DELIVERED
        else:
            row.state = RecipientState.FAILED.value
            action = AuditAction.MESSAGE_FAILED
        session.add(row)
        assert self.audit is not None, "a delivering queue writes the audit log"
        self.audit.record(
            session,
            AuditEntry(
                action=action,
                actor="gateway",
                message_id=claimed.message_id,
                queue_id=row.id,
                patient_id=row.patient_id,
                recipient=row.address,
                detail=reply,
            ),
            now,
        )

    def failed_recipients(self, message_id: str) -> list[tuple[str, str]]:
        """(address, last error) of the recipients that failed for good."""
        with Session(self.engine) as session:
            rows = session.exec(
                select(QueueRecipient.address, QueueRecipient.last_error)
                .where(QueueRecipient.message_id == message_id)
                .where(QueueRecipient.state == RecipientState.FAILED.value)
            ).all()
            return [(address, error or "") for address, error in rows]

    def open_message_ids(self) -> set[str]:
        """Messages not yet complete: their spool files must be kept."""
        with Session(self.engine) as session:
            ids = session.exec(select(QueueMessage.id).where(col(QueueMessage.done_at).is_(None)))
            return set(ids.all())

    def next_due(self) -> datetime | None:
        with Session(self.engine) as session:
            return session.exec(
                select(QueueRecipient.next_attempt_at)
                .where(col(QueueRecipient.state).in_(DUE_STATES))
                .order_by(col(QueueRecipient.next_attempt_at))
                .limit(1)
            ).first()

    def retry_now(self, message_id: str, now: datetime) -> int:
        """Make a message's deferred recipients due at once; how many there were."""
        with session_scope(self.engine) as session:
            rows = session.exec(
                select(QueueRecipient)
                .where(QueueRecipient.message_id == message_id)
                .where(QueueRecipient.state == RecipientState.DEFERRED.value)
            ).all()
            for row in rows:
                row.next_attempt_at = now
                session.add(row)
            return len(rows)

    def held(self) -> list[QueueRow]:
        """Recipients held by policy (quarantined), oldest message first."""
        return [row for row in self.pending() if row.state == RecipientState.QUARANTINED.value]

    def pending(self) -> list[QueueRow]:
        """Every recipient not yet delivered or failed, oldest message first."""
        with Session(self.engine) as session:
            rows = session.exec(
                select(QueueRecipient, QueueMessage)
                .join(QueueMessage, col(QueueMessage.id) == QueueRecipient.message_id)
                .where(col(QueueRecipient.state).in_(OPEN_STATES))
                .order_by(col(QueueMessage.received_at), col(QueueRecipient.id))
            ).all()
            return [
                QueueRow(
                    message_id=m.id,
                    mail_from=m.mail_from,
                    recipient=r.address,
                    state=r.state,
                    attempts=r.attempts,
                    next_attempt_at=r.next_attempt_at,
                    received_at=m.received_at,
                    last_error=r.last_error,
                    reason=r.reason,
                    username=m.username,
                )
                for r, m in rows
            ]
