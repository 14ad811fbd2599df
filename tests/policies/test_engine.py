"""The recipient decision (policies.engine) and its vocabulary (policies.decision).

Table-driven cases name every reason, protection and rule; the clock cases run
in Europe/Berlin with instants written in UTC, so a UTC-vs-local mistake flips
them; property tests check the invariants over random registries.
"""

from __future__ import annotations

import copy
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.decision import REASON_TEXT, Decision, Outcome, Protection, Reason
from policies.engine import RULES, decide_exposure, decide_recipient, exposed_patients, sender_owns
from policies.facts import (
    CertificateFact,
    ConsentFact,
    Delivery,
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

PRACTICE = "praxis.example"
BERLIN = ZoneInfo("Europe/Berlin")

# 2026-06-10 12:00 in Berlin (CEST, UTC+2).
NOW = datetime(2026, 6, 10, 10, 0, tzinfo=UTC)
TODAY = date(2026, 6, 10)
TOMORROW = TODAY + timedelta(days=1)
LONG_AGO = date(2020, 1, 1)
# The first instant of 2026-06-10 in Berlin: still 2026-06-09 in UTC.
LOCAL_MIDNIGHT = datetime(2026, 6, 9, 22, 0, tzinfo=UTC)
# The first instant of 2026-06-11 in Berlin: still 2026-06-10 in UTC.
NEXT_LOCAL_MIDNIGHT = datetime(2026, 6, 10, 22, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
SECOND = timedelta(seconds=1)

PATIENT_ID = 7
ANNA = "anna@example.org"
ANNA_WORK = "anna.work@example.org"
ANNA_IN_PRACTICE = f"anna@{PRACTICE}"

SMITH = SenderFacts("drsmith", Role.CLINICIAN, frozenset({f"dr.smith@{PRACTICE}"}))
JONES = SenderFacts("drjones", Role.CLINICIAN, frozenset({f"dr.jones@{PRACTICE}"}))
STAFF = SenderFacts("mfa", Role.STAFF, frozenset({f"empfang@{PRACTICE}"}))
ADMIN = SenderFacts("root", Role.ADMIN, frozenset({f"admin@{PRACTICE}"}))

STAFF_RULE = "staff-may-mail-patients"
RELATIONSHIP_RULE = "established-relationship"
CONSENT_RULE = "active-consent"
DELIVERY_RULE = "protected-delivery"
INTERNAL_RULE = "internal-recipient"
EXTERNAL_RULE = "unknown-external"
EXPOSURE_RULE = "patients-not-exposed"


# --- builders ---------------------------------------------------------------------------------


def policy(
    *,
    zone: ZoneInfo = BERLIN,
    unknown: UnknownExternal = UnknownExternal.BOUNCE,
    staff: StaffPatientMail = StaffPatientMail.ON_BEHALF,
) -> PolicySettings:
    return PolicySettings(frozenset({PRACTICE}), zone, unknown, staff)


def rel(
    relationship_id: int,
    clinician: str = "drsmith",
    since: date = LONG_AGO,
    ended_on: date | None = None,
) -> RelationshipFact:
    return RelationshipFact(relationship_id, clinician, since, ended_on)


def consent(
    consent_id: int,
    *,
    key: str = ANNA,
    clinician: str | None = None,
    valid_from: date = LONG_AGO,
    expires: date | None = None,
    revoked_at: datetime | None = None,
    delivery: Delivery = Delivery.TLS,
    risk: bool = False,
) -> ConsentFact:
    return ConsentFact(consent_id, key, clinician, valid_from, expires, revoked_at, delivery, risk)


def cert(
    certificate_id: int,
    not_before: datetime = NOW - timedelta(days=365),
    not_after: datetime = NOW + timedelta(days=365),
) -> CertificateFact:
    return CertificateFact(certificate_id, not_before, not_after)


def patient(
    relationships: tuple[RelationshipFact, ...] = (),
    consents: tuple[ConsentFact, ...] = (),
    certificates: tuple[CertificateFact, ...] = (),
    key: str = ANNA,
) -> RecipientFacts:
    return RecipientFacts(
        key,
        key,
        key.rpartition("@")[2],
        PatientFacts(PATIENT_ID, relationships, consents),
        certificates,
    )


def other(key: str, certificates: tuple[CertificateFact, ...] = ()) -> RecipientFacts:
    return RecipientFacts(key, key, key.rpartition("@")[2], None, certificates)


def for_patient(
    outcome: Outcome,
    reason: Reason,
    rule: str,
    protection: Protection = Protection.NONE,
    *,
    consent_id: int | None = None,
    relationship_id: int | None = None,
    certificate_id: int | None = None,
) -> Decision:
    return Decision(
        outcome,
        reason,
        rule,
        protection,
        PATIENT_ID,
        consent_id,
        relationship_id,
        certificate_id,
    )


def allowed(
    protection: Protection,
    consent_id: int,
    relationship_id: int,
    certificate_id: int | None = None,
) -> Decision:
    return for_patient(
        Outcome.ALLOW,
        Reason.PATIENT_CONSENTED,
        DELIVERY_RULE,
        protection,
        consent_id=consent_id,
        relationship_id=relationship_id,
        certificate_id=certificate_id,
    )


def denied(reason: Reason, rule: str, **ids: int) -> Decision:
    return for_patient(Outcome.DENY, reason, rule, **ids)


def held(consent_id: int, relationship_id: int) -> Decision:
    return for_patient(
        Outcome.QUARANTINE,
        Reason.NO_SECURE_CHANNEL,
        DELIVERY_RULE,
        consent_id=consent_id,
        relationship_id=relationship_id,
    )


# --- the decision table -----------------------------------------------------------------------

EXPIRED_CERT = cert(31, NOW - timedelta(days=400), NOW - timedelta(days=1))
FUTURE_CERT = cert(32, NOW + timedelta(days=1), NOW + timedelta(days=400))

CASES = [
    # Not patients.
    pytest.param(
        SMITH,
        other(f"colleague@{PRACTICE}"),
        policy(),
        Decision(Outcome.ALLOW, Reason.INTERNAL, INTERNAL_RULE),
        id="internal-colleague",
    ),
    pytest.param(
        STAFF,
        other(f"colleague@{PRACTICE}"),
        policy(staff=StaffPatientMail.REFUSE),
        Decision(Outcome.ALLOW, Reason.INTERNAL, INTERNAL_RULE),
        id="staff-refuse-does-not-touch-internal-mail",
    ),
    pytest.param(
        SMITH,
        other("lab@example.net"),
        policy(unknown=UnknownExternal.ALLOW),
        Decision(Outcome.ALLOW, Reason.UNKNOWN_EXTERNAL, EXTERNAL_RULE),
        id="unknown-external-allow",
    ),
    pytest.param(
        SMITH,
        other("lab@example.net"),
        policy(unknown=UnknownExternal.QUARANTINE),
        Decision(Outcome.QUARANTINE, Reason.UNKNOWN_EXTERNAL, EXTERNAL_RULE),
        id="unknown-external-quarantine",
    ),
    pytest.param(
        SMITH,
        other("lab@example.net"),
        policy(unknown=UnknownExternal.BOUNCE),
        Decision(Outcome.DENY, Reason.UNKNOWN_EXTERNAL, EXTERNAL_RULE),
        id="unknown-external-bounce",
    ),
    pytest.param(
        SMITH,
        other(f"x@mail.{PRACTICE}"),
        policy(unknown=UnknownExternal.BOUNCE),
        Decision(Outcome.DENY, Reason.UNKNOWN_EXTERNAL, EXTERNAL_RULE),
        id="subdomain-of-practice-is-external",
    ),
    pytest.param(
        SMITH,
        other("lab@example.net", (cert(39),)),
        policy(unknown=UnknownExternal.ALLOW),
        Decision(Outcome.ALLOW, Reason.UNKNOWN_EXTERNAL, EXTERNAL_RULE),
        id="non-patient-certificate-gives-no-smime",
    ),
    # Patients: allowed, with each protection.
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21),)),
        policy(),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="clinician-tls-consent",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21, clinician="drsmith"),)),
        policy(),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="consent-granted-to-sender",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21, delivery=Delivery.ENCRYPTED),), (cert(31),)),
        policy(),
        allowed(Protection.SMIME, 21, 11, 31),
        id="smime-valid-certificate",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21, delivery=Delivery.PLAIN),), (EXPIRED_CERT, cert(33))),
        policy(),
        allowed(Protection.SMIME, 21, 11, 33),
        id="smime-skips-expired-certificate",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21, delivery=Delivery.PLAIN, risk=True),)),
        policy(),
        allowed(Protection.TLS_OPPORTUNISTIC, 21, 11),
        id="plain-with-risk-acknowledged",
    ),
    pytest.param(
        SMITH,
        patient(
            (rel(11),),
            (consent(21), consent(22, delivery=Delivery.PLAIN, risk=True)),
        ),
        policy(),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="tls-preferred-over-newer-plain",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21), consent(22, revoked_at=NOW - timedelta(days=1)))),
        policy(),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="older-active-consent-beats-newer-revoked",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21),), (EXPIRED_CERT,)),
        policy(),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="expired-certificate-gives-no-smime",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21),), (FUTURE_CERT,)),
        policy(),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="not-yet-valid-certificate-gives-no-smime",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21),)),
        policy(unknown=UnknownExternal.BOUNCE),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="patient-allowed-although-unknown-external-bounces",
    ),
    # Patients: held for review.
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21, delivery=Delivery.ENCRYPTED),)),
        policy(),
        held(21, 11),
        id="encrypted-consent-without-certificate",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21, delivery=Delivery.ENCRYPTED),), (EXPIRED_CERT,)),
        policy(),
        held(21, 11),
        id="encrypted-consent-expired-certificate",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21, delivery=Delivery.PLAIN, risk=False),)),
        policy(),
        held(21, 11),
        id="plain-without-risk-acknowledged",
    ),
    # Patients: staff.
    pytest.param(
        STAFF,
        patient((rel(11),), (consent(21),)),
        policy(staff=StaffPatientMail.REFUSE),
        denied(Reason.STAFF_MAY_NOT_MAIL_PATIENTS, STAFF_RULE),
        id="staff-refused",
    ),
    pytest.param(
        ADMIN,
        patient((rel(11),), (consent(21),)),
        policy(staff=StaffPatientMail.REFUSE),
        denied(Reason.STAFF_MAY_NOT_MAIL_PATIENTS, STAFF_RULE),
        id="admin-refused-like-staff",
    ),
    pytest.param(
        STAFF,
        patient(),
        policy(staff=StaffPatientMail.REFUSE),
        denied(Reason.STAFF_MAY_NOT_MAIL_PATIENTS, STAFF_RULE),
        id="staff-refused-before-relationship-check",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21),)),
        policy(staff=StaffPatientMail.REFUSE),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="staff-refuse-does-not-bind-clinicians",
    ),
    pytest.param(
        STAFF,
        patient((rel(11, ended_on=TODAY - timedelta(days=30)), rel(12, "drjones")), (consent(21),)),
        policy(),
        allowed(Protection.TLS_REQUIRED, 21, 12),
        id="staff-on-behalf-via-other-clinician",
    ),
    pytest.param(
        ADMIN,
        patient((rel(11, ended_on=TODAY - timedelta(days=30)), rel(12, "drjones")), (consent(21),)),
        policy(),
        allowed(Protection.TLS_REQUIRED, 21, 12),
        id="admin-on-behalf-like-staff",
    ),
    pytest.param(
        STAFF,
        patient((rel(12, "drjones"),), (consent(21, clinician="drjones"),)),
        policy(),
        allowed(Protection.TLS_REQUIRED, 21, 12),
        id="staff-on-behalf-consent-to-active-clinician",
    ),
    pytest.param(
        STAFF,
        patient(
            (rel(11, ended_on=TODAY - timedelta(days=30)), rel(12, "drjones")),
            (consent(21, clinician="drsmith"),),
        ),
        policy(),
        denied(Reason.NO_CONSENT, CONSENT_RULE),
        id="staff-on-behalf-consent-to-clinician-without-relationship",
    ),
    pytest.param(
        STAFF,
        patient((rel(12, "drjones"),), (consent(21, clinician="drwho"),)),
        policy(),
        denied(Reason.NO_CONSENT, CONSENT_RULE),
        id="staff-on-behalf-consent-to-stranger-clinician",
    ),
    pytest.param(
        STAFF,
        patient((rel(11, ended_on=TODAY - timedelta(days=30)),), (consent(21),)),
        policy(),
        denied(Reason.RELATIONSHIP_ENDED, RELATIONSHIP_RULE, relationship_id=11),
        id="staff-on-behalf-all-relationships-ended",
    ),
    pytest.param(
        STAFF,
        patient((), (consent(21),)),
        policy(),
        denied(Reason.NO_RELATIONSHIP, RELATIONSHIP_RULE),
        id="staff-on-behalf-no-relationship",
    ),
    # Patients: relationship.
    pytest.param(
        SMITH,
        patient((), (consent(21),)),
        policy(),
        denied(Reason.NO_RELATIONSHIP, RELATIONSHIP_RULE),
        id="no-relationship",
    ),
    pytest.param(
        SMITH,
        patient((rel(12, "drjones"),), (consent(21),)),
        policy(),
        denied(Reason.NO_RELATIONSHIP, RELATIONSHIP_RULE),
        id="wrong-clinician-relationship",
    ),
    pytest.param(
        SMITH,
        patient((rel(12, "drjones", ended_on=TODAY - timedelta(days=1)),), (consent(21),)),
        policy(),
        denied(Reason.NO_RELATIONSHIP, RELATIONSHIP_RULE),
        id="other-clinicians-ended-relationship-is-not-ours",
    ),
    pytest.param(
        SMITH,
        patient((rel(11, ended_on=TODAY - timedelta(days=30)),), (consent(21),)),
        policy(),
        denied(Reason.RELATIONSHIP_ENDED, RELATIONSHIP_RULE, relationship_id=11),
        id="relationship-ended",
    ),
    pytest.param(
        SMITH,
        patient((rel(11, ended_on=TODAY - timedelta(days=30)),), ()),
        policy(),
        denied(Reason.RELATIONSHIP_ENDED, RELATIONSHIP_RULE, relationship_id=11),
        id="relationship-checked-before-consent",
    ),
    # Patients: consent.
    pytest.param(
        SMITH,
        patient((rel(11),), ()),
        policy(),
        denied(Reason.NO_CONSENT, CONSENT_RULE),
        id="no-consent",
    ),
    pytest.param(
        SMITH,
        patient((rel(11), rel(12, "drjones")), (consent(21, clinician="drjones"),)),
        policy(),
        denied(Reason.NO_CONSENT, CONSENT_RULE),
        id="consent-granted-to-other-clinician",
    ),
    pytest.param(
        JONES,
        patient((rel(11), rel(12, "drjones")), (consent(21, clinician="drsmith"),)),
        policy(),
        denied(Reason.NO_CONSENT, CONSENT_RULE),
        id="consent-granted-to-other-clinician-reversed",
    ),
    pytest.param(
        JONES,
        patient((rel(11), rel(12, "drjones")), (consent(21, clinician="drjones"),)),
        policy(),
        allowed(Protection.TLS_REQUIRED, 21, 12),
        id="second-clinician-own-relationship-and-consent",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21, key=ANNA_WORK),)),
        policy(),
        denied(Reason.NO_CONSENT, CONSENT_RULE),
        id="consent-for-other-address-of-same-patient",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21, revoked_at=NOW - timedelta(days=1)),)),
        policy(),
        denied(Reason.CONSENT_REVOKED, CONSENT_RULE, consent_id=21),
        id="consent-revoked",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21, expires=TODAY - timedelta(days=1)),)),
        policy(),
        denied(Reason.CONSENT_EXPIRED, CONSENT_RULE, consent_id=21),
        id="consent-expired",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21, valid_from=TOMORROW),)),
        policy(),
        denied(Reason.CONSENT_NOT_YET_VALID, CONSENT_RULE, consent_id=21),
        id="consent-not-yet-valid",
    ),
    pytest.param(
        SMITH,
        patient(
            (rel(11),),
            (
                consent(22, revoked_at=NOW - timedelta(days=1)),
                consent(21, expires=TODAY - timedelta(days=1)),
            ),
        ),
        policy(),
        denied(Reason.CONSENT_REVOKED, CONSENT_RULE, consent_id=22),
        id="latest-applicable-consent-by-id-not-by-position",
    ),
    pytest.param(
        SMITH,
        patient(
            (rel(11), rel(12, "drjones")),
            (
                consent(21, expires=TODAY - timedelta(days=1)),
                consent(25, clinician="drjones", valid_from=TOMORROW),
                consent(26, key=ANNA_WORK, revoked_at=NOW - SECOND),
            ),
        ),
        policy(),
        denied(Reason.CONSENT_EXPIRED, CONSENT_RULE, consent_id=21),
        id="inapplicable-newer-consents-ignored",
    ),
    # Patients inside a practice domain are still patients.
    pytest.param(
        SMITH,
        patient((rel(11),), (), key=ANNA_IN_PRACTICE),
        policy(),
        denied(Reason.NO_CONSENT, CONSENT_RULE),
        id="patient-in-practice-domain-needs-consent",
    ),
    pytest.param(
        SMITH,
        patient((), (consent(21, key=ANNA_IN_PRACTICE),), key=ANNA_IN_PRACTICE),
        policy(),
        denied(Reason.NO_RELATIONSHIP, RELATIONSHIP_RULE),
        id="patient-in-practice-domain-needs-relationship",
    ),
    pytest.param(
        SMITH,
        patient((rel(11),), (consent(21, key=ANNA_IN_PRACTICE),), key=ANNA_IN_PRACTICE),
        policy(),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="patient-in-practice-domain-allowed-as-patient",
    ),
]


@pytest.mark.parametrize(("sender", "rcpt", "policy_settings", "expected"), CASES)
def test_decide_recipient_table(
    sender: SenderFacts,
    rcpt: RecipientFacts,
    policy_settings: PolicySettings,
    expected: Decision,
) -> None:
    decision = decide_recipient(sender, rcpt, policy_settings, NOW)
    assert decision == expected
    # The same instant written in the practice's zone decides the same way.
    assert decide_recipient(sender, rcpt, policy_settings, NOW.astimezone(BERLIN)) == expected


def _table_decisions() -> list[Decision]:
    return [param.values[3] for param in CASES]


def test_table_covers_every_reason_protection_and_rule() -> None:
    decisions = _table_decisions()
    exposure = decide_exposure(frozenset({1}), frozenset({1, 2}))
    assert exposure is not None
    reasons = {d.reason for d in decisions} | {exposure.reason}
    # SENDER_NOT_OWNED is the gateway's verdict on sender_owns(), not a rule's.
    assert reasons == set(Reason) - {Reason.SENDER_NOT_OWNED}
    assert {d.protection for d in decisions} == set(Protection)
    assert {d.rule for d in decisions} == {name for name, _ in RULES}
    assert {d.outcome for d in decisions} == set(Outcome)


def test_rule_table_order() -> None:
    assert [name for name, _ in RULES] == [
        STAFF_RULE,
        RELATIONSHIP_RULE,
        CONSENT_RULE,
        DELIVERY_RULE,
        INTERNAL_RULE,
        EXTERNAL_RULE,
    ]


@pytest.mark.parametrize("unknown", list(UnknownExternal), ids=str)
@pytest.mark.parametrize("key", ["x@example.net", f"x@{PRACTICE}"])
@pytest.mark.parametrize("sender", [SMITH, STAFF, ADMIN], ids=lambda s: s.role.value)
def test_non_patients_skip_every_patient_rule(
    unknown: UnknownExternal, key: str, sender: SenderFacts
) -> None:
    pol = policy(unknown=unknown, staff=StaffPatientMail.REFUSE)
    decision = decide_recipient(sender, other(key, (cert(31),)), pol, NOW)
    if key.endswith(f"@{PRACTICE}"):
        assert decision == Decision(Outcome.ALLOW, Reason.INTERNAL, INTERNAL_RULE)
    else:
        outcome = {
            UnknownExternal.ALLOW: Outcome.ALLOW,
            UnknownExternal.QUARANTINE: Outcome.QUARANTINE,
            UnknownExternal.BOUNCE: Outcome.DENY,
        }[unknown]
        assert decision == Decision(outcome, Reason.UNKNOWN_EXTERNAL, EXTERNAL_RULE)


@pytest.mark.parametrize(
    "later",
    [
        RelationshipFact(12, "drsmith", date(2026, 7, 1), None),  # not started yet
        RelationshipFact(12, "drsmith", date(2020, 1, 1), date(2022, 1, 1)),  # ended
    ],
    ids=["not-started", "ended"],
)
def test_relationship_id_names_the_active_relationship(later: RelationshipFact) -> None:
    # drsmith's relationship 11 is the active one; 12 (also drsmith's) is not active today.
    rcpt = patient((rel(11), later), (consent(21),))
    assert decide_recipient(SMITH, rcpt, policy(), NOW) == allowed(Protection.TLS_REQUIRED, 21, 11)


# --- clock boundaries (Europe/Berlin, instants written in UTC) ------------------------------


def test_boundary_instants_are_berlin_midnights() -> None:
    assert datetime(2026, 6, 10, tzinfo=BERLIN) == LOCAL_MIDNIGHT
    assert datetime(2026, 6, 11, tzinfo=BERLIN) == NEXT_LOCAL_MIDNIGHT
    assert NOW.astimezone(BERLIN).date() == TODAY
    # In UTC these instants still fall on the previous day.
    assert LOCAL_MIDNIGHT.date() == TODAY - timedelta(days=1)
    assert NEXT_LOCAL_MIDNIGHT.date() == TODAY


# Winter: 2026-01-15 00:00 in Berlin (CET, UTC+1) is 2026-01-14 23:00 UTC.
WINTER_MIDNIGHT = datetime(2026, 1, 14, 23, 0, tzinfo=UTC)
WINTER_DAY = date(2026, 1, 15)

BOUNDARIES = [
    pytest.param(
        LOCAL_MIDNIGHT,
        (rel(11),),
        (consent(21, valid_from=TODAY),),
        (),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="consent-starts-today-active-at-local-midnight",
    ),
    pytest.param(
        LOCAL_MIDNIGHT - US,
        (rel(11),),
        (consent(21, valid_from=TODAY),),
        (),
        denied(Reason.CONSENT_NOT_YET_VALID, CONSENT_RULE, consent_id=21),
        id="consent-starts-today-not-yet-valid-1us-before",
    ),
    pytest.param(
        LOCAL_MIDNIGHT,
        (rel(11),),
        (consent(21, expires=TODAY),),
        (),
        denied(Reason.CONSENT_EXPIRED, CONSENT_RULE, consent_id=21),
        id="consent-expires-today-expired-at-local-midnight",
    ),
    pytest.param(
        LOCAL_MIDNIGHT - US,
        (rel(11),),
        (consent(21, expires=TODAY),),
        (),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="consent-expires-today-active-1us-before",
    ),
    pytest.param(
        NOW,
        (rel(11),),
        (consent(21, expires=TODAY),),
        (),
        denied(Reason.CONSENT_EXPIRED, CONSENT_RULE, consent_id=21),
        id="consent-expires-today-expired-at-noon",
    ),
    pytest.param(
        WINTER_MIDNIGHT,
        (rel(11),),
        (consent(21, expires=WINTER_DAY),),
        (),
        denied(Reason.CONSENT_EXPIRED, CONSENT_RULE, consent_id=21),
        id="winter-consent-expired-at-local-midnight",
    ),
    pytest.param(
        WINTER_MIDNIGHT - US,
        (rel(11),),
        (consent(21, expires=WINTER_DAY),),
        (),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="winter-consent-active-1us-before",
    ),
    pytest.param(
        NOW,
        (rel(11),),
        (consent(21, revoked_at=NOW - SECOND),),
        (),
        denied(Reason.CONSENT_REVOKED, CONSENT_RULE, consent_id=21),
        id="revoked-a-second-ago",
    ),
    pytest.param(
        NOW,
        (rel(11),),
        (consent(21, revoked_at=NOW.astimezone(BERLIN)),),
        (),
        denied(Reason.CONSENT_REVOKED, CONSENT_RULE, consent_id=21),
        id="revoked-exactly-now-written-in-local-time",
    ),
    pytest.param(
        NOW,
        (rel(11),),
        (consent(21, revoked_at=NOW + SECOND),),
        (),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="revoked-a-second-from-now-still-active",
    ),
    pytest.param(
        LOCAL_MIDNIGHT,
        (rel(11, ended_on=TODAY),),
        (consent(21),),
        (),
        denied(Reason.RELATIONSHIP_ENDED, RELATIONSHIP_RULE, relationship_id=11),
        id="relationship-ended-today-at-local-midnight",
    ),
    pytest.param(
        NOW,
        (rel(11, ended_on=TODAY),),
        (consent(21),),
        (),
        denied(Reason.RELATIONSHIP_ENDED, RELATIONSHIP_RULE, relationship_id=11),
        id="relationship-ended-today-at-noon",
    ),
    pytest.param(
        LOCAL_MIDNIGHT - US,
        (rel(11, ended_on=TODAY),),
        (consent(21),),
        (),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="relationship-ending-today-active-1us-before",
    ),
    pytest.param(
        NEXT_LOCAL_MIDNIGHT - US,
        (rel(11, ended_on=TOMORROW),),
        (consent(21),),
        (),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="relationship-ends-tomorrow-active-last-us-of-today",
    ),
    pytest.param(
        NEXT_LOCAL_MIDNIGHT - US,
        (rel(11, since=TOMORROW),),
        (consent(21),),
        (),
        denied(Reason.NO_RELATIONSHIP, RELATIONSHIP_RULE),
        id="relationship-starting-tomorrow",
    ),
    pytest.param(
        NEXT_LOCAL_MIDNIGHT,
        (rel(11, since=TOMORROW),),
        (consent(21),),
        (),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="relationship-starts-at-next-local-midnight",
    ),
    pytest.param(
        NOW,
        (rel(11),),
        (consent(21),),
        (cert(31, not_after=NOW),),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="certificate-not-after-exactly-now-invalid",
    ),
    pytest.param(
        NOW,
        (rel(11),),
        (consent(21),),
        (cert(31, not_after=NOW + SECOND),),
        allowed(Protection.SMIME, 21, 11, 31),
        id="certificate-not-after-a-second-later-valid",
    ),
    pytest.param(
        NOW,
        (rel(11),),
        (consent(21),),
        (cert(31, not_before=NOW),),
        allowed(Protection.SMIME, 21, 11, 31),
        id="certificate-not-before-exactly-now-valid",
    ),
    pytest.param(
        NOW,
        (rel(11),),
        (consent(21),),
        (cert(31, not_before=NOW + SECOND),),
        allowed(Protection.TLS_REQUIRED, 21, 11),
        id="certificate-not-before-a-second-later-invalid",
    ),
]


@pytest.mark.parametrize(
    ("now", "relationships", "consents", "certificates", "expected"), BOUNDARIES
)
def test_clock_boundaries_in_berlin(
    now: datetime,
    relationships: tuple[RelationshipFact, ...],
    consents: tuple[ConsentFact, ...],
    certificates: tuple[CertificateFact, ...],
    expected: Decision,
) -> None:
    rcpt = patient(relationships, consents, certificates)
    assert decide_recipient(SMITH, rcpt, policy(zone=BERLIN), now) == expected
    assert decide_recipient(SMITH, rcpt, policy(zone=BERLIN), now.astimezone(BERLIN)) == expected


@pytest.mark.parametrize(
    ("zone", "expected_reason"),
    [
        ("Europe/Berlin", Reason.PATIENT_CONSENTED),  # 00:30 on 2026-06-10
        ("UTC", Reason.CONSENT_NOT_YET_VALID),  # 22:30 on 2026-06-09
        ("America/New_York", Reason.CONSENT_NOT_YET_VALID),  # 18:30 on 2026-06-09
        ("Asia/Tokyo", Reason.PATIENT_CONSENTED),  # 07:30 on 2026-06-10
    ],
)
def test_practice_zone_decides_the_day(zone: str, expected_reason: Reason) -> None:
    rcpt = patient((rel(11),), (consent(21, valid_from=TODAY),))
    decision = decide_recipient(
        SMITH, rcpt, policy(zone=ZoneInfo(zone)), LOCAL_MIDNIGHT + 30 * 60 * SECOND
    )
    assert decision.reason is expected_reason


# --- header exposure --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipients", "shown", "exposed"),
    [
        pytest.param({1}, {1}, False, id="patient-shown-only-to-itself"),
        pytest.param({1}, {1, 2}, True, id="other-patient-in-headers"),
        pytest.param({1}, {2}, True, id="shown-patient-not-a-recipient"),
        pytest.param({1, 2}, {1}, True, id="two-recipients-one-shown"),
        pytest.param({1, 2}, {1, 2}, True, id="two-recipients-both-shown"),
        pytest.param({1, 2}, set(), False, id="patients-all-in-bcc"),
        pytest.param(set(), {1, 2}, False, id="no-patient-recipients"),
        pytest.param(set(), set(), False, id="no-patients-at-all"),
    ],
)
def test_exposure_table(recipients: set[int], shown: set[int], exposed: bool) -> None:
    assert exposed_patients(frozenset(recipients), frozenset(shown)) is exposed
    decision = decide_exposure(frozenset(recipients), frozenset(shown))
    if exposed:
        assert decision == Decision(Outcome.DENY, Reason.PATIENTS_EXPOSED, EXPOSURE_RULE)
        assert decision.enhanced_code == "5.7.1"
    else:
        assert decision is None


# --- vocabulary and guards --------------------------------------------------------------------


@pytest.mark.parametrize("rcpt", [other("x@example.net"), patient((rel(11),), (consent(21),))])
def test_naive_now_is_refused(rcpt: RecipientFacts) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        decide_recipient(SMITH, rcpt, policy(), datetime(2026, 6, 10, 12, 0))


def test_reason_text_has_no_extra_entries() -> None:
    assert set(REASON_TEXT) == set(Reason)


@pytest.mark.parametrize("reason", list(Reason), ids=str)
def test_every_reason_has_text(reason: Reason) -> None:
    text = REASON_TEXT[reason]
    assert re.fullmatch(r"^[245]\.\d{1,3}\.\d{1,3}$", text.enhanced_code)
    assert text.sentence.strip()
    assert text.sentence == text.sentence.strip()


@pytest.mark.parametrize(
    ("unknown", "held_text"),
    [(UnknownExternal.QUARANTINE, True), (UnknownExternal.BOUNCE, False)],
    ids=str,
)
def test_unknown_external_sentence(unknown: UnknownExternal, held_text: bool) -> None:
    decision = decide_recipient(SMITH, other("x@example.net"), policy(unknown=unknown), NOW)
    assert decision.reason is Reason.UNKNOWN_EXTERNAL
    assert decision.sentence.startswith(REASON_TEXT[Reason.UNKNOWN_EXTERNAL].sentence)
    assert ("held for review" in decision.sentence) is held_text


@pytest.mark.parametrize(
    ("decision", "code"),
    [
        (Decision(Outcome.ALLOW, Reason.INTERNAL, INTERNAL_RULE), "2.1.5"),
        (Decision(Outcome.ALLOW, Reason.UNKNOWN_EXTERNAL, EXTERNAL_RULE), "2.1.5"),
        (Decision(Outcome.QUARANTINE, Reason.UNKNOWN_EXTERNAL, EXTERNAL_RULE), "2.1.5"),
        (held(21, 11), "2.1.5"),
        (denied(Reason.NO_CONSENT, CONSENT_RULE), "5.7.1"),
        (Decision(Outcome.DENY, Reason.UNKNOWN_EXTERNAL, EXTERNAL_RULE), "5.7.1"),
    ],
    ids=lambda v: f"{v.outcome}-{v.reason}" if isinstance(v, Decision) else str(v),
)
def test_decision_enhanced_code(decision: Decision, code: str) -> None:
    assert decision.enhanced_code == code


@pytest.mark.parametrize(
    ("key", "owned"),
    [
        (f"dr.smith@{PRACTICE}", True),
        (f"dr.jones@{PRACTICE}", False),
        (f"DR.SMITH@{PRACTICE}", False),  # keys arrive normalised; no folding here
        ("", False),
    ],
)
def test_sender_owns(key: str, owned: bool) -> None:
    assert sender_owns(SMITH, key) is owned


# --- properties over random registries --------------------------------------------------------

CLINICIANS = ("drsmith", "drjones", "drwho")
KEYS = (ANNA, ANNA_WORK, ANNA_IN_PRACTICE)
OTHER_KEYS = (*KEYS, f"colleague@{PRACTICE}", "lab@example.net")
ZONES = tuple(
    ZoneInfo(z)
    for z in ("UTC", "Europe/Berlin", "America/New_York", "Pacific/Auckland", "Asia/Kolkata")
)
# 2026-03-29: Berlin switches to summer time; Auckland is a day ahead.
BASE = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)
BASE_DAY = BASE.date()

_days = st.integers(-3, 3).map(lambda d: BASE_DAY + timedelta(days=d))
_offsets = st.one_of(st.sampled_from((-1, 0, 1)), st.integers(-3 * 86400, 3 * 86400)).map(
    lambda s: timedelta(seconds=s)
)

Case = tuple[SenderFacts, RecipientFacts, PolicySettings, datetime]

_clinician = st.sampled_from(CLINICIANS)
# Biased towards records that are in force, so that allowed mail is common too.
_maybe_day = st.one_of(st.none(), st.none(), _days)
_since = st.integers(-4, 1).map(lambda d: BASE_DAY + timedelta(days=d))
_relationship = st.tuples(_clinician, _since, _maybe_day)
_consent = st.tuples(
    st.booleans(),  # for the recipient's own key, else any of the patient's keys
    st.sampled_from(KEYS),
    st.none() | _clinician,
    _since,
    _maybe_day,
    st.one_of(st.none(), st.none(), _offsets),
    st.sampled_from(list(Delivery)),
    st.booleans(),
)
_certificate = st.tuples(_offsets, _offsets)
_sender = st.one_of(
    st.sampled_from((*CLINICIANS, "drnew")).map(
        lambda name: SenderFacts(name, Role.CLINICIAN, frozenset())
    ),
    st.sampled_from((Role.STAFF, Role.ADMIN)).map(
        lambda role: SenderFacts("mfa", role, frozenset())
    ),
)
_policy = st.builds(
    PolicySettings,
    st.just(frozenset({PRACTICE})),
    st.sampled_from(ZONES),
    st.sampled_from(list(UnknownExternal)),
    st.sampled_from(
        (StaffPatientMail.ON_BEHALF, StaffPatientMail.ON_BEHALF, StaffPatientMail.REFUSE)
    ),
)
_now = st.integers(-36 * 3600, 36 * 3600).map(lambda s: BASE + timedelta(seconds=s))


def _unique_ids(rows: list[Any]) -> st.SearchStrategy[list[int]]:
    n = len(rows)
    return st.lists(st.integers(1, 500), min_size=n, max_size=n, unique=True)


@st.composite
def _cases(draw: st.DrawFn, patients_only: bool = False) -> Case:
    now = draw(_now)
    sender = draw(_sender)
    pol = draw(_policy)
    if not patients_only and draw(st.integers(0, 6)) == 0:
        return sender, other(draw(st.sampled_from(OTHER_KEYS)), (cert(1),)), pol, now

    key = draw(st.sampled_from(KEYS))
    rel_rows = draw(st.lists(_relationship, min_size=1, max_size=3))
    consent_rows = draw(st.lists(_consent, min_size=1, max_size=4))
    cert_rows = draw(st.lists(_certificate, max_size=2))
    relationships = tuple(
        RelationshipFact(rid, *row)
        for rid, row in zip(draw(_unique_ids(rel_rows)), rel_rows, strict=True)
    )
    consents = tuple(
        ConsentFact(
            cid,
            key if own else k,
            clinician,
            valid_from,
            expires,
            None if rev is None else now + rev,
            dlv,
            risk,
        )
        for cid, (own, k, clinician, valid_from, expires, rev, dlv, risk) in zip(
            draw(_unique_ids(consent_rows)), consent_rows, strict=True
        )
    )
    certificates = tuple(
        CertificateFact(cert_id, now + before, now + after)
        for cert_id, (before, after) in zip(draw(_unique_ids(cert_rows)), cert_rows, strict=True)
    )
    facts = PatientFacts(draw(st.integers(1, 99)), relationships, consents)
    return sender, RecipientFacts(key, key, key.rpartition("@")[2], facts, certificates), pol, now


def _oracle_clinicians(case: Case) -> set[str]:
    """Independently: clinicians with an active relationship on whose behalf the sender acts."""
    sender, rcpt, pol, now = case
    facts = rcpt.patient
    assert facts is not None
    if sender.role is Role.CLINICIAN:
        acting = {sender.username}
    elif pol.staff_patient_mail is StaffPatientMail.ON_BEHALF:
        acting = set(CLINICIANS) | {r.clinician for r in facts.relationships}
    else:
        return set()
    return {
        r.clinician
        for r in facts.relationships
        if r.clinician in acting
        and relationship_status(r.since, r.ended_on, now, pol.zone) is RelationshipStatus.ACTIVE
    }


def _oracle_consents(case: Case) -> list[ConsentFact]:
    """Independently: active consents for this key, practice-wide or to such a clinician."""
    _, rcpt, pol, now = case
    assert rcpt.patient is not None
    clinicians = _oracle_clinicians(case)
    return [
        c
        for c in rcpt.patient.consents
        if c.address_key == rcpt.key
        and (c.clinician is None or c.clinician in clinicians)
        and consent_status(c.valid_from, c.expires, c.revoked_at, now, pol.zone)
        is ConsentStatus.ACTIVE
    ]


def _oracle_may_receive(case: Case) -> bool:
    return bool(_oracle_clinicians(case)) and bool(_oracle_consents(case))


def _valid_certificates(rcpt: RecipientFacts, now: datetime) -> list[CertificateFact]:
    return [c for c in rcpt.certificates if c.not_before <= now < c.not_after]


PROPERTY = settings(max_examples=250, deadline=None, database=None)


@PROPERTY
@given(_cases(patients_only=True))
def test_patient_allowed_only_with_relationship_and_consent(case: Case) -> None:
    decision = decide_recipient(*case)
    may = _oracle_may_receive(case)
    if decision.outcome is Outcome.ALLOW:
        assert may, decision
    # And the converse: with both, the message is never refused ...
    assert (decision.outcome is not Outcome.DENY) is may, decision
    if not may:
        return
    # ... and goes by the strongest channel the certificates and consents allow.
    deliveries = {(c.delivery, c.risk_acknowledged) for c in _oracle_consents(case)}
    if _valid_certificates(case[1], case[3]):
        expected = (Outcome.ALLOW, Protection.SMIME)
    elif any(delivery is Delivery.TLS for delivery, _ in deliveries):
        expected = (Outcome.ALLOW, Protection.TLS_REQUIRED)
    elif (Delivery.PLAIN, True) in deliveries:
        expected = (Outcome.ALLOW, Protection.TLS_OPPORTUNISTIC)
    else:
        expected = (Outcome.QUARANTINE, Protection.NONE)
    assert (decision.outcome, decision.protection) == expected, decision


@PROPERTY
@given(_cases())
def test_decide_recipient_is_deterministic(case: Case) -> None:
    first = decide_recipient(*case)
    assert decide_recipient(*case) == first
    assert decide_recipient(*copy.deepcopy(case)) == first


@PROPERTY
@given(_cases())
def test_patients_never_decided_as_internal_or_external(case: Case) -> None:
    _, rcpt, _, _ = case
    decision = decide_recipient(*case)
    if rcpt.patient is not None:
        assert decision.reason not in {Reason.INTERNAL, Reason.UNKNOWN_EXTERNAL}
        assert decision.patient_id == rcpt.patient.patient_id
    else:
        assert decision.reason in {Reason.INTERNAL, Reason.UNKNOWN_EXTERNAL}
        assert decision.patient_id is None
        assert decision.protection is Protection.NONE


@PROPERTY
@given(_cases(patients_only=True))
def test_patient_quarantine_only_for_no_secure_channel(case: Case) -> None:
    decision = decide_recipient(*case)
    if decision.outcome is Outcome.QUARANTINE:
        assert decision.reason is Reason.NO_SECURE_CHANNEL
        assert decision.protection is Protection.NONE
        assert decision.certificate_id is None
        assert not _valid_certificates(case[1], case[3])
    if decision.reason is Reason.NO_SECURE_CHANNEL:
        assert decision.outcome is Outcome.QUARANTINE


@PROPERTY
@given(_cases(patients_only=True))
def test_smime_only_with_a_valid_certificate(case: Case) -> None:
    _, rcpt, _, now = case
    decision = decide_recipient(*case)
    valid = {c.certificate_id for c in _valid_certificates(rcpt, now)}
    if decision.protection is Protection.SMIME:
        assert decision.outcome is Outcome.ALLOW
        assert decision.certificate_id in valid
    else:
        assert decision.certificate_id is None
    if decision.outcome is Outcome.ALLOW and valid:
        assert decision.protection is Protection.SMIME


@PROPERTY
@given(_cases(patients_only=True))
def test_allowed_patient_mail_cites_an_active_applicable_consent(case: Case) -> None:
    rcpt = case[1]
    decision = decide_recipient(*case)
    if decision.outcome is Outcome.DENY:
        return
    assert rcpt.patient is not None
    assert decision.relationship_id is not None
    cited = [c for c in _oracle_consents(case) if c.consent_id == decision.consent_id]
    assert len(cited) == 1, decision
    (chosen,) = cited
    relationship = [
        r for r in rcpt.patient.relationships if r.relationship_id == decision.relationship_id
    ]
    assert len(relationship) == 1, decision
    assert relationship[0].clinician in _oracle_clinicians(case)
    if decision.protection is Protection.TLS_OPPORTUNISTIC:
        assert chosen.delivery is Delivery.PLAIN
        assert chosen.risk_acknowledged
    if decision.protection is Protection.TLS_REQUIRED:
        assert chosen.delivery is Delivery.TLS
