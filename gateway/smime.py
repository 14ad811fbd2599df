"""S/MIME encryption of an outgoing message: bytes in, bytes out.

The original MIME entity (its Content-* fields and body, untouched) is
enveloped for the recipient's certificate with AES-256-CBC, the strongest
content cipher ``cryptography``'s envelope builder offers. The outer
message keeps the routing fields (From, To, Cc, Date, Message-ID, ...) and,
with ``CGW_PROTECT_SUBJECT``, shows a neutral Subject while the real one
travels inside the encryption, beside the other protected header fields.
The DER envelope is base64-encoded in chunks (far cheaper than the
builder's own S/MIME output encoding). With a practice signing certificate,
the entity is signed first (multipart/signed, detached) and the signed
whole is encrypted, so the signature is private too.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

from gateway.headers import CRLF, parse_fields, split_message

NEUTRAL_SUBJECT = b"Subject: Encrypted message\r\n"
# Fields repeated inside the encryption, so the decrypted message is whole.
_PROTECTED = ("subject", "from", "to", "cc", "date", "message-id", "reply-to")
# Fields that repeat or describe the subject (Outlook writes Thread-Topic on every
# message): with subject protection they travel only inside the encryption.
_SUBJECT_LIKE = ("subject", "thread-topic", "keywords", "comments")
_LINE = 57  # 57 bytes of DER become one 76-character base64 line


@dataclass(frozen=True)
class Signer:
    """The practice's signing certificate and key (sign, then encrypt)."""

    certificate: x509.Certificate
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def encrypt(
    message: bytes,
    certificates: list[x509.Certificate],
    protect_subject: bool,
    signer: Signer | None = None,
) -> bytes:
    """The message enveloped for ``certificates`` (the recipient's, and an archive's)."""
    header_block, rest = split_message(message)
    fields = parse_fields(header_block)
    content_fields = [f.raw for f in fields if f.name.startswith("content-")]
    if not any(f.name == "content-type" for f in fields):
        content_fields.insert(0, b"Content-Type: text/plain; charset=us-ascii\r\n")
    protected = [f.raw for f in fields if f.name in _PROTECTED + _SUBJECT_LIKE]
    inner = b"".join(content_fields + protected) + (rest or CRLF)
    if signer is not None:
        inner = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(inner)
            .add_signer(signer.certificate, signer.key, hashes.SHA256())
            .sign(
                serialization.Encoding.SMIME,
                [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary],
            )
        )
    builder = pkcs7.PKCS7EnvelopeBuilder().set_data(inner)
    for certificate in certificates:
        builder = builder.add_recipient(certificate)
    builder = builder.set_content_encryption_algorithm(algorithms.AES256)
    der = builder.encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
    del builder, inner  # a large message is held once less while it is encoded
    outer = [
        f.raw
        for f in fields
        if not f.name.startswith("content-")
        and f.name != "mime-version"
        and not (protect_subject and f.name in _SUBJECT_LIKE)
    ]
    if protect_subject:
        outer.append(NEUTRAL_SUBJECT)
    outer += [
        b"MIME-Version: 1.0\r\n",
        b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m\r\n",
        b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Disposition: attachment; filename=smime.p7m\r\n",
        CRLF,
    ]
    encoded = bytearray(b"".join(outer))
    _append_base64_lines(encoded, der)
    return bytes(encoded)


def _append_base64_lines(out: bytearray, data: bytes) -> None:
    """``data`` in base64, 76 characters and CRLF per line, appended to ``out``.

    Encoded a block of lines at a time and then cut into lines, into one
    buffer: a 25 MB message is not held again as a list of 440,000 lines.
    """
    width = _LINE * 4 // 3
    block = _LINE * 1024
    with memoryview(data) as view:
        for start in range(0, len(data), block):
            text = binascii.b2a_base64(view[start : start + block], newline=False)
            out += CRLF.join([text[line : line + width] for line in range(0, len(text), width)])
            out += CRLF
