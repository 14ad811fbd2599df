"""AUTH failure back-off per client address.

The gateway counts recent failed logins from one client address and asks
this module what to do with the next attempt: answer after a growing delay,
or refuse outright until the failures age out. Guessing passwords then costs
an attacker time that grows exponentially, while a physician who mistypes
once barely notices.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AuthThrottle:
    """Settings of the back-off: base delay (s), cap (s), lock-out count."""

    base_delay: float
    max_delay: float
    lockout_after: int


@dataclass(frozen=True)
class AuthVerdict:
    locked_out: bool
    delay: float


def auth_verdict(recent_failures: int, throttle: AuthThrottle) -> AuthVerdict:
    """How to treat an AUTH attempt after ``recent_failures`` failures.

    ``delay`` is how long to wait before answering a failure; ``locked_out``
    means the attempt is refused without looking at the password at all.
    """
    locked_out = recent_failures >= throttle.lockout_after
    if recent_failures == 0:
        return AuthVerdict(locked_out=locked_out, delay=0.0)
    exponent = min(recent_failures - 1, 32)
    delay = min(throttle.base_delay * float(1 << exponent), throttle.max_delay)
    return AuthVerdict(locked_out=locked_out, delay=delay)
