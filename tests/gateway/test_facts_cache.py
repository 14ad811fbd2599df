"""Registry facts kept between messages: served from memory, dropped on any registry change."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlmodel import select

from consent_registry import certificates
from consent_registry.addresses import parse_address
from consent_registry.db import make_engine
from consent_registry.facts_cache import CacheMiss
from consent_registry.models import RecipientCertificate
from gateway.app import initialise
from gateway.policy_gate import PolicyGate
from gateway.settings import Settings
from policies.decision import Outcome
from tests.conftest import create_user
from tests.practice import SENDER, Practice, now
from tests.smime_pki import SmimeCA

PATIENT = "pat.jones@example.org"


@pytest.fixture
def practice(make_settings: Callable[..., Settings]) -> Practice:
    settings = make_settings()
    initialise(settings)
    return Practice(settings)


@pytest.fixture
def engine(practice: Practice) -> Iterator[Engine]:
    engine = make_engine(practice.settings.database_url)
    yield engine
    engine.dispose()


def _generation(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT value FROM registry_generation")).scalar_one())


def _statements(engine: Engine) -> list[str]:
    """Every statement the engine runs from now on."""
    seen: list[str] = []

    def count(*args: Any) -> None:
        seen.append(args[2])

    event.listen(engine, "before_cursor_execute", count)
    return seen


def test_every_kind_of_registry_change_moves_the_generation(
    practice: Practice, engine: Engine
) -> None:
    consent_ids: list[int] = []
    relationship_ids: list[int] = []
    steps: list[tuple[str, Callable[[], object]]] = [
        ("user and address", lambda: create_user(practice.settings, "drsmith", [SENDER])),
        ("patient and address", lambda: practice.patient("Pat Jones", PATIENT, "MRN-1")),
        ("relationship", lambda: relationship_ids.append(practice.relate("MRN-1", "drsmith"))),
        ("consent granted", lambda: consent_ids.append(practice.consent("MRN-1", PATIENT))),
        ("consent revoked", lambda: practice.revoke(consent_ids[0])),
        ("relationship ended", lambda: practice.end_relationship(relationship_ids[0])),
    ]
    for what, change in steps:
        before = _generation(engine)
        change()
        assert _generation(engine) > before, f"{what} left the generation at {before}"


def test_facts_are_served_from_memory_until_the_registry_changes(
    practice: Practice, engine: Engine
) -> None:
    create_user(practice.settings, "drsmith", [SENDER])
    practice.patient("Pat Jones", PATIENT, "MRN-1")
    practice.relate("MRN-1", "drsmith")
    consent_id = practice.consent("MRN-1", PATIENT, delivery="tls")
    gate = PolicyGate(engine, practice.settings.policy())
    (allowed,) = gate.recheck("drsmith", [PATIENT]).values()
    assert allowed.outcome is Outcome.ALLOW

    statements = _statements(engine)
    (again,) = gate.recheck("drsmith", [PATIENT]).values()
    assert again == allowed
    assert len(statements) == 1 and "registry_generation" in statements[0], statements

    practice.revoke(consent_id)  # another engine, as the CLI would
    (after,) = gate.recheck("drsmith", [PATIENT]).values()
    assert after.outcome is not Outcome.ALLOW
    assert len(statements) > 2  # the facts were read again
    # The header rule reads the same cache: this patient's address shown in a
    # message to somebody else is caught.
    assert gate.exposure(frozenset({-1}), [PATIENT]) is not None


def test_a_certificate_is_parsed_once_and_forgotten_when_removed(
    practice: Practice, engine: Engine
) -> None:
    """S/MIME reads the certificate through the same cache: once per generation,
    and a certificate removed behind the gateway's back is no longer on file."""
    practice.patient("Pat Jones", PATIENT, "MRN-1")
    issued = SmimeCA().issue(PATIENT)
    with practice.session() as session:
        certificates.import_certificate(session, PATIENT, issued.pem(), "test", now())
    with practice.session() as session:
        (certificate_id,) = session.exec(select(RecipientCertificate.id)).all()
    assert certificate_id is not None
    gate = PolicyGate(engine, practice.settings.policy())
    with gate.registry() as registry:
        on_file = registry.certificate(certificate_id)
    assert on_file is not None
    assert on_file.certificate.serial_number == issued.cert.serial_number

    statements = _statements(engine)
    with gate.registry() as registry:
        assert registry.certificate(certificate_id) == on_file
    assert len(statements) == 1 and "registry_generation" in statements[0], statements

    with practice.session() as session:  # as somebody with sqlite3 in hand would
        session.execute(text("DELETE FROM recipient_certificate"))
    with gate.registry() as registry:
        assert registry.certificate(certificate_id) is None


def test_the_event_loop_decides_from_memory_and_sees_every_change_at_once(
    practice: Practice, engine: Engine
) -> None:
    """On SQLite ``decide_async`` on a warm cache runs no statement through the
    engine (and takes no thread); a change made elsewhere is seen by the very
    next decision. PostgreSQL always reads in a thread (a network round trip)."""
    create_user(practice.settings, "drsmith", [SENDER])
    practice.patient("Pat Jones", PATIENT, "MRN-1")
    practice.relate("MRN-1", "drsmith")
    consent_id = practice.consent("MRN-1", PATIENT, delivery="tls")
    gate = PolicyGate(engine, practice.settings.policy())
    with gate.registry() as registry:
        found = registry.login_record("drsmith")
    assert found is not None
    sender, patient = found.sender, parse_address(PATIENT)

    async def decide() -> Outcome:
        (decision,) = await gate.decide_async(sender, [patient])
        return decision.outcome

    assert asyncio.run(decide()) is Outcome.ALLOW  # a miss: read in a thread
    statements = _statements(engine)
    assert asyncio.run(decide()) is Outcome.ALLOW
    if engine.dialect.name != "sqlite":
        assert gate.in_memory() is None
        assert len(statements) == 1 and "registry_generation" in statements[0], statements
        return
    assert statements == []  # from memory alone

    practice.revoke(consent_id)
    assert asyncio.run(decide()) is not Outcome.ALLOW
    assert statements, "the facts were read again after the revocation"
    registry = gate.in_memory()
    assert registry is not None
    with pytest.raises(CacheMiss):
        registry.recipient_facts([parse_address("nobody@example.org")])
    gate.close()
