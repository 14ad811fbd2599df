"""Clinician–patient relationships: the only module that writes their table.

A relationship is never deleted: it is ended on a day, and from that day on
it is no longer active (``policies.status``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from sqlmodel import Session, col, select

from consent_registry.errors import NotFoundError, RegistryError
from consent_registry.models import Patient, Relationship, User
from consent_registry.users import get_user
from policies.facts import Role
from policies.status import RelationshipStatus, relationship_status

KINDS = ("primary", "specialist", "other")


@dataclass(frozen=True)
class RelationshipView:
    id: int
    patient_id: int
    patient_name: str
    clinician: str
    kind: str
    since: date
    ended_on: date | None
    status: RelationshipStatus
    recorded_by: str
    recorded_at: datetime
    ended_by: str | None
    ended_at: datetime | None


def clinician_user(session: Session, username: str) -> User:
    """A user who may hold relationships and clinician-specific consents."""
    user = get_user(session, username)
    if user.role != Role.CLINICIAN.value:
        raise RegistryError(f"user {username!r} is {user.role}, not a clinician")
    if user.disabled:
        raise RegistryError(f"user {username!r} is disabled")
    return user


def add_relationship(
    session: Session,
    patient: Patient,
    clinician: str,
    since: date,
    kind: str,
    actor: str,
    now: datetime,
    zone: ZoneInfo,
) -> RelationshipView:
    if kind not in KINDS:
        raise RegistryError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    user = clinician_user(session, clinician)
    current = session.exec(
        select(Relationship)
        .where(Relationship.patient_id == patient.id)
        .where(Relationship.clinician_id == user.id)
        .where(col(Relationship.ended_on).is_(None))
    ).first()
    if current is not None:
        raise RegistryError(
            f"patient {patient.id} already has relationship {current.id} with {clinician!r}; "
            "end it first"
        )
    assert patient.id is not None and user.id is not None
    row = Relationship(
        patient_id=patient.id,
        clinician_id=user.id,
        kind=kind,
        since=since,
        recorded_at=now,
        recorded_by=actor,
    )
    session.add(row)
    session.flush()
    return _view(row, patient, user, now, zone)


def end_relationship(
    session: Session, relationship_id: int, on: date, actor: str, now: datetime, zone: ZoneInfo
) -> RelationshipView:
    row = session.get(Relationship, relationship_id)
    if row is None:
        raise NotFoundError(f"no relationship {relationship_id}")
    if row.ended_on is not None:
        raise RegistryError(f"relationship {relationship_id} already ended on {row.ended_on}")
    if on < row.since:
        raise RegistryError(
            f"relationship {relationship_id} cannot end on {on}, before it began on {row.since}"
        )
    row.ended_on, row.ended_at, row.ended_by = on, now, actor
    session.add(row)
    session.flush()
    patient = session.get(Patient, row.patient_id)
    user = session.get(User, row.clinician_id)
    assert patient is not None and user is not None
    return _view(row, patient, user, now, zone)


def list_relationships(
    session: Session, patient: Patient | None, now: datetime, zone: ZoneInfo
) -> list[RelationshipView]:
    query = (
        select(Relationship, Patient, User)
        .join(Patient, col(Patient.id) == Relationship.patient_id)
        .join(User, col(User.id) == Relationship.clinician_id)
        .order_by(col(Relationship.id))
    )
    if patient is not None:
        query = query.where(Relationship.patient_id == patient.id)
    return [_view(r, p, u, now, zone) for r, p, u in session.exec(query).all()]


def _view(
    row: Relationship, patient: Patient, user: User, now: datetime, zone: ZoneInfo
) -> RelationshipView:
    assert row.id is not None
    return RelationshipView(
        id=row.id,
        patient_id=row.patient_id,
        patient_name=patient.name,
        clinician=user.username,
        kind=row.kind,
        since=row.since,
        ended_on=row.ended_on,
        status=relationship_status(row.since, row.ended_on, now, zone),
        recorded_by=row.recorded_by,
        recorded_at=row.recorded_at,
        ended_by=row.ended_by,
        ended_at=row.ended_at,
    )
