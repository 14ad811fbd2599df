"""Registry facts in, policy decisions out: the shell around ``policies``.

The SMTP hooks and ``cgw check`` ask the same gate, so what staff are told
before sending is what the gateway does when they send.

The event loop asks through the ``*_async`` methods: on SQLite, with the
facts in memory and the registry unchanged, they decide on the loop itself
(a few microseconds); otherwise they read the registry in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

from sqlalchemy import Engine

from consent_registry.addresses import Address, AddressError, parse_address
from consent_registry.facts_cache import CachedRegistry, CacheMiss, FactsCache, GenerationProbe
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
        self._probe = GenerationProbe.for_engine(engine)

    @contextlib.contextmanager
    def registry(self) -> Iterator[CachedRegistry]:
        """The registry as it stands now, on one connection (blocking)."""
        with self.engine.connect() as connection:
            yield self.cache.on(connection)

    def in_memory(self) -> CachedRegistry | None:
        """The registry from memory alone, if it has not moved since the facts
        were read (SQLite: one row read on the caller's thread); None otherwise.
        Its lookups raise ``CacheMiss`` for facts not in memory."""
        generation = self._probe.read() if self._probe is not None else None
        return None if generation is None else self.cache.in_memory(generation)

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()

    def decide(self, sender: SenderFacts, addresses: Sequence[Address]) -> list[Decision]:
        """One decision per address, from one read of the registry (blocking)."""
        with self.registry() as registry:
            return self._decide(registry, sender, addresses)

    async def decide_async(
        self, sender: SenderFacts, addresses: Sequence[Address]
    ) -> list[Decision]:
        """``decide`` for the event loop: from memory when it can, else in a thread."""
        registry = self.in_memory()
        if registry is not None:
            with contextlib.suppress(CacheMiss):
                return self._decide(registry, sender, addresses)
        return await asyncio.to_thread(self.decide, sender, addresses)

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
        with self.registry() as registry:
            return self._exposure(registry, recipient_patients, shown)

    async def exposure_async(
        self, recipient_patients: frozenset[int], shown: Sequence[str]
    ) -> Decision | None:
        """``exposure`` for the event loop: from memory when it can, else in a thread."""
        if not recipient_patients:
            return None
        registry = self.in_memory()
        if registry is not None:
            with contextlib.suppress(CacheMiss):
                return self._exposure(registry, recipient_patients, shown)
        return await asyncio.to_thread(self.exposure, recipient_patients, shown)

    @staticmethod
    def _exposure(
        registry: CachedRegistry, recipient_patients: frozenset[int], shown: Sequence[str]
    ) -> Decision | None:
        parsed = []
        for text in shown:
            try:
                parsed.append(parse_address(text))
            except AddressError:
                continue
        facts = registry.recipient_facts(parsed)
        shown_patients = frozenset(f.patient.patient_id for f in facts if f.patient is not None)
        return decide_exposure(recipient_patients, shown_patients)
