"""S/MIME on the wire: what leaves for a patient with a certificate opens with
the system's ``openssl cms -decrypt`` and the patient's key, byte for byte."""

from __future__ import annotations

import email
import email.policy
import subprocess
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from consent_registry import certificates
from gateway.settings import Settings
from tests.conftest import DOMAIN, PASSWORD
from tests.gateway.test_durability import _wait
from tests.practice import SENDER, Practice
from tests.practice import now as _now
from tests.runner import GatewayThread
from tests.sink import Sink
from tests.smime_pki import SmimeCA

BOUNDARY = "b1_mixed"
BODY = (
    f"--{BOUNDARY}\r\n"
    "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    "Ihre Befunde sind unauffällig.\r\n.line starting with a dot\r\n"
    f"--{BOUNDARY}\r\n"
    'Content-Type: application/pdf; name="befund.pdf"\r\n'
    "Content-Transfer-Encoding: base64\r\n"
    'Content-Disposition: attachment; filename="befund.pdf"\r\n\r\n'
    "JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+PgpzdHJlYW0K\r\n"
    f"--{BOUNDARY}--\r\n"
).encode()
MESSAGE = (
    f"From: Dr Smith <{SENDER}>\r\nTo: Anna <anna@example.org>\r\n"
    "Subject: Befund Schilddrüse 2026\r\nThread-Topic: Befund Schilddrüse 2026\r\n"
    "MIME-Version: 1.0\r\n"
    f'Content-Type: multipart/mixed; boundary="{BOUNDARY}"\r\n\r\n'
).encode() + BODY


def _deliver_encrypted(
    sink: Sink,
    ca_file: Path,
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    tmp_path: Path,
    protect: bool,
) -> tuple[bytes, bytes]:
    settings = make_settings(
        delivery=f"smtp://127.0.0.1:{sink.port}",
        delivery_ca_file=ca_file,
        timezone="UTC",
        protect_subject=protect,
    )
    running = start_gateway(settings)
    practice = Practice(settings)
    issued = SmimeCA().issue("anna@example.org")
    practice.patient("Anna Muster", "anna@example.org", "A-1")
    practice.relate("A-1", "drsmith")
    practice.consent("A-1", "anna@example.org")  # encrypted only
    with practice.session() as session:
        certificates.import_certificate(session, "anna@example.org", issued.pem(), "test", _now())
    client = running.logged_in("drsmith", PASSWORD)
    assert client.sendmail(SENDER, ["anna@example.org"], MESSAGE) == {}
    client.quit()
    (received,) = sink.wait_for(1)
    _wait(lambda: practice.queue()[0].state == "delivered", "the delivery to be recorded")
    key = tmp_path / "anna-key.pem"
    key.write_bytes(
        issued.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert = tmp_path / "anna-cert.pem"
    cert.write_bytes(issued.pem())
    wire = tmp_path / "wire.eml"
    wire.write_bytes(received.content)
    decrypted = subprocess.run(
        [
            "openssl",
            "cms",
            "-decrypt",
            "-binary",
            "-in",
            str(wire),
            "-inkey",
            str(key),
            "-recip",
            str(cert),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    return received.content, decrypted


def test_patient_mail_leaves_encrypted_and_opens_with_openssl(
    sink: Sink,
    ca_file: Path,
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    tmp_path: Path,
) -> None:
    wire, decrypted = _deliver_encrypted(
        sink, ca_file, make_settings, start_gateway, tmp_path, protect=True
    )
    outer = email.message_from_bytes(wire, policy=email.policy.default)
    assert outer.get_content_type() == "application/pkcs7-mime"
    assert outer.get_param("smime-type") == "enveloped-data"
    assert outer.get_param("name") == "smime.p7m"
    assert outer["Subject"] == "Encrypted message"
    assert outer["From"] == f"Dr Smith <{SENDER}>" and "anna@example.org" in outer["To"]
    assert outer["Date"] and outer["Message-ID"]
    for secret in ("Schilddrüse".encode(), b"Befund", b"unauff", b"befund.pdf"):
        assert secret not in wire
    inner_head, inner_body = decrypted.split(b"\r\n\r\n", 1)
    assert inner_body == BODY  # body and attachment, byte for byte
    assert f'Content-Type: multipart/mixed; boundary="{BOUNDARY}"'.encode() in inner_head
    assert "Subject: Befund Schilddrüse 2026".encode() in inner_head  # protected header


def test_without_subject_protection_the_subject_stays_outside(
    sink: Sink,
    ca_file: Path,
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    tmp_path: Path,
) -> None:
    wire, decrypted = _deliver_encrypted(
        sink, ca_file, make_settings, start_gateway, tmp_path, protect=False
    )
    outer = email.message_from_bytes(wire, policy=email.policy.default)
    assert outer["Subject"] == "Befund Schilddrüse 2026"
    assert decrypted.split(b"\r\n\r\n", 1)[1] == BODY


def _pem_key(key: object) -> bytes:
    assert hasattr(key, "private_bytes")
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_signed_then_encrypted_and_readable_by_the_practice_archive(
    sink: Sink,
    ca_file: Path,
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    tmp_path: Path,
) -> None:
    practice_ca = SmimeCA("practice CA")
    signer = practice_ca.issue(SENDER)
    archive = practice_ca.issue(f"archive@{DOMAIN}")
    files = {}
    for name, data in {
        "signer-cert.pem": signer.pem(),
        "signer-key.pem": _pem_key(signer.key),
        "archive-cert.pem": archive.pem(),
        "archive-key.pem": _pem_key(archive.key),
        "practice-ca.pem": signer.ca_cert.public_bytes(serialization.Encoding.PEM),
    }.items():
        files[name] = tmp_path / name
        files[name].write_bytes(data)
    wire, decrypted = _deliver_encrypted(
        sink,
        ca_file,
        lambda **kw: make_settings(
            smime_archive_cert=files["archive-cert.pem"],
            smime_signing_cert=files["signer-cert.pem"],
            smime_signing_key=files["signer-key.pem"],
            **kw,
        ),
        start_gateway,
        tmp_path,
        protect=True,
    )
    signed = email.message_from_bytes(decrypted, policy=email.policy.default)
    assert signed.get_content_type() == "multipart/signed"
    (tmp_path / "signed.eml").write_bytes(decrypted)
    verified = subprocess.run(
        [
            "openssl",
            "cms",
            "-verify",
            "-in",
            str(tmp_path / "signed.eml"),
            "-CAfile",
            str(files["practice-ca.pem"]),
            "-purpose",
            "any",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    assert verified.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1] == BODY.replace(b"\r\n", b"\n")
    (tmp_path / "wire2.eml").write_bytes(wire)
    archived = subprocess.run(
        [
            "openssl",
            "cms",
            "-decrypt",
            "-binary",
            "-in",
            str(tmp_path / "wire2.eml"),
            "-inkey",
            str(files["archive-key.pem"]),
            "-recip",
            str(files["archive-cert.pem"]),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    assert archived == decrypted  # the practice's archive opens the very same message
