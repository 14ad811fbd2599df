"""Status of consents and relationships, derived from the record and a clock.

The one place that says what "active" means (SPEC §5). Dates are days in the
practice's time zone: a consent is valid from the start of its ``valid_from``
day up to the start of its ``expires`` day, so it is already expired on that
day; a relationship ended on a day is no longer active on that day. A
revocation takes effect at its recorded instant.
"""

from __future__ import annotations

import enum
from datetime import date, datetime
from zoneinfo import ZoneInfo


class ConsentStatus(enum.StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"


class RelationshipStatus(enum.StrEnum):
    ACTIVE = "active"
    ENDED = "ended"
    NOT_YET_STARTED = "not-yet-started"


def practice_day(now: datetime, zone: ZoneInfo) -> date:
    """The calendar day it is at the practice at instant ``now``."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(zone).date()


def consent_status(
    valid_from: date,
    expires: date | None,
    revoked_at: datetime | None,
    now: datetime,
    zone: ZoneInfo,
) -> ConsentStatus:
    if revoked_at is not None and revoked_at <= now:
        return ConsentStatus.REVOKED
    today = practice_day(now, zone)
    if today < valid_from:
        return ConsentStatus.NOT_YET_VALID
    if expires is not None and today >= expires:
        return ConsentStatus.EXPIRED
    return ConsentStatus.ACTIVE


def relationship_status(
    since: date, ended_on: date | None, now: datetime, zone: ZoneInfo
) -> RelationshipStatus:
    today = practice_day(now, zone)
    if ended_on is not None and today >= ended_on:
        return RelationshipStatus.ENDED
    if today < since:
        return RelationshipStatus.NOT_YET_STARTED
    return RelationshipStatus.ACTIVE
