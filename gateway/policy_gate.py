"""Registry facts in, policy decisions out: the shell around ``policies``.

The SMTP hooks and ``cgw check`` ask the same gate, so what staff are told
before sending is what the gateway does when they send.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlmodel import Session

from consent_registry.addresses import Address, AddressError, parse_address
from consent_registry.recipient_facts import patients_by_key, recipient_facts
from policies.decision import Decision
from policies.engine import decide_exposure, decide_recipient
from policies.facts import PolicySettings, SenderFacts


class PolicyGate:
    def __init__(
        self,
        engine: Engine,
        settings: PolicySettings,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock

    def decide(self, sender: SenderFacts, addresses: Sequence[Address]) -> list[Decision]:
        """One decision per address, from one read of the registry (blocking)."""
        with Session(self.engine) as session:
            facts = recipient_facts(session, addresses)
        now = self.clock()
        return [decide_recipient(sender, f, self.settings, now) for f in facts]

    def exposure(self, recipient_patients: frozenset[int], shown: Sequence[str]) -> Decision | None:
        """The header rule for the addresses shown in To and Cc (blocking)."""
        if not recipient_patients:
            return None
        keys = []
        for text in shown:
            try:
                keys.append(parse_address(text).key)
            except AddressError:
                continue
        with Session(self.engine) as session:
            shown_patients = frozenset(patients_by_key(session, keys).values())
        return decide_exposure(recipient_patients, shown_patients)
