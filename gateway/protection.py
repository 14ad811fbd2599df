"""Applying the protection a recipient's decision demands, just before sending.

Only S/MIME needs work here (transport TLS is the relay's job): the
certificate named by the decision is loaded and the message encrypted to it.
A certificate that is gone or no longer valid means the message waits, and
eventually bounces; it never goes out unencrypted instead.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from cryptography import x509
from sqlalchemy import Engine
from sqlmodel import Session

from consent_registry.models import RecipientCertificate
from gateway.smime import encrypt


class ProtectionUnavailable(Exception):
    """The protection cannot be applied now; the message must wait."""


class Protector:
    def __init__(
        self,
        engine: Engine,
        protect_subject: bool,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.protect_subject = protect_subject
        self.clock = clock

    def smime(self, certificate_id: int | None, content: bytes) -> bytes:
        """The message encrypted to the recipient's certificate (blocking, CPU-heavy)."""
        with Session(self.engine) as session:
            row = session.get(RecipientCertificate, certificate_id) if certificate_id else None
        if row is None:
            raise ProtectionUnavailable("the recipient's certificate is no longer on file")
        if not row.not_before <= self.clock() < row.not_after:
            raise ProtectionUnavailable("the recipient's certificate is not valid now")
        return encrypt(content, [x509.load_der_x509_certificate(row.der)], self.protect_subject)
