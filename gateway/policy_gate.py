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
from consent_registry.users import login_record
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

    def recheck(self, username: str | None, addresses: Sequence[str]) -> dict[str, Decision]:
        """Patient recipients decided again, as the registry stands now (blocking).

        Run before every delivery attempt: a consent revoked or a relationship
        ended while a message waited in the queue stops it from leaving.
        """
        with Session(self.engine) as session:
            found = login_record(session, username) if username else None
        parsed = [parse_address(a) for a in addresses]
        if found is None:
            return dict.fromkeys(addresses, _SENDER_GONE)
        return dict(zip(addresses, self.decide(found.sender, parsed), strict=True))

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
