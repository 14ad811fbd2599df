"""Frozen inputs to the policy engine.

The shell (``gateway``) and the registry (``consent_registry``) build these
from the SMTP dialogue and the database; the engine reads nothing else.
Addresses arrive already normalised: ``key`` is the canonical matching key
and ``domain`` the lower-case IDNA (A-label) form of the domain.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    """What a staff account is: clinicians hold patient relationships."""

    CLINICIAN = "clinician"
    STAFF = "staff"
    ADMIN = "admin"


@dataclass(frozen=True)
class SenderFacts:
    """The authenticated user on whose behalf a message is sent."""

    username: str
    role: Role
    address_keys: frozenset[str]


@dataclass(frozen=True)
class RecipientFacts:
    """One envelope recipient, as the registry recognises it."""

    address: str
    key: str
    domain: str


@dataclass(frozen=True)
class PolicySettings:
    """The subset of the gateway's settings that decisions depend on."""

    practice_domains: frozenset[str]
