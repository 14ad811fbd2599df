"""Who an address already belongs to: a staff user or a patient, never both.

Professional and personal accounts are kept separate (ACP/FSMB): an address
registered to a patient cannot be a user's sending address, and the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session, col, select

from consent_registry.addresses import Address, AddressError, parse_address
from consent_registry.errors import RegistryError
from consent_registry.models import PatientAddress, User, UserAddress


def parse_new_addresses(texts: Sequence[str], flag: str) -> list[Address]:
    """Parse addresses given on the command line, refusing bad ones and repeats."""
    if not texts:
        raise RegistryError(f"at least one {flag} is needed")
    parsed = []
    for text in texts:
        try:
            parsed.append(parse_address(text))
        except AddressError as exc:
            raise RegistryError(f"address {text!r}: {exc}") from None
    keys = [a.key for a in parsed]
    if len(set(keys)) != len(keys):
        raise RegistryError("the same address is given twice")
    return parsed


def refuse_taken(session: Session, keys: Sequence[str]) -> None:
    """Raise if any of ``keys`` is already a user's or a patient's address."""
    owned = session.exec(
        select(UserAddress.address, User.username)
        .join(User, col(User.id) == UserAddress.user_id)
        .where(col(UserAddress.address_key).in_(keys))
    ).first()
    if owned is not None:
        raise RegistryError(
            f"address {owned[0]} is a staff address of user {owned[1]!r}; "
            "professional and personal accounts are kept separate"
        )
    patient = session.exec(
        select(PatientAddress.address, PatientAddress.patient_id).where(
            col(PatientAddress.address_key).in_(keys)
        )
    ).first()
    if patient is not None:
        raise RegistryError(f"address {patient[0]} already belongs to patient {patient[1]}")
