"""The recipient decision table (policies.engine) and its vocabulary (policies.decision)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.decision import REASON_TEXT, Decision, Outcome, Reason
from policies.engine import RULES, decide_recipient, sender_owns
from policies.facts import PolicySettings, RecipientFacts, Role, SenderFacts

PRACTICE = "praxis.example"
SETTINGS = PolicySettings(practice_domains=frozenset({PRACTICE, "xn--bcher-kva.de"}))
SENDER = SenderFacts(
    username="drsmith",
    role=Role.CLINICIAN,
    address_keys=frozenset({f"dr.smith@{PRACTICE}", "smith@xn--bcher-kva.de"}),
)


def recipient(key: str) -> RecipientFacts:
    return RecipientFacts(address=key, key=key, domain=key.rpartition("@")[2])


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            f"colleague@{PRACTICE}",
            Decision(Outcome.ALLOW, Reason.INTERNAL, "internal-recipient"),
        ),
        (
            "info@xn--bcher-kva.de",
            Decision(Outcome.ALLOW, Reason.INTERNAL, "internal-recipient"),
        ),
        (
            "patient@example.org",
            Decision(Outcome.DENY, Reason.EXTERNAL_NOT_ENABLED, "default-deny-external"),
        ),
        # A sub-domain of the practice is a different domain: not internal.
        (
            f"x@mail.{PRACTICE}",
            Decision(Outcome.DENY, Reason.EXTERNAL_NOT_ENABLED, "default-deny-external"),
        ),
        # A look-alike that merely ends with the practice domain is external.
        (
            f"x@evil{PRACTICE}",
            Decision(Outcome.DENY, Reason.EXTERNAL_NOT_ENABLED, "default-deny-external"),
        ),
    ],
    ids=["internal", "internal-idna", "external", "subdomain", "suffix-lookalike"],
)
def test_decide_recipient_table(key: str, expected: Decision) -> None:
    assert decide_recipient(SENDER, recipient(key), SETTINGS) == expected


@pytest.mark.parametrize("role", list(Role))
def test_decision_does_not_depend_on_role(role: Role) -> None:
    sender = SenderFacts("someone", role, frozenset())
    internal = decide_recipient(sender, recipient(f"a@{PRACTICE}"), SETTINGS)
    external = decide_recipient(sender, recipient("a@example.org"), SETTINGS)
    assert (internal.outcome, internal.reason) == (Outcome.ALLOW, Reason.INTERNAL)
    assert (external.outcome, external.reason) == (Outcome.DENY, Reason.EXTERNAL_NOT_ENABLED)


def test_no_practice_domains_denies_everything() -> None:
    decision = decide_recipient(
        SENDER, recipient(f"a@{PRACTICE}"), PolicySettings(practice_domains=frozenset())
    )
    assert decision == Decision(Outcome.DENY, Reason.EXTERNAL_NOT_ENABLED, "default-deny-external")


def test_decision_exposes_reason_text() -> None:
    decision = decide_recipient(SENDER, recipient("p@example.org"), SETTINGS)
    assert decision.enhanced_code == "5.7.1"
    assert decision.sentence == REASON_TEXT[Reason.EXTERNAL_NOT_ENABLED].sentence
    allowed = decide_recipient(SENDER, recipient(f"p@{PRACTICE}"), SETTINGS)
    assert allowed.enhanced_code == "2.1.5"
    assert allowed.sentence == "Recipient is inside the practice."


def test_rule_table_shape() -> None:
    assert [rule.name for rule in RULES] == ["internal-recipient", "default-deny-external"]
    names = [rule.name for rule in RULES]
    assert len(names) == len(set(names))
    last = RULES[-1]
    assert last.outcome is Outcome.DENY  # the catch-all fails closed


@pytest.mark.parametrize("reason", list(Reason), ids=str)
def test_every_reason_has_text(reason: Reason) -> None:
    text = REASON_TEXT[reason]
    assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", text.enhanced_code)
    assert re.fullmatch(r"\d\.\d\.\d", text.enhanced_code)
    assert text.sentence.strip()
    assert text.sentence.endswith(".")


def test_reason_text_has_no_extra_entries() -> None:
    assert set(REASON_TEXT) == set(Reason)


@pytest.mark.parametrize(
    ("outcome", "first_digit"), [(Outcome.ALLOW, "2"), (Outcome.DENY, "5")], ids=str
)
def test_rule_reasons_agree_with_outcomes(outcome: Outcome, first_digit: str) -> None:
    rules = [rule for rule in RULES if rule.outcome is outcome]
    assert rules
    for rule in rules:
        assert REASON_TEXT[rule.reason].enhanced_code[0] == first_digit


@pytest.mark.parametrize(
    ("key", "owned"),
    [
        (f"dr.smith@{PRACTICE}", True),
        ("smith@xn--bcher-kva.de", True),
        (f"someone.else@{PRACTICE}", False),
        (f"DR.SMITH@{PRACTICE}", False),  # keys arrive normalised; no folding here
        ("", False),
    ],
)
def test_sender_owns(key: str, owned: bool) -> None:
    assert sender_owns(SENDER, key) is owned


# --- properties -------------------------------------------------------------------------------

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_domain = st.lists(_label, min_size=2, max_size=4).map(".".join)
_local = st.from_regex(r"[a-z0-9][a-z0-9.+_-]{0,15}", fullmatch=True)
_role = st.sampled_from(list(Role))


@st.composite
def _case(draw: st.DrawFn) -> tuple[SenderFacts, RecipientFacts, PolicySettings]:
    domains = draw(st.frozensets(_domain, max_size=4))
    recipient_domain = draw(
        st.one_of(_domain, st.sampled_from(sorted(domains))) if domains else _domain
    )
    key = f"{draw(_local)}@{recipient_domain}"
    sender = SenderFacts(
        draw(st.text(max_size=10)),
        draw(_role),
        draw(st.frozensets(st.builds(lambda loc, dom: f"{loc}@{dom}", _local, _domain))),
    )
    return sender, RecipientFacts(key, key, recipient_domain), PolicySettings(domains)


@given(_case())
def test_decide_recipient_is_deterministic(
    case: tuple[SenderFacts, RecipientFacts, PolicySettings],
) -> None:
    sender, rcpt, settings = case
    first = decide_recipient(sender, rcpt, settings)
    again = decide_recipient(
        SenderFacts(sender.username, sender.role, frozenset(sender.address_keys)),
        RecipientFacts(rcpt.address, rcpt.key, rcpt.domain),
        PolicySettings(frozenset(settings.practice_domains)),
    )
    assert first == again
    assert first.outcome is (
        Outcome.ALLOW if rcpt.domain in settings.practice_domains else Outcome.DENY
    )


@given(_case(), st.frozensets(_domain, max_size=4))
def test_outside_practice_domains_is_never_allowed(
    case: tuple[SenderFacts, RecipientFacts, PolicySettings], practice: frozenset[str]
) -> None:
    sender, rcpt, _ = case
    settings = PolicySettings(practice - {rcpt.domain})
    decision = decide_recipient(sender, rcpt, settings)
    assert decision.outcome is not Outcome.ALLOW
    assert decision == Decision(Outcome.DENY, Reason.EXTERNAL_NOT_ENABLED, "default-deny-external")
