"""The verified-login cache: Argon2 once per password per few minutes, and
never a way around a password change, a disabled account or a wrong password."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine

from consent_registry import users
from consent_registry.db import make_engine, session_scope
from gateway import auth
from gateway.app import initialise
from gateway.audit import audit_log
from gateway.auth import VERIFIED_FOR_SECONDS, Authenticator
from gateway.settings import Settings
from policies.throttle import AuthThrottle

PASSWORD = "a long enough password"
CLIENT = "192.0.2.7"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(make_settings: Callable[..., Settings]) -> Iterator[tuple[Engine, Settings]]:
    settings = make_settings()
    initialise(settings)
    engine = make_engine(settings.database_url)
    with session_scope(engine) as session:
        users.add_user(
            session,
            "drsmith",
            ["dr.smith@praxis.example"],
            "clinician",
            PASSWORD,
            "test",
            datetime.now(UTC),
        )
    yield engine, settings
    engine.dispose()


@pytest.fixture
def argon2_checks(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every real Argon2 verification the authenticator runs, and its result."""
    checks: list[bool] = []
    real = auth.verify_password

    def counted(password_hash: str | None, password: str) -> bool:
        result = real(password_hash, password)
        checks.append(result)
        return result

    monkeypatch.setattr(auth, "verify_password", counted)
    return checks


def _authenticator(engine: Engine, settings: Settings, clock: Clock) -> Authenticator:
    throttle = AuthThrottle(base_delay=0.0, max_delay=0.0, lockout_after=100)
    return Authenticator(engine, audit_log(settings), throttle, clock)


def _login(authenticator: Authenticator, password: str = PASSWORD) -> str | None:
    outcome = asyncio.run(authenticator.authenticate(CLIENT, "drsmith", password))
    return outcome.sender.username if outcome.sender else None


def test_a_verified_password_is_not_hashed_again_until_it_expires(
    engine: tuple[Engine, Settings], argon2_checks: list[bool]
) -> None:
    clock = Clock()
    authenticator = _authenticator(*engine, clock)
    assert [_login(authenticator) for _ in range(3)] == ["drsmith"] * 3
    assert argon2_checks == [True]
    clock.now += VERIFIED_FOR_SECONDS + 1
    assert _login(authenticator) == "drsmith"
    assert argon2_checks == [True, True]


def test_wrong_passwords_are_never_remembered(
    engine: tuple[Engine, Settings], argon2_checks: list[bool]
) -> None:
    authenticator = _authenticator(*engine, Clock())
    assert _login(authenticator) == "drsmith"
    assert [_login(authenticator, "not the password") for _ in range(2)] == [None, None]
    assert argon2_checks == [True, False, False]


def test_a_password_change_or_a_disabled_account_takes_effect_at_once(
    engine: tuple[Engine, Settings], argon2_checks: list[bool]
) -> None:
    db, settings = engine
    authenticator = _authenticator(db, settings, Clock())
    assert _login(authenticator) == "drsmith"
    with session_scope(db) as session:
        users.set_password(session, "drsmith", "the new long password")
    assert _login(authenticator) is None  # the old password, remembered, no longer works
    assert _login(authenticator, "the new long password") == "drsmith"
    with session_scope(db) as session:
        users.disable_user(session, "drsmith", "test", datetime.now(UTC))
    assert _login(authenticator, "the new long password") is None
    assert argon2_checks == [True, False, True, False]
