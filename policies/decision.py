"""Frozen outputs of the policy engine: outcomes, reasons, decisions.

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


class Reason(enum.StrEnum):
    """Stable reason codes; they appear in audit entries and scripts."""

    INTERNAL = "INTERNAL"
    EXTERNAL_NOT_ENABLED = "EXTERNAL_NOT_ENABLED"
    SENDER_NOT_OWNED = "SENDER_NOT_OWNED"


@dataclass(frozen=True)
class ReasonText:
    enhanced_code: str
    sentence: str


REASON_TEXT: dict[Reason, ReasonText] = {
    Reason.INTERNAL: ReasonText("2.1.5", "Recipient is inside the practice."),
    Reason.EXTERNAL_NOT_ENABLED: ReasonText(
        "5.7.1",
        "This gateway does not yet send mail outside the practice; the recipient was not accepted.",
    ),
    Reason.SENDER_NOT_OWNED: ReasonText(
        "5.7.1",
        "You may only send as one of your own professional addresses.",
    ),
}


@dataclass(frozen=True)
class Decision:
    """What happens to one recipient of one message, and why."""

    outcome: Outcome
    reason: Reason
    rule: str

    @property
    def enhanced_code(self) -> str:
        return REASON_TEXT[self.reason].enhanced_code

    @property
    def sentence(self) -> str:
        return REASON_TEXT[self.reason].sentence
