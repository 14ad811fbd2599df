"""Status derivation over the clock (SPEC §5 day boundaries), table-driven."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.status import (
    ConsentStatus,
    RelationshipStatus,
    consent_status,
    practice_day,
    relationship_status,
)

BERLIN = ZoneInfo("Europe/Berlin")
# 2026-06-10 00:30 in Berlin is still 2026-06-09 in UTC.
JUST_AFTER_MIDNIGHT_BERLIN = datetime(2026, 6, 9, 22, 30, tzinfo=UTC)
NOON = datetime(2026, 6, 10, 10, 0, tzinfo=UTC)
D = date(2026, 6, 10)


@pytest.mark.parametrize(
    ("valid_from", "expires", "revoked_at", "now", "expected"),
    [
        (D + timedelta(days=1), None, None, NOON, ConsentStatus.NOT_YET_VALID),
        (D, None, None, NOON, ConsentStatus.ACTIVE),  # starts today
        (D, None, None, JUST_AFTER_MIDNIGHT_BERLIN, ConsentStatus.ACTIVE),  # Berlin day, not UTC
        (D - timedelta(days=30), D + timedelta(days=1), None, NOON, ConsentStatus.ACTIVE),
        (D - timedelta(days=30), D, None, NOON, ConsentStatus.EXPIRED),  # expired on the day
        (D - timedelta(days=30), D, None, JUST_AFTER_MIDNIGHT_BERLIN, ConsentStatus.EXPIRED),
        (D - timedelta(days=30), None, NOON - timedelta(seconds=1), NOON, ConsentStatus.REVOKED),
        (D - timedelta(days=30), None, NOON, NOON, ConsentStatus.REVOKED),  # at this instant
        (D - timedelta(days=30), None, NOON + timedelta(seconds=1), NOON, ConsentStatus.ACTIVE),
        (D - timedelta(days=30), D, NOON - timedelta(days=1), NOON, ConsentStatus.REVOKED),
        (D + timedelta(days=5), None, NOON - timedelta(seconds=1), NOON, ConsentStatus.REVOKED),
    ],
)
def test_consent_status(
    valid_from: date,
    expires: date | None,
    revoked_at: datetime | None,
    now: datetime,
    expected: ConsentStatus,
) -> None:
    assert consent_status(valid_from, expires, revoked_at, now, BERLIN) is expected


@pytest.mark.parametrize(
    ("since", "ended_on", "now", "expected"),
    [
        (D, None, NOON, RelationshipStatus.ACTIVE),
        (D + timedelta(days=1), None, NOON, RelationshipStatus.NOT_YET_STARTED),
        (D - timedelta(days=400), D, NOON, RelationshipStatus.ENDED),  # ended today
        (D - timedelta(days=400), D, JUST_AFTER_MIDNIGHT_BERLIN, RelationshipStatus.ENDED),
        (D - timedelta(days=400), D + timedelta(days=1), NOON, RelationshipStatus.ACTIVE),
    ],
)
def test_relationship_status(
    since: date, ended_on: date | None, now: datetime, expected: RelationshipStatus
) -> None:
    assert relationship_status(since, ended_on, now, BERLIN) is expected


def test_practice_day_needs_an_aware_clock() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        practice_day(datetime(2026, 1, 1), BERLIN)


@given(
    valid_from=st.dates(date(2020, 1, 1), date(2030, 1, 1)),
    length=st.one_of(st.none(), st.integers(1, 3000)),
    now=st.datetimes(datetime(2019, 1, 1), datetime(2032, 1, 1), timezones=st.just(UTC)),
)
def test_active_exactly_inside_the_window(
    valid_from: date, length: int | None, now: datetime
) -> None:
    expires = None if length is None else valid_from + timedelta(days=length)
    status = consent_status(valid_from, expires, None, now, BERLIN)
    today = now.astimezone(BERLIN).date()
    inside = valid_from <= today and (expires is None or today < expires)
    assert (status is ConsentStatus.ACTIVE) == inside
