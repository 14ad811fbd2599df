"""A throw-away CA for S/MIME tests: recipient certificates in every shape a patient sends.

``SmimeCA.issue`` makes an end-entity certificate with the options the import
checks care about (where the address is, key type and size, validity window,
key usage, extended key usage); ``SmimeCert`` writes it as PEM, DER, a PKCS#7
bundle, or a signed e-mail (detached multipart/signed or opaque signed-data).

Keys are cached per kind: RSA generation is the slow part, and the import
checks never look at whether two certificates share a key.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["rsa2048", "rsa1024", "ec-p256", "ed25519"]
Validity = Literal["valid", "expired", "not-yet-valid"]
EmailIn = Literal["san", "subject"]
Purpose = Literal["email", "server"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

_DAY = timedelta(days=1)


@cache
def _ca_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@cache
def private_key(key_type: KeyType = "rsa2048") -> PrivateKey:
    """One end-entity key per kind for the whole test run."""
    if key_type == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "rsa1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def _now() -> datetime:
    """Whole seconds: certificates carry no fractions, so windows are exact."""
    return datetime.now(UTC).replace(microsecond=0)


def _window(validity: Validity) -> tuple[datetime, datetime]:
    now = _now()
    if validity == "expired":
        return now - 30 * _DAY, now - 2 * _DAY
    if validity == "not-yet-valid":
        return now + 2 * _DAY, now + 30 * _DAY
    return now - _DAY, now + 365 * _DAY


@dataclass(frozen=True)
class SmimeCert:
    """An issued certificate, its key, and the CA certificate that signed it."""

    cert: x509.Certificate
    key: PrivateKey
    ca_cert: x509.Certificate

    @property
    def fingerprint_sha256(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    def pem(self, with_ca: bool = False) -> bytes:
        chain = [self.cert, self.ca_cert] if with_ca else [self.cert]
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)

    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def pkcs7(self, encoding: Literal["DER", "PEM"] = "DER") -> bytes:
        """A certificates-only PKCS#7 bundle (.p7b/.p7c) with the CA certificate first."""
        chosen = serialization.Encoding.PEM if encoding == "PEM" else serialization.Encoding.DER
        return pkcs7.serialize_certificates([self.ca_cert, self.cert], chosen)

    def signed_mail(
        self,
        sender: str = "patient@example.org",
        to: str = "dr.smith@praxis.example",
        opaque: bool = False,
    ) -> bytes:
        """An .eml signed with this certificate's key, the certificate included.

        Detached: ``multipart/signed`` as cryptography writes it with
        ``Encoding.SMIME``. Opaque: ``application/pkcs7-mime;
        smime-type=signed-data`` with the content inside the signature.
        """
        if not isinstance(self.key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise TypeError("PKCS#7 signing here takes an RSA or EC key")
        content = b"Content-Type: text/plain; charset=utf-8\r\n\r\nMy certificate.\r\n"
        builder = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(content)
            .add_signer(self.cert, self.key, hashes.SHA256())
        )
        headers = (
            f"From: {sender}\r\nTo: {to}\r\nSubject: my certificate\r\n"
            "Message-ID: <smime-test@example.org>\r\n"
        ).encode()
        if not opaque:
            signed = builder.sign(
                serialization.Encoding.SMIME, [pkcs7.PKCS7Options.DetachedSignature]
            )
            return headers + signed  # cryptography writes CRLF line ends
        der = builder.sign(serialization.Encoding.DER, [])
        body = base64.encodebytes(der).replace(b"\n", b"\r\n")
        return (
            headers
            + b"MIME-Version: 1.0\r\n"
            + b'Content-Type: application/pkcs7-mime; smime-type=signed-data; name="smime.p7m"\r\n'
            + b"Content-Transfer-Encoding: base64\r\n"
            + b'Content-Disposition: attachment; filename="smime.p7m"\r\n'
            + b"\r\n"
            + body
        )


class SmimeCA:
    """A CA that issues S/MIME end-entity certificates."""

    __test__ = False

    def __init__(self, name: str = "cgw S/MIME test CA") -> None:
        self.key = _ca_key()
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - 60 * _DAY)
            .not_valid_after(now + 3650 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        email: str,
        *,
        key_type: KeyType = "rsa2048",
        validity: Validity = "valid",
        email_in: EmailIn = "san",
        key_encipherment: bool = True,
        purpose: Purpose = "email",
    ) -> SmimeCert:
        """An end-entity certificate for ``email``; the defaults make a usable one."""
        key = private_key(key_type)
        subject: list[x509.NameAttribute[str]] = [
            x509.NameAttribute(NameOID.COMMON_NAME, "Test Patient")
        ]
        if email_in == "subject":
            subject.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
        start, end = _window(validity)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=key_encipherment,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [
                        ExtendedKeyUsageOID.EMAIL_PROTECTION
                        if purpose == "email"
                        else ExtendedKeyUsageOID.SERVER_AUTH
                    ]
                ),
                critical=False,
            )
        )
        if email_in == "san":
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return SmimeCert(cert=cert, key=key, ca_cert=self.cert)
