"""The audit trail: every stage and every registry change writes through here.

An entry records who did what to which message, recipient or record, with the
decision and reason code: never a message body, subject or attachment name.
Entries are appended in the caller's transaction, so a change and its audit
entry commit together or not at all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session

from consent_registry.models import AuditEvent


class AuditAction(enum.StrEnum):
    MESSAGE_ACCEPTED = "message.accepted"
    MESSAGE_DENIED = "message.denied"
    MESSAGE_DELIVERED = "message.delivered"
    MESSAGE_DEFERRED = "message.deferred"
    MESSAGE_FAILED = "message.failed"
    MESSAGE_QUARANTINED = "message.quarantined"
    MESSAGE_BOUNCED = "message.bounced"
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


def record(session: Session, entry: AuditEntry, now: datetime) -> None:
    """Append one entry in the caller's transaction."""
    session.add(
        AuditEvent(
            at=now,
            actor=entry.actor,
            action=entry.action.value,
            message_id=entry.message_id,
            queue_id=entry.queue_id,
            patient_id=entry.patient_id,
            consent_id=entry.consent_id,
            username=entry.username,
            recipient=entry.recipient,
            decision=entry.decision,
            reason=entry.reason,
            detail=entry.detail[:500] if entry.detail else None,
        )
    )
