"""Frozen outputs of the policy engine: outcomes, protections, reasons, decisions.

A reason is a closed vocabulary: each carries the enhanced status code
(RFC 3463) and one sentence a physician understands in a mail client. The
basic three-digit SMTP code is chosen by ``gateway.replies``, the only place
that speaks SMTP numbers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    QUARANTINE = "quarantine"


class Protection(enum.StrEnum):
    """What delivery must guarantee for an allowed recipient."""

    NONE = "none"  # not patient mail: the gateway's usual verified TLS to the next hop
    SMIME = "smime"  # encrypted to the recipient's certificate
    TLS_REQUIRED = "tls"  # verified TLS all the way to the next hop, else deferred
    TLS_OPPORTUNISTIC = "tls-if-offered"  # consent allows plain: TLS when offered


class Reason(enum.StrEnum):
    """Stable reason codes; they appear in audit entries and scripts."""

    INTERNAL = "INTERNAL"
    PATIENT_CONSENTED = "PATIENT_CONSENTED"
    UNKNOWN_EXTERNAL = "UNKNOWN_EXTERNAL"
    NO_CONSENT = "NO_CONSENT"
    CONSENT_REVOKED = "CONSENT_REVOKED"
    CONSENT_EXPIRED = "CONSENT_EXPIRED"
    CONSENT_NOT_YET_VALID = "CONSENT_NOT_YET_VALID"
    NO_RELATIONSHIP = "NO_RELATIONSHIP"
    RELATIONSHIP_ENDED = "RELATIONSHIP_ENDED"
    STAFF_MAY_NOT_MAIL_PATIENTS = "STAFF_MAY_NOT_MAIL_PATIENTS"
    NO_SECURE_CHANNEL = "NO_SECURE_CHANNEL"
    PATIENTS_EXPOSED = "PATIENTS_EXPOSED"
    SENDER_NOT_OWNED = "SENDER_NOT_OWNED"


@dataclass(frozen=True)
class ReasonText:
    enhanced_code: str
    sentence: str


REASON_TEXT: dict[Reason, ReasonText] = {
    Reason.INTERNAL: ReasonText("2.1.5", "Recipient is inside the practice."),
    Reason.PATIENT_CONSENTED: ReasonText(
        "2.1.5", "The patient consented to e-mail at this address."
    ),
    Reason.UNKNOWN_EXTERNAL: ReasonText(
        "5.7.1",
        "This address is neither inside the practice nor a registered patient's, "
        "and the practice does not send such mail.",
    ),
    Reason.NO_CONSENT: ReasonText(
        "5.7.1", "There is no documented consent from this patient to e-mail at this address."
    ),
    Reason.CONSENT_REVOKED: ReasonText(
        "5.7.1", "The patient has withdrawn consent to e-mail at this address."
    ),
    Reason.CONSENT_EXPIRED: ReasonText(
        "5.7.1", "The patient's consent to e-mail at this address has expired."
    ),
    Reason.CONSENT_NOT_YET_VALID: ReasonText(
        "5.7.1", "The patient's consent to e-mail at this address is not valid yet."
    ),
    Reason.NO_RELATIONSHIP: ReasonText(
        "5.7.1", "There is no established physician-patient relationship with this patient."
    ),
    Reason.RELATIONSHIP_ENDED: ReasonText(
        "5.7.1", "The physician-patient relationship with this patient has ended."
    ),
    Reason.STAFF_MAY_NOT_MAIL_PATIENTS: ReasonText(
        "5.7.1", "Only clinicians may e-mail patients from this practice."
    ),
    Reason.NO_SECURE_CHANNEL: ReasonText(
        "2.1.5",
        "There is no secure way to deliver to this patient yet (no certificate on file and "
        "the consent requires encryption); the message is held for review.",
    ),
    Reason.PATIENTS_EXPOSED: ReasonText(
        "5.7.1",
        "The message would show a patient another patient's address; send it separately "
        "or put the patients in Bcc.",
    ),
    Reason.SENDER_NOT_OWNED: ReasonText(
        "5.7.1", "You may only send as one of your own professional addresses."
    ),
}


@dataclass(frozen=True)
class Decision:
    """What happens to one recipient of one message, and why."""

    outcome: Outcome
    reason: Reason
    rule: str
    protection: Protection = Protection.NONE
    patient_id: int | None = None
    consent_id: int | None = None
    relationship_id: int | None = None
    certificate_id: int | None = None

    @property
    def enhanced_code(self) -> str:
        if self.outcome is Outcome.QUARANTINE:
            return "2.1.5"
        if self.outcome is Outcome.DENY:
            return REASON_TEXT[self.reason].enhanced_code
        return "2.1.5"

    @property
    def sentence(self) -> str:
        text = REASON_TEXT[self.reason].sentence
        if self.reason is Reason.UNKNOWN_EXTERNAL and self.outcome is Outcome.ALLOW:
            return "The recipient is outside the practice and not a registered patient."
        if self.outcome is Outcome.QUARANTINE and self.reason is Reason.UNKNOWN_EXTERNAL:
            return text + " The message is held for review."
        return text
