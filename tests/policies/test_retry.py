"""Delivery retry schedule (policies.retry): exponential back-off with jitter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.retry import JITTER_SPAN, expired, next_attempt, retry_delay

BASE = timedelta(minutes=5)
CAP = timedelta(minutes=60)
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [
        (1, timedelta(minutes=5)),
        (2, timedelta(minutes=10)),
        (3, timedelta(minutes=20)),
        (4, timedelta(minutes=40)),
        (5, timedelta(minutes=60)),  # 80 min, capped
        (6, timedelta(minutes=60)),
        (10, timedelta(minutes=60)),
        (33, timedelta(minutes=60)),
        (1000, timedelta(minutes=60)),
    ],
)
def test_delay_without_stretch_doubles_and_caps(attempts: int, expected: timedelta) -> None:
    assert retry_delay(attempts, BASE, CAP, 0.5) == expected


@pytest.mark.parametrize(
    ("attempts", "jitter", "expected"),
    [
        (1, 0.0, timedelta(minutes=4)),  # -20 %
        (1, 0.25, timedelta(minutes=4, seconds=30)),  # -10 %
        (1, 0.75, timedelta(minutes=5, seconds=30)),  # +10 %
        (2, 0.0, timedelta(minutes=8)),
        (3, 0.75, timedelta(minutes=22)),
        (4, 0.75, timedelta(minutes=44)),
        (4, 0.0, timedelta(minutes=32)),
        (5, 0.0, timedelta(minutes=48)),  # the cap, shrunk by 20 %
        (5, 0.75, timedelta(minutes=60)),  # stretched past the cap: the cap
    ],
)
def test_delay_with_jitter(attempts: int, jitter: float, expected: timedelta) -> None:
    assert retry_delay(attempts, BASE, CAP, jitter) == expected


@pytest.mark.parametrize("attempts", [1, 2, 3, 4, 5, 8, 40])
def test_jitter_bounds_stay_within_twenty_percent_and_cap(attempts: int) -> None:
    raw = min(BASE * 2 ** min(attempts - 1, 8), CAP)
    low = retry_delay(attempts, BASE, CAP, 0.0)
    high = retry_delay(attempts, BASE, CAP, 0.999999)
    assert JITTER_SPAN == 0.2
    assert low == raw * 0.8
    assert raw * 0.8 <= high <= min(raw * 1.2, CAP)
    assert low <= high <= CAP


@pytest.mark.parametrize("attempts", [0, -1, -100])
def test_attempts_below_one_are_refused(attempts: int) -> None:
    with pytest.raises(ValueError, match="attempts"):
        retry_delay(attempts, BASE, CAP, 0.5)


@pytest.mark.parametrize("jitter", [-0.0001, -1.0, 1.0, 1.5, float("nan")])
def test_jitter_outside_unit_interval_is_refused(jitter: float) -> None:
    with pytest.raises(ValueError, match="jitter"):
        retry_delay(1, BASE, CAP, jitter)


def test_next_attempt_adds_delay_to_now() -> None:
    assert next_attempt(3, NOW, BASE, CAP, 0.5) == NOW + timedelta(minutes=20)
    assert next_attempt(9, NOW, BASE, CAP, 0.0) == NOW + timedelta(minutes=48)


@pytest.mark.parametrize(
    ("age", "is_expired"),
    [
        (timedelta(days=5), True),
        (timedelta(days=5) - timedelta(microseconds=1), False),
        (timedelta(days=5, microseconds=1), True),
        (timedelta(0), False),
        (timedelta(days=6), True),
    ],
)
def test_expired_boundary(age: timedelta, is_expired: bool) -> None:
    assert expired(NOW, NOW + age, timedelta(days=5)) is is_expired


# --- properties -------------------------------------------------------------------------------

_positive = st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=30))
_jitter = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@given(
    base=_positive,
    cap=_positive,
    jitter=_jitter,
    attempts=st.integers(min_value=1, max_value=200),
)
def test_delay_is_monotonic_in_attempts(
    base: timedelta, cap: timedelta, jitter: float, attempts: int
) -> None:
    assert retry_delay(attempts, base, cap, jitter) <= retry_delay(attempts + 1, base, cap, jitter)


@given(
    base=_positive,
    cap=_positive,
    jitter=_jitter,
    attempts=st.integers(min_value=1, max_value=200),
)
def test_delay_is_positive_and_capped(
    base: timedelta, cap: timedelta, jitter: float, attempts: int
) -> None:
    delay = retry_delay(attempts, base, cap, jitter)
    assert timedelta(0) < delay <= cap


def test_large_base_many_attempts_is_capped_not_overflowing() -> None:
    # Any base above 999999999 days / 2**32 (about 5 h 35 min) overflows at attempt 33,
    # e.g. CGW_RETRY_BACKOFF=6h with CGW_QUEUE_LIFETIME above 8.25 days.
    base = timedelta(hours=6)
    assert retry_delay(33, base, base, 0.5) == base
