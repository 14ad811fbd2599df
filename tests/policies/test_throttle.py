"""AUTH failure back-off (policies.throttle.auth_verdict)."""

from __future__ import annotations

import pytest

from policies.throttle import AuthThrottle, AuthVerdict, auth_verdict

THROTTLE = AuthThrottle(base_delay=1.0, max_delay=30.0, lockout_after=10)


@pytest.mark.parametrize(
    ("failures", "expected"),
    [
        (0, AuthVerdict(locked_out=False, delay=0.0)),
        (1, AuthVerdict(locked_out=False, delay=1.0)),
        (2, AuthVerdict(locked_out=False, delay=2.0)),
        (3, AuthVerdict(locked_out=False, delay=4.0)),
        (4, AuthVerdict(locked_out=False, delay=8.0)),
        (5, AuthVerdict(locked_out=False, delay=16.0)),
        (6, AuthVerdict(locked_out=False, delay=30.0)),  # 32 s, capped
        (9, AuthVerdict(locked_out=False, delay=30.0)),
        (10, AuthVerdict(locked_out=True, delay=30.0)),  # locked out from lockout_after on
        (11, AuthVerdict(locked_out=True, delay=30.0)),
        (100, AuthVerdict(locked_out=True, delay=30.0)),
        (10_000, AuthVerdict(locked_out=True, delay=30.0)),  # no overflow
    ],
)
def test_auth_verdict_table(failures: int, expected: AuthVerdict) -> None:
    assert auth_verdict(failures, THROTTLE) == expected


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (5, 2.5), (50, 2.5)],
)
def test_delays_double_from_base_and_cap_at_max(failures: int, delay: float) -> None:
    throttle = AuthThrottle(base_delay=0.25, max_delay=2.5, lockout_after=1000)
    assert auth_verdict(failures, throttle).delay == delay


@pytest.mark.parametrize(
    ("lockout_after", "failures", "locked"),
    [
        (3, 2, False),
        (3, 3, True),
        (3, 4, True),
        (1, 0, False),
        (1, 1, True),
    ],
)
def test_lockout_starts_exactly_at_lockout_after(
    lockout_after: int, failures: int, locked: bool
) -> None:
    throttle = AuthThrottle(base_delay=1.0, max_delay=60.0, lockout_after=lockout_after)
    assert auth_verdict(failures, throttle).locked_out is locked


def test_zero_base_delay_never_delays() -> None:
    throttle = AuthThrottle(base_delay=0.0, max_delay=60.0, lockout_after=5)
    assert [auth_verdict(n, throttle).delay for n in range(8)] == [0.0] * 8
    assert [auth_verdict(n, throttle).locked_out for n in range(8)] == [False] * 5 + [True] * 3


def test_delays_never_decrease() -> None:
    delays = [auth_verdict(n, THROTTLE).delay for n in range(40)]
    assert delays == sorted(delays)
    assert max(delays) == THROTTLE.max_delay
