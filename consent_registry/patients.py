"""Patients and their addresses: the only module that writes the patient tables.

A patient is named on the command line by id, MRN or a registered address
(``resolve_patient``); ``id:`` and ``mrn:`` prefixes settle the rare case
where an MRN looks like another patient's id.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from consent_registry.address_book import parse_new_addresses, refuse_taken
from consent_registry.addresses import Address, AddressError, parse_address
from consent_registry.errors import NotFoundError, RegistryError
from consent_registry.models import Patient, PatientAddress

_MRN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$")


@dataclass(frozen=True)
class PatientView:
    id: int
    name: str
    mrn: str | None
    addresses: tuple[str, ...]
    created_at: datetime
    created_by: str


def _check_name(name: str) -> str:
    name = " ".join(name.split())
    if not name:
        raise RegistryError("the patient's name must not be empty")
    if len(name) > 200:
        raise RegistryError("the patient's name is longer than 200 characters")
    return name


def check_mrn(mrn: str) -> str:
    if not _MRN.match(mrn):
        raise RegistryError(
            f"MRN {mrn!r} must be 1-64 letters, digits, '.', '_', '/' or '-' (no '@' or ':')"
        )
    return mrn


def add_patient(
    session: Session,
    name: str,
    emails: list[str],
    mrn: str | None,
    actor: str,
    now: datetime,
) -> PatientView:
    name = _check_name(name)
    if mrn is not None:
        check_mrn(mrn)
        if session.exec(select(Patient.id).where(Patient.mrn == mrn)).first() is not None:
            raise RegistryError(f"a patient with MRN {mrn!r} already exists")
    parsed = parse_new_addresses(emails, "--email")
    refuse_taken(session, [a.key for a in parsed])
    patient = Patient(name=name, mrn=mrn, created_at=now, created_by=actor)
    session.add(patient)
    session.flush()
    assert patient.id is not None
    for address in parsed:
        session.add(address_row(patient.id, address, actor, now))
    session.flush()
    return views(session, [patient])[0]


def add_patient_email(
    session: Session, patient: Patient, email: str, actor: str, now: datetime
) -> PatientView:
    (address,) = parse_new_addresses([email], "--email")
    refuse_taken(session, [address.key])
    assert patient.id is not None
    session.add(address_row(patient.id, address, actor, now))
    session.flush()
    return views(session, [patient])[0]


def address_row(patient_id: int, address: Address, actor: str, now: datetime) -> PatientAddress:
    """A patient's address as stored: as written, and its matching key."""
    return PatientAddress(
        patient_id=patient_id,
        address=address.written,
        address_key=address.key,
        added_at=now,
        added_by=actor,
    )


def resolve_patient(session: Session, ref: str) -> Patient:
    """The patient named by id, MRN or address (PATIENT in SPEC §3)."""
    return PatientIndex.load(session, [ref]).resolve(ref)


class PatientIndex:
    """Patients for many PATIENT references, loaded with three queries.

    Imports resolve thousands of references; one index and one set of rules
    serve them and the single reference on the command line alike.
    """

    def __init__(self) -> None:
        self.by_id: dict[int, Patient] = {}
        self.by_mrn: dict[str, Patient] = {}
        self.by_key: dict[str, Patient] = {}

    @classmethod
    def load(cls, session: Session, refs: list[str]) -> PatientIndex:
        ids, mrns, keys = set(), set(), set()
        for ref in refs:
            kind, value = _classify(ref)
            if kind in ("id", "plain") and value.isdigit():
                ids.add(int(value))
            if kind in ("mrn", "plain"):
                mrns.add(value)
            if kind == "address":
                keys.add(value)
        index = cls()
        for patient in session.exec(select(Patient).where(col(Patient.id).in_(ids))).all():
            index.add(patient)
        for patient in session.exec(select(Patient).where(col(Patient.mrn).in_(mrns))).all():
            index.add(patient)
        rows = session.exec(
            select(PatientAddress.address_key, Patient)
            .join(Patient, col(Patient.id) == PatientAddress.patient_id)
            .where(col(PatientAddress.address_key).in_(keys))
        ).all()
        for key, patient in rows:
            index.add(patient, [key])
        return index

    def add(self, patient: Patient, keys: list[str] | None = None) -> None:
        assert patient.id is not None
        self.by_id[patient.id] = patient
        if patient.mrn is not None:
            self.by_mrn[patient.mrn] = patient
        for key in keys or []:
            self.by_key[key] = patient

    def find(self, ref: str) -> Patient | None:
        kind, value = _classify(ref)
        if kind == "id":
            return self.by_id.get(int(value)) if value.isdigit() else None
        if kind == "mrn":
            return self.by_mrn.get(value)
        if kind == "address":
            return self.by_key.get(value)
        by_mrn = self.by_mrn.get(value)
        by_id = self.by_id.get(int(value)) if value.isdigit() else None
        if by_mrn is not None and by_id is not None and by_mrn.id != by_id.id:
            raise RegistryError(
                f"{value!r} is patient {by_id.id}'s id and patient {by_mrn.id}'s MRN; "
                f"say id:{value} or mrn:{value}"
            )
        return by_mrn or by_id

    def resolve(self, ref: str) -> Patient:
        patient = self.find(ref)
        if patient is None:
            raise NotFoundError(f"no patient {ref!r} (give an id, an MRN or a registered address)")
        return patient


def _classify(ref: str) -> tuple[str, str]:
    """('id'|'mrn'|'address'|'plain', value); an address's value is its key."""
    ref = ref.strip()
    kind, colon, value = ref.partition(":")
    if colon and kind in ("id", "mrn") and value:
        return kind, value
    if "@" in ref:
        try:
            return "address", parse_address(ref).key
        except AddressError as exc:
            raise RegistryError(f"address {ref!r}: {exc}") from None
    return "plain", ref


def views(session: Session, patients: list[Patient]) -> list[PatientView]:
    ids = [p.id for p in patients]
    addresses: dict[int, list[str]] = defaultdict(list)
    rows = session.exec(
        select(PatientAddress.patient_id, PatientAddress.address)
        .where(col(PatientAddress.patient_id).in_(ids))
        .order_by(col(PatientAddress.id))
    ).all()
    for patient_id, address in rows:
        addresses[patient_id].append(address)
    result = []
    for p in patients:
        assert p.id is not None
        result.append(
            PatientView(p.id, p.name, p.mrn, tuple(addresses[p.id]), p.created_at, p.created_by)
        )
    return result


def address_keys(session: Session, patient: Patient) -> list[str]:
    return list(
        session.exec(
            select(PatientAddress.address_key).where(PatientAddress.patient_id == patient.id)
        ).all()
    )


def list_patients(session: Session) -> list[PatientView]:
    return views(session, list(session.exec(select(Patient).order_by(col(Patient.id))).all()))
