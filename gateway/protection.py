"""Applying the protection a recipient's decision demands, just before sending.

Only S/MIME needs work here (transport TLS is the relay's job): the
certificate named by the decision is loaded and the message encrypted to it.
A certificate that is gone or no longer valid means the message waits, and
eventually bounces; it never goes out unencrypted instead.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from consent_registry.facts_cache import CertificateOnFile
from gateway.smime import Signer, encrypt


class ProtectionUnavailable(Exception):
    """The protection cannot be applied now; the message must wait."""


class Protector:
    def __init__(
        self,
        protect_subject: bool,
        archive: x509.Certificate | None = None,
        signer: Signer | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.protect_subject = protect_subject
        self.archive = archive
        self.signer = signer
        self.clock = clock

    def smime(self, on_file: CertificateOnFile | None, content: bytes) -> bytes:
        """The message encrypted to the recipient's certificate (blocking, CPU-heavy).

        ``on_file`` is the certificate the registry holds now under the id
        the decision named (None: it is gone).
        """
        if on_file is None:
            raise ProtectionUnavailable("the recipient's certificate is no longer on file")
        if not on_file.not_before <= self.clock() < on_file.not_after:
            raise ProtectionUnavailable("the recipient's certificate is not valid now")
        recipients = [on_file.certificate]
        if self.archive is not None:
            recipients.append(self.archive)  # the practice's own copy, for its records
        return encrypt(content, recipients, self.protect_subject, self.signer)


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
