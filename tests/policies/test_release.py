"""What an admin's release of a held recipient does (policies.engine.decide_release).

The release is the review only for an unknown external recipient's hold; every
other decision the policy makes now stands as it is: allowed stays allowed,
a patient without a secure channel stays held, a refusal stays a refusal. A
release never changes how the message must be protected.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.decision import Decision, Outcome, Protection, Reason
from policies.engine import decide_release

RELEASED_RULE = "released-after-review"

# Every reason the engine can give for a refusal (and, below, every reason at all).
REFUSALS = [
    Reason.UNKNOWN_EXTERNAL,
    Reason.NO_CONSENT,
    Reason.CONSENT_REVOKED,
    Reason.CONSENT_EXPIRED,
    Reason.CONSENT_NOT_YET_VALID,
    Reason.NO_RELATIONSHIP,
    Reason.RELATIONSHIP_ENDED,
    Reason.STAFF_MAY_NOT_MAIL_PATIENTS,
    Reason.PATIENTS_EXPOSED,
    Reason.SENDER_NOT_OWNED,
]


def _decision(
    outcome: Outcome,
    reason: Reason,
    protection: Protection = Protection.NONE,
    *,
    rule: str = "some-rule",
    patient_id: int | None = None,
    consent_id: int | None = None,
    relationship_id: int | None = None,
    certificate_id: int | None = None,
) -> Decision:
    return Decision(
        outcome,
        reason,
        rule,
        protection,
        patient_id,
        consent_id,
        relationship_id,
        certificate_id,
    )


# --- the table ----------------------------------------------------------------------------------

UNCHANGED = [
    # Allowed now (say, a certificate or a TLS consent is on file by now): delivered as decided.
    pytest.param(
        _decision(
            Outcome.ALLOW,
            Reason.PATIENT_CONSENTED,
            Protection.SMIME,
            rule="protected-delivery",
            patient_id=7,
            consent_id=11,
            relationship_id=3,
            certificate_id=31,
        ),
        id="allow-patient-smime",
    ),
    pytest.param(
        _decision(
            Outcome.ALLOW,
            Reason.PATIENT_CONSENTED,
            Protection.TLS_REQUIRED,
            rule="protected-delivery",
            patient_id=7,
            consent_id=12,
            relationship_id=3,
        ),
        id="allow-patient-tls",
    ),
    pytest.param(
        _decision(
            Outcome.ALLOW,
            Reason.PATIENT_CONSENTED,
            Protection.TLS_OPPORTUNISTIC,
            rule="protected-delivery",
            patient_id=7,
            consent_id=13,
            relationship_id=3,
        ),
        id="allow-patient-plain-risk-acknowledged",
    ),
    pytest.param(
        _decision(Outcome.ALLOW, Reason.INTERNAL, rule="internal-recipient"),
        id="allow-internal",
    ),
    pytest.param(
        _decision(Outcome.ALLOW, Reason.UNKNOWN_EXTERNAL, rule="unknown-external"),
        id="allow-unknown-external",
    ),
    # A patient still without a secure channel: never plaintext for want of a key.
    pytest.param(
        _decision(
            Outcome.QUARANTINE,
            Reason.NO_SECURE_CHANNEL,
            rule="protected-delivery",
            patient_id=7,
            consent_id=14,
            relationship_id=3,
        ),
        id="held-no-secure-channel",
    ),
    # Whatever the policy refuses now stays refused (the admin may reject it).
    *(
        pytest.param(
            _decision(Outcome.DENY, reason, rule="some-refusal", patient_id=7),
            id=f"deny-{reason.value.lower()}",
        )
        for reason in REFUSALS
    ),
]


@pytest.mark.parametrize("now_decided", UNCHANGED)
def test_release_leaves_the_decision_as_the_policy_makes_it_now(now_decided: Decision) -> None:
    assert decide_release(now_decided) == now_decided


@pytest.mark.parametrize("protection", list(Protection), ids=lambda p: p.name.lower())
def test_release_of_an_unknown_external_hold_lets_the_recipient_go(
    protection: Protection,
) -> None:
    held = _decision(Outcome.QUARANTINE, Reason.UNKNOWN_EXTERNAL, protection, rule="x")
    released = decide_release(held)
    assert released == Decision(Outcome.ALLOW, Reason.UNKNOWN_EXTERNAL, RELEASED_RULE, protection)
    # It reads as an allowed external recipient, not as a hold or a refusal.
    assert released.enhanced_code == "2.1.5"
    assert "held" not in released.sentence
    assert "does not send" not in released.sentence


def test_a_held_patient_without_a_secure_channel_is_not_delivered_in_plaintext() -> None:
    held = _decision(
        Outcome.QUARANTINE,
        Reason.NO_SECURE_CHANNEL,
        rule="protected-delivery",
        patient_id=7,
        consent_id=14,
    )
    result = decide_release(held)
    assert result.outcome is Outcome.QUARANTINE
    assert result.reason is Reason.NO_SECURE_CHANNEL
    assert result.protection is Protection.NONE


@pytest.mark.parametrize("reason", list(Reason), ids=lambda r: r.value.lower())
@pytest.mark.parametrize("protection", list(Protection), ids=lambda p: p.name.lower())
def test_every_refusal_stays_a_refusal(reason: Reason, protection: Protection) -> None:
    refused = _decision(Outcome.DENY, reason, protection, rule="some-refusal")
    assert decide_release(refused) == refused


@pytest.mark.parametrize(
    "reason",
    [r for r in Reason if r is not Reason.UNKNOWN_EXTERNAL],
    ids=lambda r: r.value.lower(),
)
def test_only_the_unknown_external_hold_is_released(reason: Reason) -> None:
    held = _decision(Outcome.QUARANTINE, reason, rule="some-hold")
    assert decide_release(held) == held


# --- properties ---------------------------------------------------------------------------------

PROPERTY = settings(max_examples=500, deadline=None, database=None)

_ids = st.none() | st.integers(min_value=1, max_value=10_000)
decisions = st.builds(
    Decision,
    outcome=st.sampled_from(Outcome),
    reason=st.sampled_from(Reason),
    rule=st.sampled_from(["protected-delivery", "internal-recipient", "unknown-external", "x"]),
    protection=st.sampled_from(Protection),
    patient_id=_ids,
    consent_id=_ids,
    relationship_id=_ids,
    certificate_id=_ids,
)


def _is_unknown_external_hold(decision: Decision) -> bool:
    return decision.outcome is Outcome.QUARANTINE and decision.reason is Reason.UNKNOWN_EXTERNAL


@PROPERTY
@given(decisions)
def test_release_allows_only_what_was_allowed_or_held_for_review(now_decided: Decision) -> None:
    released = decide_release(now_decided)
    if released.outcome is Outcome.ALLOW:
        assert now_decided.outcome is Outcome.ALLOW or _is_unknown_external_hold(now_decided)
    assert released.protection is now_decided.protection


@PROPERTY
@given(decisions)
def test_release_changes_nothing_but_the_unknown_external_hold(now_decided: Decision) -> None:
    released = decide_release(now_decided)
    if _is_unknown_external_hold(now_decided):
        assert released.outcome is Outcome.ALLOW
        assert released.reason is Reason.UNKNOWN_EXTERNAL
        assert released.rule == RELEASED_RULE
    else:
        assert released == now_decided
    # A refusal is never softened, a hold never turns into a refusal.
    assert (released.outcome is Outcome.DENY) is (now_decided.outcome is Outcome.DENY)


@PROPERTY
@given(decisions)
def test_release_is_idempotent(now_decided: Decision) -> None:
    once = decide_release(now_decided)
    assert decide_release(once) == once
