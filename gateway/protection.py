"""Applying the protection a recipient's decision demands, just before sending.

Only S/MIME needs work here (transport TLS is the relay's job): the
certificate named by the decision is loaded and the message encrypted to it.
A certificate that is gone or no longer valid means the message waits, and
eventually bounces; it never goes out unencrypted instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import Engine, bindparam
from sqlalchemy import select as select_columns
from sqlmodel import col

from consent_registry.models import RecipientCertificate
from gateway.smime import Signer, encrypt

# A certificate's validity and the certificate, as parsed from its row.
_OnFile = tuple[datetime, datetime, x509.Certificate]
# Parsed certificates kept at most (a few kB each); when full, start again.
PARSED_CERTIFICATES = 4096
_ON_FILE = select_columns(
    col(RecipientCertificate.fingerprint_sha256),
    col(RecipientCertificate.not_before),
    col(RecipientCertificate.not_after),
).where(col(RecipientCertificate.id) == bindparam("id"))
_DER = select_columns(col(RecipientCertificate.der)).where(
    col(RecipientCertificate.id) == bindparam("id")
)


class ProtectionUnavailable(Exception):
    """The protection cannot be applied now; the message must wait."""


class Protector:
    def __init__(
        self,
        engine: Engine,
        protect_subject: bool,
        archive: x509.Certificate | None = None,
        signer: Signer | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.protect_subject = protect_subject
        self.archive = archive
        self.signer = signer
        self.clock = clock
        self._lock = threading.Lock()
        self._parsed: dict[str, x509.Certificate] = {}  # by SHA-256 fingerprint

    def smime(self, certificate_id: int | None, content: bytes) -> bytes:
        """The message encrypted to the recipient's certificate (blocking, CPU-heavy)."""
        found = self._certificate(certificate_id) if certificate_id else None
        if found is None:
            raise ProtectionUnavailable("the recipient's certificate is no longer on file")
        not_before, not_after, certificate = found
        if not not_before <= self.clock() < not_after:
            raise ProtectionUnavailable("the recipient's certificate is not valid now")
        recipients = [certificate]
        if self.archive is not None:
            recipients.append(self.archive)  # the practice's own copy, for its records
        return encrypt(content, recipients, self.protect_subject, self.signer)

    def _certificate(self, certificate_id: int) -> _OnFile | None:
        """The certificate on file under this id, parsed once per fingerprint.

        The row is still looked up every time (a certificate deleted by hand
        is no longer on file, and SQLite may give its id to the next one);
        only reading and parsing the certificate itself is saved.
        """
        with self.engine.connect() as connection:
            row = connection.execute(_ON_FILE, {"id": certificate_id}).first()
            if row is None:
                return None
            fingerprint, not_before, not_after = row
            with self._lock:
                parsed = self._parsed.get(fingerprint)
            if parsed is None:
                der = connection.execute(_DER, {"id": certificate_id}).scalar_one()
                parsed = x509.load_der_x509_certificate(der)
                with self._lock:
                    if len(self._parsed) >= PARSED_CERTIFICATES:
                        self._parsed.clear()
                    self._parsed[fingerprint] = parsed
        return not_before, not_after, parsed


def load_practice_keys(
    archive: Path | None, signing_cert: Path | None, signing_key: Path | None
) -> tuple[x509.Certificate | None, Signer | None]:
    """The archive certificate and the signer from their PEM files, checked at start-up."""
    archive_cert = x509.load_pem_x509_certificate(archive.read_bytes()) if archive else None
    if archive_cert is not None and not isinstance(archive_cert.public_key(), rsa.RSAPublicKey):
        raise ValueError("CGW_SMIME_ARCHIVE_CERT must hold an RSA certificate")
    if signing_cert is None or signing_key is None:
        return archive_cert, None
    key = serialization.load_pem_private_key(signing_key.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError("CGW_SMIME_SIGNING_KEY must be an RSA or EC private key")
    return archive_cert, Signer(x509.load_pem_x509_certificate(signing_cert.read_bytes()), key)
