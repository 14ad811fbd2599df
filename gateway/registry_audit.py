"""What each change to the registry writes into the audit log.

One function per kind of change, shared by the admin CLI and ``cgw demo``,
so that a change reads the same in the log whoever made it. Ids, names and
codes only: the registry holds no message content to leak.
"""

from __future__ import annotations

from consent_registry.certificates import CertificateView
from consent_registry.consents import ConsentView
from consent_registry.relationships import RelationshipView
from consent_registry.users import UserView
from gateway.audit import AuditAction, AuditEntry


def user_added(actor: str, view: UserView) -> AuditEntry:
    return AuditEntry(
        AuditAction.USER_ADDED,
        actor,
        username=view.username,
        detail=f"role {view.role.value}; " + ", ".join(view.addresses),
    )


def patient_added(actor: str, patient_id: int) -> AuditEntry:
    return AuditEntry(AuditAction.PATIENT_ADDED, actor, patient_id=patient_id)


def relationship_added(actor: str, view: RelationshipView) -> AuditEntry:
    return AuditEntry(
        AuditAction.RELATIONSHIP_ADDED,
        actor,
        patient_id=view.patient_id,
        username=view.clinician,
        detail=f"relationship {view.id}, {view.kind}, since {view.since}",
    )


def consent_granted(actor: str, view: ConsentView, how: str | None = None) -> AuditEntry:
    """``how``: where the consent came from (an import's file and line), else its terms."""
    return AuditEntry(
        AuditAction.CONSENT_GRANTED,
        actor,
        patient_id=view.patient_id,
        consent_id=view.id,
        recipient=view.email,
        username=view.clinician,
        detail=how or f"{view.delivery}, {view.clinician or 'practice-wide'}",
    )


def certificate_imported(actor: str, view: CertificateView) -> AuditEntry:
    return AuditEntry(
        AuditAction.CERTIFICATE_IMPORTED,
        actor,
        recipient=view.email,
        detail=f"sha256 {view.fingerprint_sha256}, expires {view.not_after:%Y-%m-%d}",
    )
