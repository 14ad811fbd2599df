"""AUTH for staff: password checks off the event loop, back-off per client.

Failed logins from one client address are counted over a window; the next
attempt waits for a delay that doubles with each failure (``policies.throttle``),
and past the lock-out count every attempt is refused until the failures age
out, even with the right password. Counters live in this process's memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlmodel import Session

from consent_registry.db import session_scope
from consent_registry.passwords import verify_password
from consent_registry.users import login_record
from gateway.audit import AuditAction, AuditEntry, AuditLog
from policies.facts import SenderFacts
from policies.throttle import AuthThrottle, auth_verdict

FAILURE_WINDOW_SECONDS = 15 * 60


@dataclass(frozen=True)
class AuthOutcome:
    sender: SenderFacts | None
    locked_out: bool = False


class Authenticator:
    def __init__(
        self,
        engine: Engine,
        audit: AuditLog,
        throttle: AuthThrottle,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.audit = audit
        self.throttle = throttle
        self.monotonic = monotonic
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def _recent_failures(self, client: str) -> int:
        failures = self._failures[client]
        horizon = self.monotonic() - FAILURE_WINDOW_SECONDS
        while failures and failures[0] < horizon:
            failures.popleft()
        return len(failures)

    async def authenticate(self, client: str, login: str, password: str) -> AuthOutcome:
        verdict = auth_verdict(self._recent_failures(client), self.throttle)
        if verdict.locked_out:
            await asyncio.to_thread(self._audit, AuditAction.AUTH_LOCKED_OUT, client, login)
            return AuthOutcome(sender=None, locked_out=True)
        sender = await asyncio.to_thread(self._check, login, password)
        if sender is not None:
            self._failures.pop(client, None)
            return AuthOutcome(sender=sender)
        self._failures[client].append(self.monotonic())
        await asyncio.to_thread(self._audit, AuditAction.AUTH_FAILED, client, login)
        await asyncio.sleep(auth_verdict(self._recent_failures(client), self.throttle).delay)
        return AuthOutcome(sender=None)

    def _check(self, login: str, password: str) -> SenderFacts | None:
        with Session(self.engine) as session:
            found = login_record(session, login)
        matches = verify_password(found.password_hash if found else None, password)
        if found is None or not matches or found.disabled:
            return None
        return found.sender

    def _audit(self, action: AuditAction, client: str, login: str) -> None:
        with session_scope(self.engine) as session:
            self.audit.record(
                session,
                AuditEntry(
                    action=action,
                    actor="gateway",
                    username=login[:64],
                    detail=f"client {client}",
                ),
                datetime.now(UTC),
            )
