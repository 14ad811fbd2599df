"""The database schema, as sqlmodel tables.

One schema serves SQLite and PostgreSQL. Every time is stored in UTC and read
back timezone-aware. Legal records (consents, relationships, audit events) have
no delete path in the code: they are ended or revoked, never removed.

The queue tables live here too, so that one migration chain owns the whole
database; the SQL that drives them is in ``gateway.queue``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Column, DateTime, Index, LargeBinary, Text, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = _in_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """On SQLite, the stored text in one step: the same text as
        ``process_bind_param`` and SQLite's own ``DATETIME`` processor make
        together (``YYYY-MM-DD HH:MM:SS.ffffff``), with one ``isoformat``
        instead of its dict of fields and ``%`` formatting. The writer binds
        about eleven times a message."""
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)
        return _sqlite_text

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _sqlite_text(value: datetime | None) -> str | None:
    if value is None:
        return None
    return _in_utc(value).replace(tzinfo=None).isoformat(" ", "microseconds")


def _in_utc(value: datetime) -> datetime:
    """``value`` in UTC; a naive time is refused, never guessed at."""
    if value.tzinfo is UTC:
        return value
    if value.tzinfo is None:
        raise ValueError("naive datetimes are not stored; pass an aware UTC time")
    return value.astimezone(UTC)


def _utc_column(nullable: bool = False, index: bool = False) -> Any:
    return Field(
        default=None if nullable else ...,
        sa_column=Column(UTCDateTime(), nullable=nullable, index=index),
    )


class User(SQLModel, table=True):
    __tablename__ = "user_account"

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(unique=True, max_length=64)
    role: str = Field(max_length=16)
    password_hash: str = Field(sa_column=Column(Text, nullable=False))
    disabled: bool = False
    created_at: datetime = _utc_column()
    created_by: str = Field(max_length=128)
    disabled_at: datetime | None = _utc_column(nullable=True)
    disabled_by: str | None = Field(default=None, max_length=128)


class UserAddress(SQLModel, table=True):
    """A professional address a user may send as; one owner per address."""

    __tablename__ = "user_address"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user_account.id", index=True)
    address: str = Field(max_length=320)
    address_key: str = Field(max_length=320, unique=True)


class Patient(SQLModel, table=True):
    __tablename__ = "patient"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200)
    mrn: str | None = Field(default=None, max_length=64, unique=True)
    created_at: datetime = _utc_column()
    created_by: str = Field(max_length=128)


class PatientAddress(SQLModel, table=True):
    __tablename__ = "patient_address"

    id: int | None = Field(default=None, primary_key=True)
    patient_id: int = Field(foreign_key="patient.id", index=True)
    address: str = Field(max_length=320)
    address_key: str = Field(max_length=320, unique=True)
    added_at: datetime = _utc_column()
    added_by: str = Field(max_length=128)


class Relationship(SQLModel, table=True):
    __tablename__ = "relationship"
    __table_args__ = (Index("ix_relationship_patient_clinician", "patient_id", "clinician_id"),)

    id: int | None = Field(default=None, primary_key=True)
    patient_id: int = Field(foreign_key="patient.id")
    clinician_id: int = Field(foreign_key="user_account.id", index=True)
    kind: str = Field(max_length=16)
    since: date
    ended_on: date | None = None
    recorded_at: datetime = _utc_column()
    recorded_by: str = Field(max_length=128)
    ended_at: datetime | None = _utc_column(nullable=True)
    ended_by: str | None = Field(default=None, max_length=128)


class Consent(SQLModel, table=True):
    __tablename__ = "consent"

    id: int | None = Field(default=None, primary_key=True)
    patient_id: int = Field(foreign_key="patient.id", index=True)
    address: str = Field(max_length=320)
    address_key: str = Field(max_length=320, index=True)
    clinician_id: int | None = Field(default=None, foreign_key="user_account.id")
    method: str = Field(max_length=16)
    evidence: str | None = Field(default=None, max_length=500)
    valid_from: date
    expires: date | None = None
    delivery: str = Field(max_length=16)
    risk_acknowledged: bool = False
    recorded_at: datetime = _utc_column()
    recorded_by: str = Field(max_length=128)
    revoked_at: datetime | None = _utc_column(nullable=True)
    revoked_by: str | None = Field(default=None, max_length=128)
    revoke_reason: str | None = Field(default=None, max_length=500)


class RecipientCertificate(SQLModel, table=True):
    __tablename__ = "recipient_certificate"
    __table_args__ = (UniqueConstraint("address_key", "fingerprint_sha256"),)

    id: int | None = Field(default=None, primary_key=True)
    address: str = Field(max_length=320)
    address_key: str = Field(max_length=320, index=True)
    fingerprint_sha256: str = Field(max_length=64)
    subject: str = Field(max_length=1000)
    issuer: str = Field(max_length=1000)
    serial: str = Field(max_length=80)
    not_before: datetime = _utc_column()
    not_after: datetime = _utc_column()
    der: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    imported_at: datetime = _utc_column()
    imported_by: str = Field(max_length=128)


class SpooledMessage(SQLModel, table=True):
    """A sealed message (AES-256-GCM, see ``gateway.crypto_at_rest``) in the
    database spool: how instances share accepted mail without a shared disk."""

    __tablename__ = "spooled_message"

    id: str = Field(primary_key=True, max_length=32)
    sealed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    stored_at: datetime = _utc_column(index=True)


class QueueMessage(SQLModel, table=True):
    """One accepted message; its encrypted content is in the spool."""

    __tablename__ = "queue_message"

    id: str = Field(primary_key=True, max_length=32)
    mail_from: str = Field(max_length=320)
    username: str | None = Field(default=None, max_length=64)
    size: int
    received_at: datetime = _utc_column(index=True)
    is_bounce: bool = False
    done_at: datetime | None = _utc_column(nullable=True)


class QueueRecipient(SQLModel, table=True):
    """Per-recipient delivery state: queued, deferred, delivered, bounced."""

    __tablename__ = "queue_recipient"
    __table_args__ = (
        Index("ix_queue_recipient_due", "state", "next_attempt_at"),
        Index("ix_queue_recipient_held", "state", "since"),
    )

    id: int | None = Field(default=None, primary_key=True)
    message_id: str = Field(foreign_key="queue_message.id", index=True, max_length=32)
    address: str = Field(max_length=320)
    state: str = Field(max_length=16)
    attempts: int = 0
    next_attempt_at: datetime = _utc_column()
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    claimed_by: str | None = Field(default=None, max_length=128)
    claimed_until: datetime | None = _utc_column(nullable=True)
    updated_at: datetime = _utc_column()
    # When this stay began: queued at submission or at a release, held at
    # submission or again at delivery. The queue lifetime and the quarantine
    # retention count from here, so a release is not a message already too old.
    since: datetime = _utc_column()
    # What the policy decided at submission: delivery must honour it.
    protection: str = Field(default="none", max_length=16)
    reason: str | None = Field(default=None, max_length=48)
    patient_id: int | None = None
    certificate_id: int | None = None


class RegistryGeneration(SQLModel, table=True):
    """A counter that every change to the registry's tables moves (database triggers).

    The gateway keeps registry facts in memory between messages and asks
    this one row whether they still hold: triggers, not application code,
    so a change by the CLI, another instance or plain SQL counts too.
    """

    __tablename__ = "registry_generation"

    id: int = Field(default=1, primary_key=True)
    value: int = 0


class AuditHead(SQLModel, table=True):
    """The newest audit entry's number and hash: one row, locked by every append.

    Appenders take this row's lock, so the sequence stays gap-free and the
    hash chain linear however many instances write at once.
    """

    __tablename__ = "audit_head"

    id: int = Field(default=1, primary_key=True)
    seq: int = 0
    hash: str | None = Field(default=None, max_length=64)
    # An HMAC over (seq, hash): cutting entries off the end and moving the head
    # back to match needs the key, not just the database.
    mac: str | None = Field(default=None, max_length=64)


class AuditEvent(SQLModel, table=True):
    """One line of the audit trail (SPEC §5). Never a body, subject or file name."""

    __tablename__ = "audit_event"

    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    at: datetime = _utc_column(index=True)
    actor: str = Field(max_length=128)
    action: str = Field(max_length=48, index=True)
    message_id: str | None = Field(default=None, max_length=32)
    queue_id: int | None = None
    patient_id: int | None = Field(default=None, index=True)
    consent_id: int | None = None
    username: str | None = Field(default=None, max_length=64)
    recipient: str | None = Field(default=None, max_length=320)
    decision: str | None = Field(default=None, max_length=16)
    reason: str | None = Field(default=None, max_length=48)
    detail: str | None = Field(default=None, max_length=500)
    prev_hash: str | None = Field(default=None, max_length=64)
    hash: str | None = Field(default=None, max_length=64)
