"""Frozen inputs to the policy engine.

The shell (``gateway``) and the registry (``consent_registry``) build these
from the SMTP dialogue and the database; the engine reads nothing else.
Addresses arrive already normalised: ``key`` is the canonical matching key
and ``domain`` the lower-case IDNA (A-label) form of the domain.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import date, datetime
from zoneinfo import ZoneInfo


class Role(enum.StrEnum):
    """What a staff account is: clinicians hold patient relationships."""

    CLINICIAN = "clinician"
    STAFF = "staff"
    ADMIN = "admin"


class Delivery(enum.StrEnum):
    """How a consent lets mail reach the patient (SPEC §5)."""

    ENCRYPTED = "encrypted"  # S/MIME only
    TLS = "tls"  # S/MIME, else TLS with a verified certificate
    PLAIN = "plain"  # also unencrypted: the patient acknowledged the risk


class UnknownExternal(enum.StrEnum):
    ALLOW = "allow"
    QUARANTINE = "quarantine"
    BOUNCE = "bounce"


class StaffPatientMail(enum.StrEnum):
    """Whether staff (not clinicians) may e-mail patients."""

    REFUSE = "refuse"
    ON_BEHALF = "on-behalf"  # for a clinician with an active relationship


@dataclass(frozen=True)
class SenderFacts:
    """The authenticated user on whose behalf a message is sent."""

    username: str
    role: Role
    address_keys: frozenset[str]


@dataclass(frozen=True)
class ConsentFact:
    consent_id: int
    address_key: str
    clinician: str | None  # user name; None: practice-wide
    valid_from: date
    expires: date | None
    revoked_at: datetime | None
    delivery: Delivery
    risk_acknowledged: bool


@dataclass(frozen=True)
class RelationshipFact:
    relationship_id: int
    clinician: str
    since: date
    ended_on: date | None


@dataclass(frozen=True)
class CertificateFact:
    certificate_id: int
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class PatientFacts:
    """What the registry holds about the patient an address belongs to."""

    patient_id: int
    relationships: tuple[RelationshipFact, ...] = ()
    consents: tuple[ConsentFact, ...] = ()


@dataclass(frozen=True)
class RecipientFacts:
    """One envelope recipient, as the registry recognises it."""

    address: str
    key: str
    domain: str
    patient: PatientFacts | None = None
    certificates: tuple[CertificateFact, ...] = field(default=())


@dataclass(frozen=True)
class PolicySettings:
    """The subset of the gateway's settings that decisions depend on."""

    practice_domains: frozenset[str]
    zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    unknown_external: UnknownExternal = UnknownExternal.ALLOW
    staff_patient_mail: StaffPatientMail = StaffPatientMail.ON_BEHALF
