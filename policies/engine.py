"""The recipient decision: an ordered rule table and a short evaluator.

Each row is one named rule: a predicate over the facts and the decision it
makes when it matches. The first matching row decides; the last row is the
default, and it denies, so a recipient no rule speaks for never slips through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from policies.decision import Decision, Outcome, Reason
from policies.facts import PolicySettings, RecipientFacts, SenderFacts


@dataclass(frozen=True)
class RecipientCase:
    """Everything one recipient decision may look at."""

    sender: SenderFacts
    recipient: RecipientFacts
    settings: PolicySettings


@dataclass(frozen=True)
class Rule:
    name: str
    matches: Callable[[RecipientCase], bool]
    outcome: Outcome
    reason: Reason


def _is_internal(case: RecipientCase) -> bool:
    return case.recipient.domain in case.settings.practice_domains


RULES: tuple[Rule, ...] = (
    # Mail between the practice's own mailboxes is not patient e-mail.
    Rule("internal-recipient", _is_internal, Outcome.ALLOW, Reason.INTERNAL),
    # Until patient rules exist, nothing leaves the practice: fail closed.
    Rule("default-deny-external", lambda _case: True, Outcome.DENY, Reason.EXTERNAL_NOT_ENABLED),
)


def decide_recipient(
    sender: SenderFacts, recipient: RecipientFacts, settings: PolicySettings
) -> Decision:
    """Decide one envelope recipient: the first matching rule wins."""
    case = RecipientCase(sender, recipient, settings)
    for rule in RULES:
        if rule.matches(case):
            return Decision(rule.outcome, rule.reason, rule.name)
    raise AssertionError("the rule table ends with a catch-all row")


def sender_owns(sender: SenderFacts, address_key: str) -> bool:
    """A user may send only as one of their own professional addresses."""
    return address_key in sender.address_keys
