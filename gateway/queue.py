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
import functools
import random
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, bindparam, case, exists, func, insert, or_, update
from sqlalchemy import select as select_columns
from sqlmodel import Session, col, select

from consent_registry.db import session_scope
from consent_registry.driver_statements import DriverStatement
from consent_registry.models import QueueMessage, QueueRecipient
from consent_registry.writes import DirectWrites, Writes
from gateway.audit import AuditAction, AuditEntry, AuditLog
from gateway.headers import storable
from gateway.spool import forget_inline
from policies.decision import Decision, Outcome
from policies.retry import expired, next_attempt


def new_message_id(now: datetime) -> str:
    """Time-ordered, unguessable queue id (like Postfix's long queue ids)."""
    return f"{int(now.timestamp() * 1000):011X}{secrets.token_hex(5).upper()}"


class RecipientState(enum.StrEnum):
    QUEUED = "queued"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"
    QUARANTINED = "quarantined"  # held by policy; released or rejected by an admin


DUE_STATES = (RecipientState.QUEUED.value, RecipientState.DEFERRED.value)
# A message's sealed content stays in the spool while any recipient is open.
OPEN_STATES = (*DUE_STATES, RecipientState.QUARANTINED.value)
# Claiming due recipients, built once (claims run for every batch delivered).
_DUE = (
    select_columns(
        col(QueueRecipient.id),
        col(QueueRecipient.message_id),
        col(QueueRecipient.address),
        col(QueueRecipient.attempts),
        col(QueueRecipient.protection),
        col(QueueRecipient.certificate_id),
        col(QueueRecipient.patient_id),
        col(QueueRecipient.since),
    )
    .where(col(QueueRecipient.state).in_(DUE_STATES))
    .where(col(QueueRecipient.next_attempt_at) <= bindparam("now"))
    .where(
        (col(QueueRecipient.claimed_until).is_(None))
        | (col(QueueRecipient.claimed_until) < bindparam("now"))
    )
    .order_by(col(QueueRecipient.next_attempt_at))
    .limit(bindparam("limit"))
)
# Other instances skip rows one has locked instead of waiting for them.
_DUE_FOR_UPDATE = _DUE.with_for_update(skip_locked=True)
_TAKE = (
    update(QueueRecipient)
    .where(col(QueueRecipient.id).in_(bindparam("ids", expanding=True)))
    .values(claimed_by=bindparam("by"), claimed_until=bindparam("until"))
)
_CLAIMED_MESSAGES = select_columns(
    col(QueueMessage.id),
    col(QueueMessage.mail_from),
    col(QueueMessage.received_at),
    col(QueueMessage.is_bounce),
    col(QueueMessage.username),
    col(QueueMessage.size),
).where(col(QueueMessage.id).in_(bindparam("ids", expanding=True)))
# Built once: building a statement cost about as much as running it. Those
# the writer runs for every message run on the driver's cursor.
_INSERT_MESSAGE = DriverStatement(insert(QueueMessage))
_INSERT_RECIPIENTS = DriverStatement(insert(QueueRecipient))
# Queueing recipients already claimed: their ids.
_INSERT_RETURNING_IDS = DriverStatement(insert(QueueRecipient).returning(col(QueueRecipient.id)))
_NEXT_DUE = select_columns(
    func.min(
        case(
            (
                col(QueueRecipient.claimed_until) > col(QueueRecipient.next_attempt_at),
                col(QueueRecipient.claimed_until),
            ),
            else_=col(QueueRecipient.next_attempt_at),
        )
    )
).where(col(QueueRecipient.state).in_(DUE_STATES))
# Closing a message whose last recipient is settled.
_LOCK_MESSAGE = DriverStatement(
    select_columns(col(QueueMessage.id))
    .where(col(QueueMessage.id) == bindparam("id"))
    .with_for_update()
)
_CLOSE = DriverStatement(
    update(QueueMessage)
    .where(col(QueueMessage.id) == bindparam("message_id"))
    .where(
        ~exists()
        .where(col(QueueRecipient.message_id) == bindparam("message_id"))
        # One comparison per state, not IN: a driver statement takes no expanding list.
        .where(or_(*(col(QueueRecipient.state) == state for state in OPEN_STATES)))
    )
    .values(done_at=bindparam("now"))
)


@functools.cache
def _settling(columns: frozenset[str]) -> DriverStatement:
    """The UPDATE that settles one recipient, for the columns a verdict sets
    (one per kind of verdict, built once: building it cost more than running it)."""
    return DriverStatement(
        update(QueueRecipient)
        .where(col(QueueRecipient.id) == bindparam("row_id"))
        .values({name: bindparam(f"new_{name}") for name in sorted(columns)})
    )


class Verdict(enum.StrEnum):
    """What the next hop made of one recipient."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"
    HELD = "held"  # not sent: the policy now holds it (back to the quarantine)


@dataclass(frozen=True)
class RecipientResult:
    verdict: Verdict
    reply: str
    reason: str | None = None  # the policy's reason code, when the policy decided it


@dataclass(frozen=True)
class QueuedRecipient:
    """A recipient as accepted: the policy's decision travels with it."""

    address: str
    protection: str = "none"
    reason: str | None = None
    patient_id: int | None = None
    certificate_id: int | None = None
    quarantined: bool = False

    @classmethod
    def decided(cls, address: str, decision: Decision) -> QueuedRecipient:
        return cls(
            address=address,
            protection=decision.protection.value,
            reason=decision.reason.value,
            patient_id=decision.patient_id,
            certificate_id=decision.certificate_id,
            quarantined=decision.outcome is Outcome.QUARANTINE,
        )


@dataclass(frozen=True)
class ClaimedRecipient:
    row_id: int
    address: str
    attempts: int
    protection: str = "none"
    certificate_id: int | None = None
    patient_id: int | None = None
    since: datetime | None = None  # when this stay in the queue began (lifetime counts from it)


@dataclass(frozen=True)
class ClaimedMessage:
    message_id: str
    mail_from: str
    received_at: datetime
    recipients: tuple[ClaimedRecipient, ...]
    is_bounce: bool = False
    username: str | None = None
    size: int = 0  # octets as stored (what delivering it will hold in memory)
    # The plaintext, when intake hands a small message over in memory (the
    # spooled copy is the same octets, sealed); None: delivery loads it.
    content: bytes | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Claim:
    """Who claims new recipients as they are queued, and for how long (see ``enqueue``)."""

    by: str
    until: datetime


@dataclass(frozen=True)
class RetryPolicy:
    backoff: timedelta
    backoff_max: timedelta
    lifetime: timedelta


def settle(
    claimed: ClaimedMessage, results: dict[str, RecipientResult], now: datetime, lifetime: timedelta
) -> dict[str, RecipientResult]:
    """The results as they will be recorded: a deferral past the queue lifetime fails.

    The lifetime counts from each recipient's ``since`` (its arrival, or its
    release from the quarantine). Worked out before the transaction, so that
    the bounce for these failures can be stored in the spool first and
    queued in that same transaction.
    """
    settled = dict(results)
    for rcpt in claimed.recipients:
        result = settled[rcpt.address]
        since = rcpt.since or claimed.received_at
        if result.verdict is Verdict.DEFERRED and expired(since, now, lifetime):
            settled[rcpt.address] = RecipientResult(
                Verdict.FAILED, f"queue lifetime exceeded; last error: {result.reply}"
            )
    return settled


@dataclass(frozen=True)
class QueueStats:
    """How the queue stands, for ``cgw status`` and monitoring."""

    queued: int
    deferred: int
    held_recipients: int
    held_messages: int
    oldest_deferred: datetime | None  # since when the longest-waiting deferred recipient waits


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
        self,
        engine: Engine,
        instance: str,
        lease: timedelta,
        audit: AuditLog | None = None,
        writes: Writes | None = None,
    ) -> None:
        self.engine = engine
        self.instance = instance
        self.lease = lease
        self.audit = audit
        # The gateway's claims and results go through its group commit.
        self.writes = writes or DirectWrites(engine)

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
        claim: Claim | None = None,
    ) -> tuple[ClaimedRecipient, ...]:
        """Add a message and its recipients in the caller's transaction.

        Core inserts (two statements, however many recipients): this runs for
        every message accepted and every report, where the ORM's unit of
        work cost more than the inserts.

        With ``claim``, the recipients due now are inserted already claimed,
        and returned as claimed: the caller hands them straight to delivery,
        without a claim transaction or a poll. Should the caller die first,
        the claim lapses like any other.
        """
        connection = session.connection()
        _INSERT_MESSAGE.run(
            connection,
            {
                "id": message_id,
                "mail_from": mail_from,
                "username": username,
                "size": size,
                "received_at": now,
                "is_bounce": is_bounce,
            },
        )
        rows = [
            {
                "message_id": message_id,
                "address": rcpt.address,
                "state": (
                    RecipientState.QUARANTINED if rcpt.quarantined else RecipientState.QUEUED
                ).value,
                "next_attempt_at": now,
                "updated_at": now,
                "since": now,
                "protection": rcpt.protection,
                "reason": rcpt.reason,
                "patient_id": rcpt.patient_id,
                "certificate_id": rcpt.certificate_id,
                "attempts": 0,
                "claimed_by": None if claim is None or rcpt.quarantined else claim.by,
                "claimed_until": None if claim is None or rcpt.quarantined else claim.until,
            }
            for rcpt in recipients
        ]
        if claim is None:
            _INSERT_RECIPIENTS.run_many(connection, rows)
            return ()
        ids = [int(row_id) for (row_id,) in _INSERT_RETURNING_IDS.fetch(connection, rows)]
        return tuple(
            ClaimedRecipient(
                row_id,
                rcpt.address,
                0,
                rcpt.protection,
                rcpt.certificate_id,
                rcpt.patient_id,
                now,
            )
            for row_id, rcpt in zip(ids, recipients, strict=True)
            if not rcpt.quarantined
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

    def claim_due(self, now: datetime, messages: int) -> list[ClaimedMessage]:
        """Claim the due recipients of at most ``messages`` messages, for the lease.

        The worker runs one task per message, so this bounds what is in
        flight (and what a crash can leave half-recorded).
        """
        if messages <= 0:
            return []
        return self.writes.run(ClaimDue(self.instance, self.lease, now, messages))

    async def finish(
        self,
        claimed: ClaimedMessage,
        results: dict[str, RecipientResult],
        now: datetime,
        retry: RetryPolicy,
        within: Callable[[Session], None] | None = None,
    ) -> bool:
        """Record settled results (see ``settle``); True when the message is
        complete, once committed (awaited on delivery's event loop).

        ``within`` adds to the same transaction (the bounce for these results);
        like the transaction itself, it must pickle (see ``ClaimDue``).
        """
        assert self.audit is not None, "a delivering queue writes the audit log"
        # The transaction needs the rows, not the message: no copy of it to the writer.
        rows = replace(claimed, content=None)
        # Deferrable: nothing waits for this commit but the delivery slot.
        return await self.writes.commit(
            FinishDelivery(self.audit, rows, results, now, retry, within), deferrable=True
        )

    @staticmethod
    def close_if_complete(session: Session, message_id: str, now: datetime) -> bool:
        """Mark the message done when no recipient is open any more; its inline
        spool copy goes with it.

        The message row is locked first: two transactions closing the last
        two open recipients of one message (a delivery and a reject) then
        run one after the other, and the second sees the first's change.
        """
        session.flush()  # recipients the caller changed through the ORM count as changed
        connection = session.connection()
        if connection.dialect.name == "postgresql":  # SQLite's writers take turns anyway
            _LOCK_MESSAGE.fetch(connection, [{"id": message_id}])
        closed = _CLOSE.run(connection, {"message_id": message_id, "now": now})
        if closed:
            forget_inline(session, message_id)  # a file copy goes after the commit
        return bool(closed)

    @staticmethod
    def apply(
        connection: Connection,
        row_id: int,
        attempts: int,
        result: RecipientResult,
        now: datetime,
        retry: RetryPolicy,
    ) -> AuditAction:
        """One recipient's settled result, as one UPDATE; the audit action it is."""
        verdict, reply = result.verdict, storable(result.reply)
        values: dict[str, object] = {
            "attempts": attempts + 1,
            "last_error": None if verdict is Verdict.DELIVERED else reply,
            "claimed_by": None,
            "claimed_until": None,
            "updated_at": now,
        }
        if verdict is Verdict.DEFERRED:
            values["state"] = RecipientState.DEFERRED.value
            values["next_attempt_at"] = next_attempt(
                attempts + 1, now, retry.backoff, retry.backoff_max, random.random()
            )
            action = AuditAction.MESSAGE_DEFERRED
        elif verdict is Verdict.DELIVERED:
            values["state"] = RecipientState.DELIVERED.value
            action = AuditAction.MESSAGE_DELIVERED
        elif verdict is Verdict.HELD:
            values["state"] = RecipientState.QUARANTINED.value
            values["reason"] = result.reason
            values["since"] = now
            action = AuditAction.MESSAGE_QUARANTINED
        else:
            values["state"] = RecipientState.FAILED.value
            action = AuditAction.MESSAGE_FAILED
        _settling(frozenset(values)).run(
            connection,
            {"row_id": row_id, **{f"new_{name}": value for name, value in values.items()}},
        )
        return action

    @staticmethod
    def take_held(session: Session, message_id: str) -> list[QueueRecipient]:
        """A message's held recipients, locked against a concurrent release or reject.

        The no-op update takes the locks (row locks on PostgreSQL, the write
        lock on SQLite) before the read, so whoever comes second finds the rows
        already moved on.
        """
        held = (col(QueueRecipient.message_id) == message_id) & (
            col(QueueRecipient.state) == RecipientState.QUARANTINED.value
        )
        session.execute(update(QueueRecipient).where(held).values(state=QueueRecipient.state))
        return list(
            session.exec(select(QueueRecipient).where(held).order_by(col(QueueRecipient.id)))
        )

    @staticmethod
    def release(
        session: Session, row: QueueRecipient, now_allowed: QueuedRecipient, now: datetime
    ) -> None:
        """A held recipient becomes due, with what the policy decides now."""
        row.state = RecipientState.QUEUED.value
        row.next_attempt_at = row.updated_at = row.since = now
        row.protection = now_allowed.protection
        row.reason = now_allowed.reason
        row.patient_id = now_allowed.patient_id
        row.certificate_id = now_allowed.certificate_id
        session.add(row)

    @staticmethod
    def reject(session: Session, row: QueueRecipient, reply: str, now: datetime) -> None:
        """A held recipient fails for good (the sender gets a bounce)."""
        row.state = RecipientState.FAILED.value
        row.last_error = storable(reply)
        row.updated_at = now
        session.add(row)

    def held_before(self, cutoff: datetime) -> list[str]:
        """Messages with recipients held since before ``cutoff``, longest held first."""
        held = QueueRecipient.state == RecipientState.QUARANTINED.value
        with Session(self.engine) as session:
            return list(
                session.exec(
                    select(QueueRecipient.message_id)
                    .where(held)
                    .where(col(QueueRecipient.since) < cutoff)
                    .group_by(col(QueueRecipient.message_id))
                    .order_by(func.min(QueueRecipient.since))
                ).all()
            )

    def oldest_held(self) -> datetime | None:
        """When the longest current hold began."""
        with Session(self.engine) as session:
            return session.exec(
                select(func.min(QueueRecipient.since)).where(
                    QueueRecipient.state == RecipientState.QUARANTINED.value
                )
            ).one()

    def stats(self) -> QueueStats:
        """Counts by state in one grouped query, plus the oldest deferred arrival."""
        with Session(self.engine) as session:
            counts = dict(
                session.exec(
                    select(QueueRecipient.state, func.count())
                    .where(col(QueueRecipient.state).in_(OPEN_STATES))
                    .group_by(col(QueueRecipient.state))
                ).all()
            )
            held_messages = session.exec(
                select(func.count(func.distinct(QueueRecipient.message_id))).where(
                    QueueRecipient.state == RecipientState.QUARANTINED.value
                )
            ).one()
            oldest = session.exec(
                select(func.min(QueueRecipient.since)).where(
                    QueueRecipient.state == RecipientState.DEFERRED.value
                )
            ).one()
        return QueueStats(
            queued=counts.get(RecipientState.QUEUED.value, 0),
            deferred=counts.get(RecipientState.DEFERRED.value, 0),
            held_recipients=counts.get(RecipientState.QUARANTINED.value, 0),
            held_messages=held_messages,
            oldest_deferred=oldest,
        )

    def open_message_ids(self) -> set[str]:
        """Messages not yet complete: their spool files must be kept."""
        with Session(self.engine) as session:
            ids = session.exec(select(QueueMessage.id).where(col(QueueMessage.done_at).is_(None)))
            return set(ids.all())

    def finished_among(self, message_ids: Iterable[str]) -> set[str]:
        """Which of these messages are complete: their spool copies may go at once.

        A copy outlives its message only when the process died between the
        commit that finished it and the removal; nothing can still need it.
        """
        wanted = list(message_ids)
        finished: set[str] = set()
        with Session(self.engine) as session:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                finished.update(
                    session.exec(
                        select(QueueMessage.id)
                        .where(col(QueueMessage.id).in_(chunk))
                        .where(col(QueueMessage.done_at).is_not(None))
                    ).all()
                )
        return finished

    def next_due(self) -> datetime | None:
        """When the next recipient can be claimed: its retry time or, while
        claimed, when the claim lapses (claims in flight are not due)."""
        with self.engine.connect() as connection:
            return connection.execute(_NEXT_DUE).scalar()

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

    def held(self, message_id: str | None = None) -> list[QueueRow]:
        """Recipients held by policy (quarantined), oldest message first."""
        return self.pending((RecipientState.QUARANTINED.value,), message_id)

    def pending(
        self, states: Sequence[str] = OPEN_STATES, message_id: str | None = None
    ) -> list[QueueRow]:
        """Every recipient not yet delivered or failed, oldest message first."""
        query = (
            select(QueueRecipient, QueueMessage)
            .join(QueueMessage, col(QueueMessage.id) == QueueRecipient.message_id)
            .where(col(QueueRecipient.state).in_(states))
            .order_by(col(QueueMessage.received_at), col(QueueRecipient.id))
        )
        if message_id is not None:
            query = query.where(QueueRecipient.message_id == message_id)
        with Session(self.engine) as session:
            rows = session.exec(query).all()
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


@dataclass(frozen=True)
class ClaimDue:
    """The transaction that claims due recipients of at most ``messages`` messages.

    Write transactions are values, not closures: with several worker
    processes on SQLite, one writer process runs them all
    (``consent_registry.writes``), so they must pickle.
    """

    instance: str
    lease: timedelta
    now: datetime
    messages: int

    def __call__(self, session: Session) -> list[ClaimedMessage]:
        connection = session.connection()
        now = self.now
        messages = self.messages
        due = _DUE_FOR_UPDATE if connection.dialect.name == "postgresql" else _DUE
        rows = connection.execute(due, {"now": now, "limit": messages * 8}).all()
        chosen = set(list(dict.fromkeys(row.message_id for row in rows))[:messages])
        rows = [row for row in rows if row.message_id in chosen]
        if not rows:
            return []
        connection.execute(
            _TAKE,
            {"ids": [row.id for row in rows], "by": self.instance, "until": now + self.lease},
        )
        by_message: dict[str, list[ClaimedRecipient]] = defaultdict(list)
        for row in rows:
            by_message[row.message_id].append(
                ClaimedRecipient(
                    row.id,
                    row.address,
                    row.attempts,
                    row.protection,
                    row.certificate_id,
                    row.patient_id,
                    row.since,
                )
            )
        return [
            ClaimedMessage(
                m.id,
                m.mail_from,
                m.received_at,
                tuple(by_message[m.id]),
                m.is_bounce,
                m.username,
                m.size,
            )
            for m in connection.execute(_CLAIMED_MESSAGES, {"ids": list(by_message)})
        ]


@dataclass(frozen=True)
class FinishDelivery:
    """The transaction that records delivery results, with an audit entry each."""

    audit: AuditLog
    claimed: ClaimedMessage
    results: dict[str, RecipientResult]
    now: datetime
    retry: RetryPolicy
    within: Callable[[Session], None] | None

    def __call__(self, session: Session) -> bool:
        # What the claim read still holds: the rows are ours for the lease.
        connection = session.connection()
        claimed, now = self.claimed, self.now
        for rcpt in claimed.recipients:
            result = self.results[rcpt.address]
            action = QueueStore.apply(
                connection, rcpt.row_id, rcpt.attempts, result, now, self.retry
            )
            self.audit.record(
                session,
                AuditEntry(
                    action=action,
                    actor="gateway",
                    message_id=claimed.message_id,
                    queue_id=rcpt.row_id,
                    patient_id=rcpt.patient_id,
                    recipient=rcpt.address,
                    reason=result.reason,
                    detail=storable(result.reply),
                ),
                now,
            )
        if self.within is not None:
            self.within(session)
        return QueueStore.close_if_complete(session, claimed.message_id, now)
