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

On SQLite that row is read in microseconds on a plain ``sqlite3``
connection (``GenerationProbe``), so the event loop asks it itself and,
when every fact it needs is in memory (``FactsCache.in_memory``), decides
without a thread hop or a pooled connection: those, not the decisions,
were what a cached lookup cost. A fact not in memory raises ``CacheMiss``,
and the caller asks again in a thread, on a connection.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from sqlalchemy import Connection, Engine, bindparam
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
# How long the probe waits for a busy database before it gives up (and the
# caller reads in a thread): never long enough to stall the event loop.
PROBE_BUSY_SECONDS = 0.02


class CacheMiss(LookupError):
    """A fact asked of a registry read from memory alone (``FactsCache.in_memory``)
    that memory does not hold."""


class GenerationProbe:
    """``registry_generation`` read on a plain ``sqlite3`` connection of its own.

    A WAL reader takes no lock a writer holds, so the read does not wait for
    commits; a database that is busy anyway (a checkpoint, recovery) or gone
    reads as None, and the caller takes the slower way. SQLite files only:
    a PostgreSQL read is a network round trip, never for the event loop.
    """

    def __init__(self, database: str) -> None:
        self.database = database
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None

    @classmethod
    def for_engine(cls, engine: Engine) -> GenerationProbe | None:
        database = engine.url.database
        if engine.dialect.name != "sqlite" or not database or database == ":memory:":
            return None
        return cls(database)

    def read(self) -> int | None:
        """The generation now, or None when it cannot be read at once."""
        with self._lock:
            try:
                if self._connection is None:
                    self._connection = sqlite3.connect(
                        self.database,
                        timeout=PROBE_BUSY_SECONDS,
                        isolation_level=None,  # autocommit: every read sees the latest commit
                        check_same_thread=False,
                    )
                row = self._connection.execute(
                    "SELECT value FROM registry_generation WHERE id = 1"
                ).fetchone()
            except sqlite3.Error:
                self._close()
                return None
        return None if row is None else int(row[0])

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


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

    def in_memory(self, generation: int) -> CachedRegistry | None:
        """The registry from memory alone, when ``generation`` (read just now) is
        the one the cache holds; its lookups raise ``CacheMiss`` for the rest."""
        with self._lock:
            if generation != self._generation:
                return None
        return CachedRegistry(self, None, generation)

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
    """Registry lookups through the cache, on one connection, at one generation
    (without one: from memory alone, see ``FactsCache.in_memory``)."""

    cache: FactsCache
    connection: Connection | None
    generation: int

    def _reading(self) -> Connection:
        if self.connection is None:
            raise CacheMiss("not in memory")
        return self.connection

    def recipient_facts(self, addresses: Sequence[Address]) -> list[RecipientFacts]:
        known = self.cache.known_keys([a.key for a in addresses])
        missing = [a.key for a in addresses if a.key not in known]
        if missing:
            fetched = facts_by_key(self._reading(), missing)
            self.cache.keep_keys(self.generation, fetched)
            known.update(fetched)
        return assemble(addresses, known)

    def login_record(self, login: str) -> LoginRecord | None:
        cached, found = self.cache.known_login(login)
        if not cached:
            found = login_record(self._reading(), login)
            self.cache.keep_login(self.generation, login, found)
        return found

    def certificate(self, certificate_id: int) -> CertificateOnFile | None:
        """The certificate on file under this id, read and parsed once per
        generation (a certificate deleted by hand moves the generation too)."""
        cached, found = self.cache.known_certificate(certificate_id)
        if not cached:
            row = self._reading().execute(_CERTIFICATE, {"id": certificate_id}).first()
            if row is not None:
                not_before, not_after, der = row
                found = CertificateOnFile(
                    not_before, not_after, x509.load_der_x509_certificate(der)
                )
            self.cache.keep_certificate(self.generation, certificate_id, found)
        return found
