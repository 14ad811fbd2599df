"""Recipient S/MIME certificates: reading them in, checking them, storing them.

A certificate arrives as PEM, DER, or inside a signed e-mail the patient sent
(the signer's certificate is taken from the S/MIME signature). It is stored
only when it is usable here: currently valid, issued for that exact address,
and with an RSA key allowed for key encipherment and e-mail protection (the
S/MIME envelope of ``cryptography`` encrypts to RSA keys only).
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
from dataclasses import dataclass
from datetime import datetime
from email.message import Message

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlmodel import Session, col, select

from consent_registry.addresses import Address, AddressError, parse_address
from consent_registry.errors import RegistryError
from consent_registry.models import RecipientCertificate

_SIGNATURE_TYPES = ("application/pkcs7-signature", "application/x-pkcs7-signature")
_SIGNED_DATA_TYPES = ("application/pkcs7-mime", "application/x-pkcs7-mime")
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class CertificateView:
    id: int
    email: str
    subject: str
    issuer: str
    serial: str
    fingerprint_sha256: str
    not_before: datetime
    not_after: datetime
    imported_by: str
    imported_at: datetime


def read_certificates(data: bytes) -> list[x509.Certificate]:
    """Certificates from PEM, DER, a PKCS#7 bundle, or a signed .eml."""
    # RFC 7468 allows text before the BEGIN line, as "openssl pkcs12 -nokeys"
    # and "openssl x509 -text" write it; a byte-order mark is tolerated too.
    if b"-----BEGIN CERTIFICATE-----" in data:
        return x509.load_pem_x509_certificates(data.removeprefix(b"\xef\xbb\xbf"))
    if b"-----BEGIN PKCS7-----" in data:
        return pkcs7.load_pem_pkcs7_certificates(data.removeprefix(b"\xef\xbb\xbf"))
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        pass
    try:
        return pkcs7.load_der_pkcs7_certificates(data)
    except ValueError:
        pass
    return _from_signed_mail(data)


def _from_signed_mail(data: bytes) -> list[x509.Certificate]:
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    for part in message.walk():
        content_type = part.get_content_type()
        # Signed data carries the signer's certificate; certs-only (RFC 8551
        # 3.7) is how a client sends just its certificates.
        smime_type = str(part.get_param("smime-type", "")).lower()
        carries_certs = content_type in _SIGNED_DATA_TYPES and smime_type in (
            "signed-data",
            "certs-only",
        )
        if content_type in _SIGNATURE_TYPES or carries_certs:
            return _certificates_in(part)
    raise RegistryError(
        "the file is neither a certificate (PEM or DER) nor an S/MIME-signed message"
    )


def _certificates_in(part: Message) -> list[x509.Certificate]:
    """The certificates of a PKCS#7 part, base64 whether its header says so or not."""
    payload = part.get_payload(decode=True)
    candidates = [payload] if isinstance(payload, bytes) else []
    with contextlib.suppress(ValueError):
        candidates.append(base64.b64decode(str(part.get_payload())))
    for candidate in candidates:
        try:
            return pkcs7.load_der_pkcs7_certificates(candidate)
        except ValueError:
            continue
    raise RegistryError("the S/MIME signature in the message is unreadable")


def certificate_emails(cert: x509.Certificate) -> list[str]:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        found = [str(n) for n in names.get_values_for_type(x509.RFC822Name)]
    except x509.ExtensionNotFound:
        found = []
    found += [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)]
    return found


def choose_certificate(
    certificates: list[x509.Certificate], address: Address, now: datetime
) -> x509.Certificate:
    """The certificate for ``address``, or RegistryError saying why none will do."""
    for_address = [c for c in certificates if _is_for(c, address)]
    if not for_address:
        names = sorted({e for c in certificates for e in certificate_emails(c)}) or ["no address"]
        raise RegistryError(
            f"the certificate is not issued for {address.written} (it names {', '.join(names)})"
        )
    problems = [(c, _problem(c, now)) for c in for_address]
    for cert, problem in problems:
        if problem is None:
            return cert
    raise RegistryError(problems[0][1] or "the certificate cannot be used")


def _is_for(cert: x509.Certificate, address: Address) -> bool:
    for text in certificate_emails(cert):
        try:
            if parse_address(text).key == address.key:
                return True
        except AddressError:
            continue
    return False


def _problem(cert: x509.Certificate, now: datetime) -> str | None:
    if cert.not_valid_after_utc <= now:
        return f"the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_before_utc > now:
        return f"the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        kind = type(key).__name__.removesuffix("PublicKey").lstrip("_")
        article = "an" if kind[:1] in "AEIOU" else "a"
        return (
            f"the certificate has {article} {kind} key; S/MIME encryption here needs an RSA key "
            "(ask the patient for an RSA certificate)"
        )
    if key.key_size < MIN_RSA_BITS:
        return f"the certificate's RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} needed"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_encipherment:
            return "the certificate's key usage does not allow encryption (keyEncipherment)"
    except x509.ExtensionNotFound:
        pass
    try:
        purposes = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.EMAIL_PROTECTION not in purposes:
            return "the certificate is not for e-mail protection (extended key usage)"
    except x509.ExtensionNotFound:
        pass
    return None


def import_certificate(
    session: Session, email_text: str, data: bytes, actor: str, now: datetime
) -> CertificateView:
    try:
        address = parse_address(email_text)
    except AddressError as exc:
        raise RegistryError(f"address {email_text!r}: {exc}") from None
    try:
        certificates = read_certificates(data)
    except ValueError as exc:
        raise RegistryError(f"the file holds no readable certificate: {exc}") from None
    cert = choose_certificate(certificates, address, now)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    existing = session.exec(
        select(RecipientCertificate.id)
        .where(RecipientCertificate.address_key == address.key)
        .where(RecipientCertificate.fingerprint_sha256 == fingerprint)
    ).first()
    if existing is not None:
        raise RegistryError(
            f"this certificate is already imported for {address.written} ({existing})"
        )
    row = RecipientCertificate(
        address=address.written,
        address_key=address.key,
        fingerprint_sha256=fingerprint,
        subject=cert.subject.rfc4514_string()[:1000],
        issuer=cert.issuer.rfc4514_string()[:1000],
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        der=cert.public_bytes(serialization.Encoding.DER),
        imported_at=now,
        imported_by=actor,
    )
    session.add(row)
    session.flush()
    return _view(row)


def list_certificates(session: Session, keys: list[str] | None = None) -> list[CertificateView]:
    """Every certificate, or those for the addresses with the given matching keys."""
    query = select(RecipientCertificate).order_by(
        col(RecipientCertificate.address_key), col(RecipientCertificate.id)
    )
    if keys is not None:
        query = query.where(col(RecipientCertificate.address_key).in_(keys))
    return [_view(r) for r in session.exec(query).all()]


def _view(row: RecipientCertificate) -> CertificateView:
    assert row.id is not None
    return CertificateView(
        id=row.id,
        email=row.address,
        subject=row.subject,
        issuer=row.issuer,
        serial=row.serial,
        fingerprint_sha256=row.fingerprint_sha256,
        not_before=row.not_before,
        not_after=row.not_after,
        imported_by=row.imported_by,
        imported_at=row.imported_at,
    )
