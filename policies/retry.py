"""When to try a deferred delivery again: exponential back-off with jitter.

Pure: the caller passes the attempt count, the clock and a jitter draw in
[0, 1), so the schedule is reproducible in tests.
"""

from __future__ import annotations

from datetime import datetime, timedelta

JITTER_SPAN = 0.2  # each delay is stretched or shrunk by up to 20 %


def retry_delay(attempts: int, base: timedelta, cap: timedelta, jitter: float) -> timedelta:
    """Delay before the next try after ``attempts`` failed tries (>= 1)."""
    if attempts < 1:
        raise ValueError("attempts counts failed tries and starts at 1")
    if not 0.0 <= jitter < 1.0:
        raise ValueError("jitter is a draw from [0, 1)")
    exponent = min(attempts - 1, 64)
    # Work in float seconds: base * 2**n as a timedelta overflows long before the cap.
    raw = min(base.total_seconds() * float(1 << exponent), cap.total_seconds())
    factor = 1.0 + JITTER_SPAN * (2.0 * jitter - 1.0)
    return timedelta(seconds=min(raw * factor, cap.total_seconds()))


def next_attempt(
    attempts: int, now: datetime, base: timedelta, cap: timedelta, jitter: float
) -> datetime:
    """The moment the next delivery attempt is due."""
    return now + retry_delay(attempts, base, cap, jitter)


def expired(first_attempt: datetime, now: datetime, lifetime: timedelta) -> bool:
    """A message still undeliverable after its queue lifetime is given up."""
    return now - first_attempt >= lifetime
