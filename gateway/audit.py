"""The audit trail: every stage and every registry change writes through here.

An entry records who did what to which message, recipient or record, with the
decision and reason code: never a message body, subject or attachment name.
Entries are appended in the caller's transaction, so a change and its audit
entry commit together or not at all.

Entries form a chain: each one's hash is an HMAC (key under data_dir, or
``CGW_AUDIT_KEY``) over its content and the previous entry's hash, and the
numbers have no gaps. Someone with access to the database alone can change,
delete or reorder rows, but cannot make the chain verify again.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

from sqlalchemy import bindparam, insert, update
from sqlalchemy import select as select_columns
from sqlalchemy.event import listens_for
from sqlmodel import Session, col, select

from consent_registry.driver_statements import DriverStatement
from consent_registry.models import AuditEvent, AuditHead
from gateway.crypto_at_rest import load_or_create_secret
from gateway.headers import storable
from gateway.settings import Settings

GENESIS = "0" * 64


class AuditAction(enum.StrEnum):
    MESSAGE_ACCEPTED = "message.accepted"
    MESSAGE_DENIED = "message.denied"
    MESSAGE_DELIVERED = "message.delivered"
    MESSAGE_DEFERRED = "message.deferred"
    MESSAGE_FAILED = "message.failed"
    MESSAGE_QUARANTINED = "message.quarantined"
    MESSAGE_BOUNCED = "message.bounced"
    SENDER_NOTIFIED = "message.sender_notified"  # told that recipients are held
    MESSAGE_RELEASED = "message.released"
    MESSAGE_STILL_HELD = "message.still_held"  # a release the policy did not allow
    MESSAGE_REJECTED = "message.rejected"
    AUTH_FAILED = "auth.failed"
    AUTH_LOCKED_OUT = "auth.locked_out"
    USER_ADDED = "user.added"
    USER_DISABLED = "user.disabled"
    USER_PASSWORD_CHANGED = "user.password_changed"  # noqa: S105
    PATIENT_ADDED = "patient.added"
    PATIENT_EMAIL_ADDED = "patient.email_added"
    RELATIONSHIP_ADDED = "relationship.added"
    RELATIONSHIP_ENDED = "relationship.ended"
    CONSENT_GRANTED = "consent.granted"
    CONSENT_REVOKED = "consent.revoked"
    CONSENTS_EXPORTED = "consent.exported"
    CERTIFICATE_IMPORTED = "certificate.imported"
    QUEUE_RETRIED = "queue.retried"
    AUDIT_EXPORTED = "audit.exported"
    QUARANTINE_SHOWN = "quarantine.shown"


@dataclass(frozen=True)
class AuditEntry:
    """What one audit line says; ids and codes only."""

    action: AuditAction
    actor: str
    message_id: str | None = None
    queue_id: int | None = None
    patient_id: int | None = None
    consent_id: int | None = None
    username: str | None = None
    recipient: str | None = None
    decision: str | None = None
    reason: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class Break:
    """The first place the chain does not hold."""

    seq: int
    problem: str


class AuditLog:
    """Appends chained entries and verifies the chain; holds the HMAC key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the audit key needs at least 32 bytes")
        self._key = key

    def record(self, session: Session, entry: AuditEntry, now: datetime) -> None:
        """Append one entry in the caller's transaction (taking the head's lock).

        The head is locked and read at the transaction's first entry; the
        entries are written when it commits, with the head moved once, in
        two statements however many entries there are. An entry is appended
        for every message accepted and every delivery, and under group commit
        one transaction holds dozens: per-entry statements and ORM objects
        were a sixth of the gateway's CPU. Entries belong to the outer
        transaction, so no entry may be recorded inside a SAVEPOINT.
        """
        assert not session.in_nested_transaction(), "audit entries belong to the outer transaction"
        chain = _chain_of(session)
        seq = chain.seq + 1
        row: dict[str, object] = {
            "seq": seq,
            "at": now,
            "actor": entry.actor,
            "action": entry.action.value,
            "message_id": entry.message_id,
            "queue_id": entry.queue_id,
            "patient_id": entry.patient_id,
            "consent_id": entry.consent_id,
            "username": entry.username,
            "recipient": storable(entry.recipient) if entry.recipient else None,
            "decision": entry.decision,
            "reason": entry.reason,
            "detail": storable(entry.detail)[:500] if entry.detail else None,
            "prev_hash": chain.hash or GENESIS,
        }
        row["hash"] = hash_ = self._seal(row)
        chain.append(row, seq, hash_, self._head_mac(seq, hash_))

    def _head_mac(self, seq: int, hash_: str | None) -> str:
        return hmac.new(self._key, f"head|{seq}|{hash_}".encode(), hashlib.sha256).hexdigest()

    def seal(self, event: AuditEvent) -> str:
        return self._seal({name: getattr(event, name) for name in _CHAINED})

    def _seal(self, row: Mapping[str, object]) -> str:
        return hmac.new(self._key, _canonical(row), hashlib.sha256).hexdigest()

    def verify(self, session: Session) -> tuple[int, Break | None]:
        """(entries checked, the first break or None)."""
        expected, previous, count = 1, GENESIS, 0
        for event in _in_order(session):
            count += 1
            if event.seq != expected:
                return count, Break(expected, _gap(expected, event.seq - 1))
            if event.prev_hash != previous:
                return count, Break(
                    event.seq,
                    f"does not follow entry {event.seq - 1} (entries reordered or replaced)",
                )
            if event.hash is None or not hmac.compare_digest(event.hash, self.seal(event)):
                return count, Break(event.seq, "was changed")
            previous, expected = event.hash, expected + 1
        head = session.get(AuditHead, 1)
        if head is None:
            return count, Break(expected, "is unknown: the head of the log was deleted")
        if head.seq and not hmac.compare_digest(
            head.mac or "", self._head_mac(head.seq, head.hash)
        ):
            return count, Break(head.seq, "is not the recorded head of the log (head changed)")
        if head is not None and head.seq != expected - 1:
            return count, Break(expected, _gap(expected, head.seq))
        if head is not None and head.seq and head.hash != previous:
            return count, Break(expected - 1, "does not match the recorded head of the log")
        return count, None


@dataclass(frozen=True)
class AuditFilter:
    since: datetime | None = None
    until: datetime | None = None  # exclusive
    patient_id: int | None = None
    user: str | None = None  # the acting user or the user concerned
    action: str | None = None  # exact, or a prefix ending in "." ("consent.")


def entries(session: Session, wanted: AuditFilter) -> list[AuditEvent]:
    query = select(AuditEvent).order_by(col(AuditEvent.seq))
    if wanted.since is not None:
        query = query.where(col(AuditEvent.at) >= wanted.since)
    if wanted.until is not None:
        query = query.where(col(AuditEvent.at) < wanted.until)
    if wanted.patient_id is not None:
        query = query.where(AuditEvent.patient_id == wanted.patient_id)
    if wanted.user is not None:
        query = query.where(
            (col(AuditEvent.actor) == wanted.user) | (col(AuditEvent.username) == wanted.user)
        )
    if wanted.action is not None:
        if wanted.action.endswith("."):
            query = query.where(col(AuditEvent.action).startswith(wanted.action))
        else:
            query = query.where(AuditEvent.action == wanted.action)
    return list(session.exec(query).all())


# The columns an entry's hash covers, in the order they are hashed.
_CHAINED = (
    "seq",
    "at",
    "actor",
    "action",
    "message_id",
    "queue_id",
    "patient_id",
    "consent_id",
    "username",
    "recipient",
    "decision",
    "reason",
    "detail",
    "prev_hash",
)
# What list and export show: the hashed columns and the hash.
COLUMNS = (*_CHAINED, "hash")


def as_record(event: AuditEvent) -> dict[str, object]:
    """An entry as plain data, for --json and exports (hashes included)."""
    record: dict[str, object] = {name: getattr(event, name) for name in COLUMNS}
    record["at"] = event.at.isoformat()
    return record


def audit_key(settings: Settings, create: bool = True) -> tuple[bytes, bool]:
    """This installation's HMAC key (``CGW_AUDIT_KEY``, else its key file) and
    whether the file was created just now."""
    configured = settings.audit_key.get_secret_value() if settings.audit_key else None
    return load_or_create_secret(settings.keys_dir / "audit.key", configured, create)


def audit_log(settings: Settings, create: bool = True) -> AuditLog:
    """The audit log with this installation's HMAC key (made on first use if ``create``)."""
    return AuditLog(audit_key(settings, create)[0])


def _gap(first: int, last: int) -> str:
    if first >= last:
        return "is missing (it was deleted)"
    return f"is missing (entries {first}-{last} were deleted)"


_CHAIN = "cgw.audit_chain"  # session.info: the ``_Chain`` of the transaction under way
# Run in every transaction that records: on the driver's cursor.
# SQLite: a write takes the database's write lock until commit.
_LOCK_HEAD_SQLITE = DriverStatement(
    update(AuditHead)
    .where(col(AuditHead.id) == 1)
    .values(seq=AuditHead.seq)
    .returning(col(AuditHead.seq), col(AuditHead.hash))
)
_LOCK_HEAD = DriverStatement(
    select_columns(col(AuditHead.seq), col(AuditHead.hash))
    .where(col(AuditHead.id) == 1)
    .with_for_update()
)
_APPEND = DriverStatement(insert(AuditEvent))
_MOVE_HEAD = DriverStatement(
    update(AuditHead)
    .where(col(AuditHead.id) == 1)
    .values(seq=bindparam("head_seq"), hash=bindparam("head_hash"), mac=bindparam("head_mac"))
)


@dataclass
class _Chain:
    """The head one transaction holds locked, and the entries it appends at commit."""

    transaction: object
    seq: int
    hash: str | None
    rows: list[dict[str, object]] = field(default_factory=list)
    mac: str = ""

    def append(self, row: dict[str, object], seq: int, hash_: str, mac: str) -> None:
        self.rows.append(row)
        self.seq, self.hash, self.mac = seq, hash_, mac


def _chain_of(session: Session) -> _Chain:
    """This transaction's chain: the head's row is locked until it ends."""
    transaction = session.get_transaction()
    chain = session.info.get(_CHAIN)
    if chain is not None and chain.transaction is transaction:
        return cast(_Chain, chain)
    connection = session.connection()
    sqlite = connection.dialect.name == "sqlite"
    ((seq, hash_),) = (_LOCK_HEAD_SQLITE if sqlite else _LOCK_HEAD).fetch(connection, [{}])
    # Asked again: before ``connection()`` began it, there may have been no transaction.
    chain = session.info[_CHAIN] = _Chain(session.get_transaction(), int(seq), hash_)
    return chain


@listens_for(Session, "before_commit")
def _write_chain(session: Session) -> None:
    """Write the entries recorded in this transaction, and move the head past them."""
    chain = session.info.get(_CHAIN)
    if chain is None or chain.transaction is not session.get_transaction() or not chain.rows:
        return
    connection = session.connection()
    _APPEND.run_many(connection, chain.rows)
    _MOVE_HEAD.run(
        connection, {"head_seq": chain.seq, "head_hash": chain.hash, "head_mac": chain.mac}
    )
    chain.rows = []


def _in_order(session: Session) -> Iterator[AuditEvent]:
    yield from session.exec(select(AuditEvent).order_by(col(AuditEvent.seq))).yield_per(1000)


def _canonical(row: Mapping[str, object]) -> bytes:
    fields = [row[name] for name in _CHAINED]
    fields[1] = cast(datetime, row["at"]).isoformat()
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
