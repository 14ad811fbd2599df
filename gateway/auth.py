"""AUTH for staff: password checks off the event loop, back-off per client.

Failed logins from one client address are counted over a window; the next
attempt waits for a delay that doubles with each failure (``policies.throttle``),
and past the lock-out count every attempt is refused until the failures age
out, even with the right password. Counters live in this process's memory.

A successful check is remembered for a few minutes, as Dovecot's auth cache
does: Argon2 costs ~150 ms of CPU, and mail clients log in for every batch of
messages. What is kept is an HMAC (with a key that lives only in this
process) over the user, the stored password hash and the password: a
password change (a new hash) or a disabled account takes effect at once,
because the account is read from the database at every login. Failures are
never remembered.

Password checks run one at a time, on a thread of their own: each Argon2
verification takes 64 MiB (its memory cost), so ten clients logging in at once
cost 640 MB when run side by side. One at a time, the first login of a user
fills the cache and the other nine are answered from it, and the database
threads stay free for mail.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine

from consent_registry.db import session_scope
from consent_registry.passwords import verify_password
from consent_registry.users import login_record
from gateway.audit import AuditAction, AuditEntry, AuditLog
from policies.facts import SenderFacts
from policies.throttle import AuthThrottle, auth_verdict

FAILURE_WINDOW_SECONDS = 15 * 60
VERIFIED_FOR_SECONDS = 5 * 60
VERIFIED_MAX_ENTRIES = 10_000


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
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[bytes, float] = {}  # digest -> until (monotonic)
        self._verified_lock = threading.Lock()
        self._checks = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cgw-auth")

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
        loop = asyncio.get_running_loop()
        sender = await loop.run_in_executor(self._checks, self._check, login, password)
        if sender is not None:
            self._failures.pop(client, None)
            return AuthOutcome(sender=sender)
        self._failures[client].append(self.monotonic())
        await asyncio.to_thread(self._audit, AuditAction.AUTH_FAILED, client, login)
        await asyncio.sleep(auth_verdict(self._recent_failures(client), self.throttle).delay)
        return AuthOutcome(sender=None)

    def _check(self, login: str, password: str) -> SenderFacts | None:
        with self.engine.connect() as connection:
            found = login_record(connection, login)
        if found is None or found.disabled:
            verify_password(None, password)  # the same time as a wrong password
            return None
        digest = hmac.new(
            self._cache_key,
            b"\0".join(
                (found.sender.username.encode(), found.password_hash.encode(), password.encode())
            ),
            hashlib.sha256,
        ).digest()
        if self._recently_verified(digest):
            return found.sender
        if not verify_password(found.password_hash, password):
            return None
        self._remember(digest)
        return found.sender

    def _recently_verified(self, digest: bytes) -> bool:
        with self._verified_lock:
            until = self._verified.get(digest)
            return until is not None and until > self.monotonic()

    def _remember(self, digest: bytes) -> None:
        now = self.monotonic()
        with self._verified_lock:
            if len(self._verified) >= VERIFIED_MAX_ENTRIES:
                self._verified = {d: u for d, u in self._verified.items() if u > now}
                if len(self._verified) >= VERIFIED_MAX_ENTRIES:
                    self._verified.clear()
            self._verified[digest] = now + VERIFIED_FOR_SECONDS

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
