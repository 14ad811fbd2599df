"""Registry facts kept in memory while the registry stands still.

Every message asks the registry the same few questions (who owns this
address, which relationships, consents and certificates apply, which
addresses may the sender use) at RCPT, for the header rule and again before
each delivery: ten statements a patient message, each a trip through the
database driver and the GIL. A practice's registry changes a few times a
day. The facts are kept per address key and per sender (and the parsed
certificates S/MIME encrypts to, by id), and dropped as soon
as ``registry_generation`` (moved by database triggers on every registry
table, whoever writes) differs from the value they were read under; each
use reads that one row first. Facts hold no clock: consent expiry and
certificate validity are still decided at the moment of each decision.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from sqlalchemy import Connection, bindparam
from sqlalchemy import select as select_columns
from sqlmodel import col

from consent_registry.addresses import Address
from consent_registry.models import RecipientCertificate, RegistryGeneration
from consent_registry.recipient_facts import KeyFacts, assemble, facts_by_key
from consent_registry.users import LoginRecord, login_record
from policies.facts import RecipientFacts

_GENERATION = select_columns(col(RegistryGeneration.value)).where(col(RegistryGeneration.id) == 1)
_CERTIFICATE = select_columns(
    col(RecipientCertificate.not_before),
    col(RecipientCertificate.not_after),
    col(RecipientCertificate.der),
).where(col(RecipientCertificate.id) == bindparam("id"))
K = TypeVar("K")
V = TypeVar("V")

# Entries at most: at 1,000,000 consents, a cache that only grows would hold
# the registry; when full it starts again.
CACHE_LIMIT = 20_000


class FactsCache:
    """Facts by address key and logins by user name, for one registry generation."""

    def __init__(self, limit: int = CACHE_LIMIT) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._generation: int | None = None
        self._keys: dict[str, KeyFacts] = {}
        self._logins: dict[str, LoginRecord | None] = {}
        self._certificates: dict[int, CertificateOnFile | None] = {}

    def on(self, connection: Connection) -> CachedRegistry:
        """The registry as ``connection`` sees it now (one read of the generation)."""
        generation = int(connection.execute(_GENERATION).scalar_one())
        with self._lock:
            if generation != self._generation:
                self._generation = generation
                self._clear()
        return CachedRegistry(self, connection, generation)

    def known_keys(self, keys: Sequence[str]) -> dict[str, KeyFacts]:
        with self._lock:
            return {key: self._keys[key] for key in keys if key in self._keys}

    def known_login(self, login: str) -> tuple[bool, LoginRecord | None]:
        with self._lock:
            return login in self._logins, self._logins.get(login)

    def known_certificate(self, certificate_id: int) -> tuple[bool, CertificateOnFile | None]:
        with self._lock:
            return certificate_id in self._certificates, self._certificates.get(certificate_id)

    def keep_keys(self, generation: int, fetched: dict[str, KeyFacts]) -> None:
        self._keep(generation, self._keys, fetched)

    def keep_login(self, generation: int, login: str, found: LoginRecord | None) -> None:
        self._keep(generation, self._logins, {login: found})

    def keep_certificate(
        self, generation: int, certificate_id: int, found: CertificateOnFile | None
    ) -> None:
        self._keep(generation, self._certificates, {certificate_id: found})

    def _keep(self, generation: int, into: dict[K, V], fetched: dict[K, V]) -> None:
        with self._lock:
            if generation != self._generation:
                return  # read under a generation already left behind
            held = len(self._keys) + len(self._logins) + len(self._certificates)
            if held + len(fetched) > self.limit:
                self._clear()
            into.update(fetched)

    def _clear(self) -> None:
        self._keys.clear()
        self._logins.clear()
        self._certificates.clear()


@dataclass(frozen=True)
class CertificateOnFile:
    """A recipient certificate as the registry holds it, parsed."""

    not_before: datetime
    not_after: datetime
    certificate: x509.Certificate


@dataclass(frozen=True)
class CachedRegistry:
    """Registry lookups through the cache, on one connection, at one generation."""

    cache: FactsCache
    connection: Connection
    generation: int

    def recipient_facts(self, addresses: Sequence[Address]) -> list[RecipientFacts]:
        known = self.cache.known_keys([a.key for a in addresses])
        missing = [a.key for a in addresses if a.key not in known]
        if missing:
            fetched = facts_by_key(self.connection, missing)
            self.cache.keep_keys(self.generation, fetched)
            known.update(fetched)
        return assemble(addresses, known)

    def login_record(self, login: str) -> LoginRecord | None:
        cached, found = self.cache.known_login(login)
        if not cached:
            found = login_record(self.connection, login)
            self.cache.keep_login(self.generation, login, found)
        return found

    def certificate(self, certificate_id: int) -> CertificateOnFile | None:
        """The certificate on file under this id, read and parsed once per
        generation (a certificate deleted by hand moves the generation too)."""
        cached, found = self.cache.known_certificate(certificate_id)
        if not cached:
            row = self.connection.execute(_CERTIFICATE, {"id": certificate_id}).first()
            if row is not None:
                not_before, not_after, der = row
                found = CertificateOnFile(
                    not_before, not_after, x509.load_der_x509_certificate(der)
                )
            self.cache.keep_certificate(self.generation, certificate_id, found)
        return found
