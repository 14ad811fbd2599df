"""Staff accounts: the only module that writes the user tables.

Like every record module here, functions take an open session and the acting
person, and raise ``RegistryError`` with a sentence that names the problem;
the caller commits (together with the audit entry that records the change)
or rolls back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam
from sqlalchemy import select as select_columns
from sqlmodel import Session, col, select

from consent_registry.address_book import parse_new_addresses, refuse_taken
from consent_registry.addresses import AddressError, parse_address
from consent_registry.errors import NotFoundError, RegistryError
from consent_registry.models import User, UserAddress
from consent_registry.passwords import WeakPasswordError, hash_password
from policies.facts import Role, SenderFacts

_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class UserView:
    id: int
    username: str
    role: Role
    addresses: tuple[str, ...]
    disabled: bool
    created_at: datetime


@dataclass(frozen=True)
class LoginRecord:
    """What AUTH needs: who the login is, and the hash to check against."""

    sender: SenderFacts
    password_hash: str
    disabled: bool


def _role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        allowed = ", ".join(r.value for r in Role)
        raise RegistryError(f"role must be one of {allowed}, not {value!r}") from None


def _hash(password: str) -> str:
    try:
        return hash_password(password)
    except WeakPasswordError as exc:
        raise RegistryError(str(exc)) from None


def add_user(
    session: Session,
    username: str,
    addresses: Sequence[str],
    role: str,
    password: str,
    actor: str,
    now: datetime,
) -> UserView:
    if not _USERNAME.match(username):
        raise RegistryError(
            f"user name {username!r} must be 1-64 characters of a-z, 0-9, '.', '_' or '-'"
        )
    if session.exec(select(User).where(User.username == username)).first() is not None:
        raise RegistryError(f"user {username!r} already exists")
    parsed = parse_new_addresses(addresses, "--address")
    refuse_taken(session, [a.key for a in parsed])
    user = User(
        username=username,
        role=_role(role).value,
        password_hash=_hash(password),
        created_at=now,
        created_by=actor,
    )
    session.add(user)
    session.flush()
    assert user.id is not None
    for address in parsed:
        session.add(UserAddress(user_id=user.id, address=address.written, address_key=address.key))
    session.flush()
    return _view(session, user)


def get_user(session: Session, username: str) -> User:
    user = session.exec(select(User).where(User.username == username)).first()
    if user is None:
        raise NotFoundError(f"no user {username!r}")
    return user


def _view(session: Session, user: User) -> UserView:
    assert user.id is not None
    addresses = session.exec(
        select(UserAddress.address)
        .where(UserAddress.user_id == user.id)
        .order_by(col(UserAddress.id))
    ).all()
    return UserView(
        id=user.id,
        username=user.username,
        role=Role(user.role),
        addresses=tuple(addresses),
        disabled=user.disabled,
        created_at=user.created_at,
    )


def list_users(session: Session) -> list[UserView]:
    users = session.exec(select(User).order_by(col(User.username))).all()
    return [_view(session, user) for user in users]


def disable_user(session: Session, username: str, actor: str, now: datetime) -> UserView:
    user = get_user(session, username)
    if user.disabled:
        raise RegistryError(f"user {username!r} is already disabled")
    user.disabled = True
    user.disabled_at = now
    user.disabled_by = actor
    session.add(user)
    session.flush()
    return _view(session, user)


def set_password(session: Session, username: str, password: str) -> UserView:
    user = get_user(session, username)
    user.password_hash = _hash(password)
    session.add(user)
    session.flush()
    return _view(session, user)


_USER_COLUMNS = (
    col(User.id),
    col(User.username),
    col(User.role),
    col(User.password_hash),
    col(User.disabled),
)
_USER_BY_NAME = select_columns(*_USER_COLUMNS).where(col(User.username) == bindparam("login"))
_USER_BY_ADDRESS = (
    select_columns(*_USER_COLUMNS)
    .join(UserAddress, col(UserAddress.user_id) == col(User.id))
    .where(col(UserAddress.address_key) == bindparam("key"))
)
_ADDRESS_KEYS = select_columns(col(UserAddress.address_key)).where(
    col(UserAddress.user_id) == bindparam("user_id")
)


def login_record(connection: Connection, login: str) -> LoginRecord | None:
    """The account for an AUTH login: a user name, or one of the user's addresses.

    Prebuilt Core statements: this runs at every login and before every
    delivery of patient mail.
    """
    user = connection.execute(_USER_BY_NAME, {"login": login.lower()}).first()
    if user is None and "@" in login:
        try:
            key = parse_address(login).key
        except AddressError:
            return None
        user = connection.execute(_USER_BY_ADDRESS, {"key": key}).first()
    if user is None:
        return None
    keys = connection.execute(_ADDRESS_KEYS, {"user_id": user.id}).scalars().all()
    sender = SenderFacts(username=user.username, role=Role(user.role), address_keys=frozenset(keys))
    return LoginRecord(sender=sender, password_hash=user.password_hash, disabled=user.disabled)


def count_users(session: Session) -> int:
    return len(session.exec(select(User.id)).all())
