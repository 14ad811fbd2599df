"""A practice's registry, written the way the admin CLI writes it, for gateway tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlmodel import Session, select

from consent_registry import consents, patients, relationships
from consent_registry.consents import ConsentTerms
from consent_registry.db import make_engine, session_scope
from consent_registry.models import AuditEvent, QueueRecipient
from gateway.settings import Settings
from tests.conftest import DOMAIN

SENDER = f"dr.smith@{DOMAIN}"
UTC_ZONE = ZoneInfo("UTC")


@dataclass
class Practice:
    settings: Settings

    @contextmanager
    def session(self) -> Iterator[Session]:
        engine = make_engine(self.settings.database_url)
        try:
            with session_scope(engine) as session:
                yield session
        finally:
            engine.dispose()

    def patient(self, name: str, email_address: str, mrn: str) -> int:
        with self.session() as session:
            return patients.add_patient(session, name, [email_address], mrn, "test", now()).id

    def relate(self, mrn: str, clinician: str, since: date | None = None) -> int:
        with self.session() as session:
            patient = patients.resolve_patient(session, mrn)
            return relationships.add_relationship(
                session,
                patient,
                clinician,
                since or date(2020, 1, 1),
                "primary",
                "test",
                now(),
                UTC_ZONE,
            ).id

    def end_relationship(self, relationship_id: int) -> None:
        with self.session() as session:
            relationships.end_relationship(
                session,
                relationship_id,
                date.today() - timedelta(days=1),
                "test",
                now(),
                UTC_ZONE,
            )

    def consent(self, mrn: str, email_address: str, **terms: object) -> int:
        with self.session() as session:
            (view,) = consents.grant_many(
                session,
                [ConsentTerms(patient=mrn, email=email_address, **terms)],  # type: ignore[arg-type]
                "test",
                now(),
                UTC_ZONE,
            )
            return view.id

    def revoke(self, consent_id: int) -> None:
        with self.session() as session:
            consents.revoke(session, consent_id, "test", "test", now(), UTC_ZONE)

    def audit(self) -> list[AuditEvent]:
        with self.session() as session:
            return list(session.exec(select(AuditEvent).order_by(AuditEvent.seq)).all())

    def queue(self) -> list[QueueRecipient]:
        with self.session() as session:
            return list(session.exec(select(QueueRecipient)).all())


def now() -> datetime:
    return datetime.now(UTC)
