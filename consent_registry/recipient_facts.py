"""Registry facts for the recipients of one message, for ``policies`` to read.

Four indexed queries for a whole message, however many recipients it has:
the patients the addresses belong to, their relationships, the consents for
those addresses, and the certificates on file for them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from sqlmodel import Session, col, select

from consent_registry.addresses import Address
from consent_registry.models import (
    Consent,
    PatientAddress,
    RecipientCertificate,
    Relationship,
    User,
)
from policies.facts import (
    CertificateFact,
    ConsentFact,
    Delivery,
    PatientFacts,
    RecipientFacts,
    RelationshipFact,
)


def patients_by_key(session: Session, keys: Sequence[str]) -> dict[str, int]:
    """Which patient each matching key belongs to (keys of no patient are absent)."""
    if not keys:
        return {}
    rows = session.exec(
        select(PatientAddress.address_key, PatientAddress.patient_id).where(
            col(PatientAddress.address_key).in_(set(keys))
        )
    ).all()
    return dict(rows)


def recipient_facts(session: Session, addresses: Sequence[Address]) -> list[RecipientFacts]:
    keys = sorted({a.key for a in addresses})
    owners = patients_by_key(session, keys)
    patient_ids = set(owners.values())
    relationships: dict[int, list[RelationshipFact]] = defaultdict(list)
    for rel, username in session.exec(
        select(Relationship, User.username)
        .join(User, col(User.id) == Relationship.clinician_id)
        .where(col(Relationship.patient_id).in_(patient_ids))
        .order_by(col(Relationship.id))
    ).all():
        assert rel.id is not None
        relationships[rel.patient_id].append(
            RelationshipFact(rel.id, username, rel.since, rel.ended_on)
        )
    consents: dict[int, list[ConsentFact]] = defaultdict(list)
    for consent, username in session.exec(
        select(Consent, User.username)
        .join(User, col(User.id) == Consent.clinician_id, isouter=True)
        .where(col(Consent.address_key).in_(keys))
        .order_by(col(Consent.id))
    ).all():
        assert consent.id is not None
        consents[consent.patient_id].append(
            ConsentFact(
                consent_id=consent.id,
                address_key=consent.address_key,
                clinician=username,
                valid_from=consent.valid_from,
                expires=consent.expires,
                revoked_at=consent.revoked_at,
                delivery=Delivery(consent.delivery),
                risk_acknowledged=consent.risk_acknowledged,
            )
        )
    certificates: dict[str, list[CertificateFact]] = defaultdict(list)
    for cert in session.exec(
        select(RecipientCertificate).where(col(RecipientCertificate.address_key).in_(keys))
    ).all():
        assert cert.id is not None
        certificates[cert.address_key].append(
            CertificateFact(cert.id, cert.not_before, cert.not_after)
        )
    facts = []
    for address in addresses:
        patient_id = owners.get(address.key)
        patient = None
        if patient_id is not None:
            patient = PatientFacts(
                patient_id,
                tuple(relationships[patient_id]),
                tuple(consents[patient_id]),
            )
        facts.append(
            RecipientFacts(
                address=address.written,
                key=address.key,
                domain=address.domain,
                patient=patient,
                certificates=tuple(certificates[address.key]),
            )
        )
    return facts
