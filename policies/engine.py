"""The recipient decision: an ordered rule table and a short evaluator.

Each row is one named rule that either decides (returns a ``Verdict``) or
passes. The first rule that decides wins; the table ends with a row that
always decides. Patient rules come first, so a patient's address is checked
as a patient's even inside a practice domain, and an address is recognised
by its matching key however it is typed: it never slips through as an
unknown external recipient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from policies.decision import Decision, Outcome, Protection, Reason
from policies.facts import (
    ConsentFact,
    PatientFacts,
    PolicySettings,
    RecipientFacts,
    RelationshipFact,
    Role,
    SenderFacts,
    StaffPatientMail,
    UnknownExternal,
)
from policies.status import ConsentStatus, RelationshipStatus, consent_status, relationship_status


@dataclass(frozen=True)
class RecipientCase:
    """Everything one recipient decision may look at."""

    sender: SenderFacts
    recipient: RecipientFacts
    settings: PolicySettings
    now: datetime

    @cached_property
    def active_relationships(self) -> tuple[RelationshipFact, ...]:
        """The acting clinicians' active relationships with the patient: three
        rules ask, so they are worked out once per decision."""
        return tuple(_relationships_in(self, RelationshipStatus.ACTIVE))


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: Reason
    protection: Protection = Protection.NONE
    consent_id: int | None = None
    relationship_id: int | None = None
    certificate_id: int | None = None


Rule = Callable[[RecipientCase], Verdict | None]


def _patient(case: RecipientCase) -> PatientFacts | None:
    return case.recipient.patient


def _staff_refused(case: RecipientCase) -> Verdict | None:
    """Staff may mail patients only where the practice allows it on clinicians' behalf."""
    if _patient(case) is None or case.sender.role is Role.CLINICIAN:
        return None
    if case.settings.staff_patient_mail is StaffPatientMail.ON_BEHALF:
        return None
    return Verdict(Outcome.DENY, Reason.STAFF_MAY_NOT_MAIL_PATIENTS)


def _acting_clinicians(case: RecipientCase) -> frozenset[str]:
    """Whose relationships count: the sender's own, or (staff) any clinician's."""
    patient = _patient(case)
    assert patient is not None
    if case.sender.role is Role.CLINICIAN:
        return frozenset({case.sender.username})
    return frozenset(r.clinician for r in patient.relationships)


def _relationships_in(case: RecipientCase, status: RelationshipStatus) -> list[RelationshipFact]:
    """The acting clinicians' relationships with the patient that have ``status`` now."""
    patient = _patient(case)
    assert patient is not None
    acting = _acting_clinicians(case)
    return [
        r
        for r in patient.relationships
        if r.clinician in acting
        and relationship_status(r.since, r.ended_on, case.now, case.settings.zone) is status
    ]


def _active_clinicians(case: RecipientCase) -> frozenset[str]:
    return frozenset(r.clinician for r in case.active_relationships)


def _no_relationship(case: RecipientCase) -> Verdict | None:
    """An established relationship must exist between the clinician and the patient."""
    if _patient(case) is None or _active_clinicians(case):
        return None
    ended = _relationships_in(case, RelationshipStatus.ENDED)
    if ended:
        latest = max(r.relationship_id for r in ended)
        return Verdict(Outcome.DENY, Reason.RELATIONSHIP_ENDED, relationship_id=latest)
    return Verdict(Outcome.DENY, Reason.NO_RELATIONSHIP)


def _applicable_consents(case: RecipientCase) -> list[ConsentFact]:
    """Consents for this exact address, practice-wide or to an acting clinician."""
    patient = _patient(case)
    assert patient is not None
    clinicians = _active_clinicians(case)
    return [
        c
        for c in patient.consents
        if c.address_key == case.recipient.key
        and (c.clinician is None or c.clinician in clinicians)
    ]


def _status(case: RecipientCase, consent: ConsentFact) -> ConsentStatus:
    return consent_status(
        consent.valid_from, consent.expires, consent.revoked_at, case.now, case.settings.zone
    )


_REASON_FOR_STATUS = {
    ConsentStatus.REVOKED: Reason.CONSENT_REVOKED,
    ConsentStatus.EXPIRED: Reason.CONSENT_EXPIRED,
    ConsentStatus.NOT_YET_VALID: Reason.CONSENT_NOT_YET_VALID,
}


def _no_active_consent(case: RecipientCase) -> Verdict | None:
    """The patient's documented consent must cover this address now."""
    if _patient(case) is None:
        return None
    applicable = _applicable_consents(case)
    if any(_status(case, c) is ConsentStatus.ACTIVE for c in applicable):
        return None
    if not applicable:
        return Verdict(Outcome.DENY, Reason.NO_CONSENT)
    latest = max(applicable, key=lambda c: c.consent_id)
    return Verdict(
        Outcome.DENY, _REASON_FOR_STATUS[_status(case, latest)], consent_id=latest.consent_id
    )


def _protected_delivery(case: RecipientCase) -> Verdict | None:
    """S/MIME with a valid certificate, else what the consent allows, else hold."""
    if _patient(case) is None:
        return None
    active = [c for c in _applicable_consents(case) if _status(case, c) is ConsentStatus.ACTIVE]
    latest = max(active, key=lambda c: c.consent_id)
    relationship = _relationship_id(case)
    certificates = [
        c for c in case.recipient.certificates if c.not_before <= case.now < c.not_after
    ]
    if certificates:
        best = max(certificates, key=lambda c: c.not_after)
        return Verdict(
            Outcome.ALLOW,
            Reason.PATIENT_CONSENTED,
            Protection.SMIME,
            latest.consent_id,
            relationship,
            best.certificate_id,
        )
    for delivery, protection in (
        ("tls", Protection.TLS_REQUIRED),
        ("plain", Protection.TLS_OPPORTUNISTIC),
    ):
        allowing = [c for c in active if c.delivery.value == delivery]
        if delivery == "plain":
            allowing = [c for c in allowing if c.risk_acknowledged]
        if allowing:
            chosen = max(allowing, key=lambda c: c.consent_id)
            return Verdict(
                Outcome.ALLOW, Reason.PATIENT_CONSENTED, protection, chosen.consent_id, relationship
            )
    return Verdict(
        Outcome.QUARANTINE,
        Reason.NO_SECURE_CHANNEL,
        consent_id=latest.consent_id,
        relationship_id=relationship,
    )


def _relationship_id(case: RecipientCase) -> int | None:
    """The active relationship the decision rests on (the newest, if several)."""
    ids = [r.relationship_id for r in case.active_relationships]
    return max(ids) if ids else None


def _internal(case: RecipientCase) -> Verdict | None:
    if case.recipient.domain in case.settings.practice_domains:
        return Verdict(Outcome.ALLOW, Reason.INTERNAL)
    return None


_UNKNOWN = {
    UnknownExternal.ALLOW: Outcome.ALLOW,
    UnknownExternal.QUARANTINE: Outcome.QUARANTINE,
    UnknownExternal.BOUNCE: Outcome.DENY,
}


def _unknown_external(case: RecipientCase) -> Verdict:
    return Verdict(_UNKNOWN[case.settings.unknown_external], Reason.UNKNOWN_EXTERNAL)


RULES: tuple[tuple[str, Rule], ...] = (
    # Patients first: a patient's address is a patient's, whatever its domain.
    ("staff-may-mail-patients", _staff_refused),
    ("established-relationship", _no_relationship),
    ("active-consent", _no_active_consent),
    ("protected-delivery", _protected_delivery),
    # Mail between the practice's own mailboxes is not patient e-mail.
    ("internal-recipient", _internal),
    # Everyone else follows CGW_UNKNOWN_EXTERNAL; this row always decides.
    ("unknown-external", _unknown_external),
)


def decide_recipient(
    sender: SenderFacts, recipient: RecipientFacts, settings: PolicySettings, now: datetime
) -> Decision:
    """Decide one envelope recipient: the first rule that decides wins."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    case = RecipientCase(sender, recipient, settings, now)
    for name, rule in RULES:
        verdict = rule(case)
        if verdict is not None:
            patient = recipient.patient
            return Decision(
                outcome=verdict.outcome,
                reason=verdict.reason,
                rule=name,
                protection=verdict.protection,
                patient_id=patient.patient_id if patient else None,
                consent_id=verdict.consent_id,
                relationship_id=verdict.relationship_id,
                certificate_id=verdict.certificate_id,
            )
    raise AssertionError("the rule table ends with a row that always decides")


def exposed_patients(recipient_patients: frozenset[int], shown_patients: frozenset[int]) -> bool:
    """True when a patient recipient would see another patient's address (To/Cc).

    ``recipient_patients``: patients the message goes to; ``shown_patients``:
    patients whose addresses are in the To or Cc header, envelope or not.
    """
    return any(shown_patients - {patient} for patient in recipient_patients)


def decide_exposure(
    recipient_patients: frozenset[int], shown_patients: frozenset[int]
) -> Decision | None:
    """The header rule: refuse a message that exposes patients to each other."""
    if not exposed_patients(recipient_patients, shown_patients):
        return None
    return Decision(Outcome.DENY, Reason.PATIENTS_EXPOSED, "patients-not-exposed")


def sender_owns(sender: SenderFacts, address_key: str) -> bool:
    """A user may send only as one of their own professional addresses."""
    return address_key in sender.address_keys


def decide_release(now_decided: Decision) -> Decision:
    """What an admin's release of a held recipient does, given the policy's decision now.

    The policy still rules at release: a release delivers only what it now
    allows (say, once a certificate or a TLS consent is on file). The one
    hold that exists *for* a person's review is an unknown external
    recipient's (``CGW_UNKNOWN_EXTERNAL=quarantine``): the release is that
    review, so it lets the recipient go. A patient still without a secure
    channel stays held (never plaintext for want of a key), and so does a
    recipient the policy now refuses; the admin may reject those instead.
    """
    if now_decided.outcome is Outcome.QUARANTINE and now_decided.reason is Reason.UNKNOWN_EXTERNAL:
        return Decision(
            Outcome.ALLOW,
            Reason.UNKNOWN_EXTERNAL,
            "released-after-review",
            now_decided.protection,
        )
    return now_decided
