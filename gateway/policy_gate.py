"""Registry facts in, policy decisions out: the shell around ``policies``.

The SMTP hooks and ``cgw check`` ask the same gate, so what staff are told
before sending is what the gateway does when they send.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

from sqlalchemy import Engine

from consent_registry.addresses import Address, AddressError, parse_address
from consent_registry.facts_cache import CachedRegistry, FactsCache
from policies.decision import Decision, Outcome, Reason
from policies.engine import decide_exposure, decide_recipient
from policies.facts import PolicySettings, SenderFacts

# A patient message whose sender's account no longer exists is not delivered.
_SENDER_GONE = Decision(Outcome.DENY, Reason.NO_RELATIONSHIP, "sender-account-gone")


class PolicyGate:
    def __init__(
        self,
        engine: Engine,
        settings: PolicySettings,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        cache: FactsCache | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock
        self.cache = cache or FactsCache()

    @contextlib.contextmanager
    def registry(self) -> Iterator[CachedRegistry]:
        """The registry as it stands now, on one connection (blocking)."""
        with self.engine.connect() as connection:
            yield self.cache.on(connection)

    def decide(self, sender: SenderFacts, addresses: Sequence[Address]) -> list[Decision]:
        """One decision per address, from one read of the registry (blocking)."""
        with self.registry() as registry:
            return self._decide(registry, sender, addresses)

    def _decide(
        self, registry: CachedRegistry, sender: SenderFacts, addresses: Sequence[Address]
    ) -> list[Decision]:
        facts = registry.recipient_facts(addresses)
        now = self.clock()
        return [decide_recipient(sender, f, self.settings, now) for f in facts]

    def recheck(
        self,
        username: str | None,
        addresses: Sequence[str],
        registry: CachedRegistry | None = None,
    ) -> dict[str, Decision]:
        """Patient recipients decided again, as the registry stands now (blocking).

        Run before every delivery attempt: a consent revoked or a relationship
        ended while a message waited in the queue stops it from leaving. With
        the registry unchanged since the last look, this reads one row; with
        ``registry`` (read just now by the caller), none.
        """
        if registry is None:
            with self.registry() as registry:
                return self.recheck(username, addresses, registry)
        parsed = [parse_address(a) for a in addresses]
        found = registry.login_record(username) if username else None
        if found is None:
            return dict.fromkeys(addresses, _SENDER_GONE)
        decided = self._decide(registry, found.sender, parsed)
        return dict(zip(addresses, decided, strict=True))

    def exposure(self, recipient_patients: frozenset[int], shown: Sequence[str]) -> Decision | None:
        """The header rule for the addresses shown in To and Cc (blocking)."""
        if not recipient_patients:
            return None
        parsed = []
        for text in shown:
            try:
                parsed.append(parse_address(text))
            except AddressError:
                continue
        with self.registry() as registry:
            facts = registry.recipient_facts(parsed)
        shown_patients = frozenset(f.patient.patient_id for f in facts if f.patient is not None)
        return decide_exposure(recipient_patients, shown_patients)
