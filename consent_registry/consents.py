"""Consents: the only module that writes the consent table.

A consent is for one exact address of one patient, granted practice-wide or
to one clinician, for a period of days, with the delivery the patient agreed
to. It is never changed or deleted afterwards, only revoked. ``grant_many``
serves a single grant and an import of thousands alike: one set of checks,
a few bulk queries, all or nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from sqlmodel import Session, col, select

from consent_registry.addresses import Address, AddressError, parse_address
from consent_registry.errors import NotFoundError, RegistryError
from consent_registry.models import Consent, Patient, PatientAddress, User
from consent_registry.patients import PatientIndex, address_row, check_mrn
from policies.facts import Role
from policies.status import ConsentStatus, consent_status, practice_day

METHODS = ("written", "electronic", "verbal")
DELIVERIES = ("encrypted", "tls", "plain")


@dataclass(frozen=True)
class ConsentTerms:
    """One consent as the admin or an import states it (fields as CSV columns)."""

    patient: str
    email: str
    clinician: str | None = None
    method: str = "written"
    evidence: str | None = None
    valid_from: date | None = None
    expires: date | None = None
    delivery: str = "encrypted"
    risk_acknowledged: bool = False
    # History that an import carries over; a fresh grant leaves these empty.
    recorded_by: str | None = None
    recorded_at: datetime | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None
    # An import may name a patient the registry does not know yet.
    patient_name: str | None = None


class TermsError(RegistryError):
    """A consent that cannot be recorded; ``index`` is its place in the batch."""

    def __init__(self, index: int, field: str, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.field = field


_Fail = Callable[[str, str], TermsError]


@dataclass(frozen=True)
class ConsentView:
    id: int
    patient_id: int
    patient_name: str
    patient_mrn: str | None
    email: str
    clinician: str | None
    method: str
    evidence: str | None
    valid_from: date
    expires: date | None
    delivery: str
    risk_acknowledged: bool
    recorded_by: str
    recorded_at: datetime
    revoked_at: datetime | None
    revoked_by: str | None
    revoke_reason: str | None
    status: ConsentStatus


def grant_many(
    session: Session,
    batch: Sequence[ConsentTerms],
    actor: str,
    now: datetime,
    zone: ZoneInfo,
) -> list[ConsentView]:
    """Record every consent of ``batch`` or none (raises TermsError naming the first bad one)."""
    grants = _Grants(session, batch, now, zone)
    grants.create_new_patients(batch)
    rows = [grants.row(index, terms, actor) for index, terms in enumerate(batch)]
    session.add_all(rows)
    session.flush()
    return [_view(row, grants.patient_of(row), grants.username_of(row), now, zone) for row in rows]


class _Grants:
    """The bulk-loaded state a batch is checked against."""

    def __init__(
        self, session: Session, batch: Sequence[ConsentTerms], now: datetime, zone: ZoneInfo
    ) -> None:
        self.session, self.now, self.zone = session, now, zone
        self.patients = PatientIndex.load(session, [t.patient for t in batch])
        names = {t.clinician for t in batch if t.clinician}
        self.users = {
            u.username: u
            for u in session.exec(select(User).where(col(User.username).in_(names))).all()
        }
        self.usernames = {u.id: u.username for u in self.users.values()}
        self.keys_of: dict[int, set[str]] = defaultdict(set)
        self.owner_of: dict[str, int] = {}
        self.covering: dict[str, list[Consent]] = defaultdict(list)
        keys = {_key_or_none(t.email) for t in batch} - {None}
        self._load_addresses(keys)
        for consent in session.exec(
            select(Consent)
            .where(col(Consent.address_key).in_(keys))
            .where(col(Consent.revoked_at).is_(None))
        ).all():
            self.covering[consent.address_key].append(consent)

    def _load_addresses(self, keys: set[str | None]) -> None:
        for patient_id, key in self.session.exec(
            select(PatientAddress.patient_id, PatientAddress.address_key).where(
                col(PatientAddress.address_key).in_(keys)
            )
        ).all():
            self.keys_of[patient_id].add(key)
            self.owner_of[key] = patient_id

    def create_new_patients(self, batch: Sequence[ConsentTerms]) -> None:
        """Patients an import brings (unknown MRN with a name), in one insert."""
        new: dict[str, Patient] = {}
        for index, terms in enumerate(batch):
            if not terms.patient_name:
                continue
            try:
                known = self.patients.find(terms.patient)
            except RegistryError as exc:
                raise TermsError(index, "patient", str(exc)) from None
            mrn = terms.patient.removeprefix("mrn:")
            if known is not None or mrn in new:
                continue
            if "@" in mrn or mrn.startswith("id:"):
                message = "a new patient needs an MRN in the patient column"
                raise TermsError(index, "patient", message)
            try:
                check_mrn(mrn)
            except RegistryError as exc:
                raise TermsError(index, "patient", str(exc)) from None
            name = " ".join(terms.patient_name.split())
            actor = terms.recorded_by or "import"
            new[mrn] = Patient(name=name, mrn=mrn, created_at=self.now, created_by=actor)
        if new:
            self.session.add_all(list(new.values()))
            self.session.flush()
            for patient in new.values():
                self.patients.add(patient)

    def row(self, index: int, terms: ConsentTerms, actor: str) -> Consent:
        def fail(field: str, message: str) -> TermsError:
            return TermsError(index, field, message)

        try:
            address = parse_address(terms.email)
        except AddressError as exc:
            raise fail("email", f"address {terms.email!r}: {exc}") from None
        patient = self._patient(terms, fail)
        clinician_id = self._clinician(terms.clinician, fail)
        assert patient.id is not None
        if address.key not in self.keys_of[patient.id] and terms.patient_name:
            self._register_address(patient, address, terms, fail)
        if address.key not in self.keys_of[patient.id]:
            raise fail(
                "email",
                f"{address.written} is not a registered address of patient {patient.id}; "
                f"add it first with: cgw patient add-email {patient.id} {address.written}",
            )
        valid_from = terms.valid_from or practice_day(self.now, self.zone)
        _check_terms(terms, valid_from, fail)
        row = Consent(
            patient_id=patient.id,
            address=address.written,
            address_key=address.key,
            clinician_id=clinician_id,
            method=terms.method,
            evidence=terms.evidence or None,
            valid_from=valid_from,
            expires=terms.expires,
            delivery=terms.delivery,
            risk_acknowledged=terms.risk_acknowledged,
            recorded_at=terms.recorded_at or self.now,
            recorded_by=terms.recorded_by or actor,
            revoked_at=terms.revoked_at,
            revoked_by=terms.revoked_by,
            revoke_reason=terms.revoke_reason,
        )
        if row.revoked_at is None:
            self._refuse_duplicate(row, fail)
            self.covering[row.address_key].append(row)
        return row

    def _patient(self, terms: ConsentTerms, fail: _Fail) -> Patient:
        try:
            patient = self.patients.find(terms.patient)
        except RegistryError as exc:
            raise fail("patient", str(exc)) from None
        if patient is not None:
            name = " ".join((terms.patient_name or "").split())
            if name and name != patient.name:
                # A wrong MRN must not attach a consent to somebody else.
                raise fail(
                    "patient_name",
                    f"patient {terms.patient!r} is {patient.name!r} in the registry, not {name!r}",
                )
            return patient
        raise fail("patient", f"no patient {terms.patient!r} (give an id, an MRN or an address)")

    def _register_address(
        self, patient: Patient, address: Address, terms: ConsentTerms, fail: _Fail
    ) -> None:
        """An import that names the patient may bring an address of theirs not yet known."""
        key = address.key
        owner = self.owner_of.get(key)
        if owner is not None:
            raise fail("email", f"{address.written} belongs to patient {owner}, not {patient.id}")
        assert patient.id is not None
        self.session.add(address_row(patient.id, address, terms.recorded_by or "import", self.now))
        self.patients.add(patient, [key])
        self.keys_of[patient.id].add(key)
        self.owner_of[key] = patient.id

    def _clinician(self, username: str | None, fail: _Fail) -> int | None:
        if not username:
            return None
        user = self.users.get(username)
        if user is None:
            raise fail("clinician", f"no user {username!r}")
        if user.role != Role.CLINICIAN.value:
            raise fail("clinician", f"user {username!r} is {user.role}, not a clinician")
        return user.id

    def _refuse_duplicate(self, row: Consent, fail: _Fail) -> None:
        for other in self.covering[row.address_key]:
            if other.clinician_id != row.clinician_id:
                continue
            if consent_status(
                other.valid_from, other.expires, other.revoked_at, self.now, self.zone
            ) in (ConsentStatus.EXPIRED, ConsentStatus.REVOKED):
                continue
            if _overlap(other.valid_from, other.expires, row.valid_from, row.expires):
                which = f"consent {other.id}" if other.id else "another row of this import"
                raise fail(
                    "email",
                    f"{which} already covers {row.address} for the same grantee in that "
                    "period; revoke it first",
                )

    def patient_of(self, row: Consent) -> Patient:
        return self.patients.by_id[row.patient_id]

    def username_of(self, row: Consent) -> str | None:
        return self.usernames.get(row.clinician_id) if row.clinician_id else None


def _key_or_none(text: str) -> str | None:
    try:
        return parse_address(text).key
    except AddressError:
        return None


def _check_terms(terms: ConsentTerms, valid_from: date, fail: _Fail) -> None:
    if terms.method not in METHODS:
        raise fail("method", f"method must be one of {', '.join(METHODS)}, not {terms.method!r}")
    if terms.delivery not in DELIVERIES:
        raise fail(
            "delivery", f"delivery must be one of {', '.join(DELIVERIES)}, not {terms.delivery!r}"
        )
    if terms.delivery == "plain" and not terms.risk_acknowledged:
        raise fail(
            "risk_acknowledged",
            "plain (unencrypted) delivery needs the patient's acknowledgement of the risk "
            "(--risk-acknowledged)",
        )
    if terms.risk_acknowledged and terms.delivery != "plain":
        raise fail("risk_acknowledged", "a risk acknowledgement only goes with plain delivery")
    if terms.expires is not None and terms.expires <= valid_from:
        raise fail("expires", f"expires ({terms.expires}) must be after from ({valid_from})")
    if terms.evidence is not None and len(terms.evidence) > 500:
        raise fail("evidence", "the evidence reference is longer than 500 characters")
    if (terms.revoked_at is None) != (terms.revoked_by is None):
        raise fail("revoked_by", "revoked_at and revoked_by go together")


def _overlap(a_from: date, a_until: date | None, b_from: date, b_until: date | None) -> bool:
    return (a_until is None or b_from < a_until) and (b_until is None or a_from < b_until)


def revoke(
    session: Session,
    consent_id: int,
    reason: str | None,
    actor: str,
    now: datetime,
    zone: ZoneInfo,
) -> ConsentView:
    row = session.get(Consent, consent_id)
    if row is None:
        raise NotFoundError(f"no consent {consent_id}")
    if row.revoked_at is not None:
        raise RegistryError(
            f"consent {consent_id} was already revoked on {row.revoked_at:%Y-%m-%d %H:%M} UTC "
            f"by {row.revoked_by}"
        )
    row.revoked_at, row.revoked_by, row.revoke_reason = now, actor, reason
    session.add(row)
    session.flush()
    return list_consents(session, None, None, now, zone, consent_id=consent_id)[0]


def list_consents(
    session: Session,
    patient: Patient | None,
    status: ConsentStatus | None,
    now: datetime,
    zone: ZoneInfo,
    consent_id: int | None = None,
) -> list[ConsentView]:
    query = (
        select(Consent, Patient)
        .join(Patient, col(Patient.id) == Consent.patient_id)
        .order_by(col(Consent.id))
    )
    if patient is not None:
        query = query.where(Consent.patient_id == patient.id)
    if consent_id is not None:
        query = query.where(Consent.id == consent_id)
    rows = session.exec(query).all()
    ids = {c.clinician_id for c, _ in rows if c.clinician_id}
    names = dict(session.exec(select(User.id, User.username).where(col(User.id).in_(ids))).all())
    views = [
        _view(c, p, names.get(c.clinician_id) if c.clinician_id else None, now, zone)
        for c, p in rows
    ]
    return [v for v in views if status is None or v.status is status]


def _view(
    row: Consent, patient: Patient, clinician: str | None, now: datetime, zone: ZoneInfo
) -> ConsentView:
    assert row.id is not None
    return ConsentView(
        id=row.id,
        patient_id=row.patient_id,
        patient_name=patient.name,
        patient_mrn=patient.mrn,
        email=row.address,
        clinician=clinician,
        method=row.method,
        evidence=row.evidence,
        valid_from=row.valid_from,
        expires=row.expires,
        delivery=row.delivery,
        risk_acknowledged=row.risk_acknowledged,
        recorded_by=row.recorded_by,
        recorded_at=row.recorded_at,
        revoked_at=row.revoked_at,
        revoked_by=row.revoked_by,
        revoke_reason=row.revoke_reason,
        status=consent_status(row.valid_from, row.expires, row.revoked_at, now, zone),
    )
