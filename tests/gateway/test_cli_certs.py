"""``cgw cert import`` and ``cgw cert list``, with an admin's arguments and files."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, select

from consent_registry.db import make_engine
from consent_registry.models import AuditEvent
from tests.cli import Run
from tests.smime_pki import SmimeCA, SmimeCert

ANNA = "anna@example.org"
BOB = "bob@example.org"
CA_NAME = "cgw S/MIME test CA"
IMPORTED = "certificate.imported"


@pytest.fixture(scope="session")
def smime_ca() -> SmimeCA:
    return SmimeCA(CA_NAME)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / "in" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cgw: error: "), lines[0]
    return lines[0]


def _listed(cgw: Run) -> list[dict[str, Any]]:
    result = cgw("cert", "list", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert isinstance(listed, list)
    return listed


def _audit(database_url: str) -> list[AuditEvent]:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            return list(session.exec(select(AuditEvent).order_by(col(AuditEvent.seq))).all())
    finally:
        engine.dispose()


def _imported_id(result: subprocess.CompletedProcess[str], email: str, cert: SmimeCert) -> int:
    """The id in the success line, after checking the whole line."""
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    match = re.fullmatch(
        rf"imported certificate (\d+) for {re.escape(email)}, "
        rf"valid until {cert.not_after:%Y-%m-%d}\n",
        result.stdout,
    )
    assert match, result.stdout
    return int(match.group(1))


# -- import in every format ---------------------------------------------------------------

FORMATS: dict[str, Callable[[SmimeCert], bytes]] = {
    "pem": lambda c: c.pem(),
    "pem-with-ca": lambda c: c.pem(with_ca=True),
    "der": lambda c: c.der(),
    "pkcs7-der": lambda c: c.pkcs7("DER"),
    "pkcs7-pem": lambda c: c.pkcs7("PEM"),
    "signed-eml": lambda c: c.signed_mail(sender=ANNA),
    "opaque-signed-eml": lambda c: c.signed_mail(sender=ANNA, opaque=True),
}


@pytest.mark.parametrize("form", list(FORMATS))
def test_import_reads_every_format_and_lists_it(
    initialised: Run, smime_ca: SmimeCA, tmp_path: Path, form: str
) -> None:
    cgw = initialised
    issued = smime_ca.issue(ANNA)
    path = _write(tmp_path, f"anna.{form}", FORMATS[form](issued))
    result = cgw("cert", "import", "--email", ANNA, str(path), "--actor", "it-admin")
    cert_id = _imported_id(result, ANNA, issued)
    (entry,) = _listed(cgw)
    assert entry["id"] == cert_id
    assert entry["email"] == ANNA
    # the end-entity certificate, never the CA certificate beside it in the file
    assert entry["fingerprint_sha256"] == issued.fingerprint_sha256
    assert len(entry["fingerprint_sha256"]) == 64
    assert entry["not_after"] == issued.cert.not_valid_after_utc.isoformat()
    assert entry["not_before"] == issued.cert.not_valid_before_utc.isoformat()
    assert entry["serial"] == format(issued.cert.serial_number, "x")
    assert entry["subject"] == "CN=Test Patient"
    assert entry["issuer"] == f"CN={CA_NAME}"
    assert entry["imported_by"] == "it-admin"


def test_address_only_in_the_subject_email_attribute_is_found(
    initialised: Run, smime_ca: SmimeCA, tmp_path: Path
) -> None:
    issued = smime_ca.issue(ANNA, email_in="subject")
    path = _write(tmp_path, "anna.der", issued.der())
    result = initialised("cert", "import", "--email", ANNA, str(path))
    cert_id = _imported_id(result, ANNA, issued)
    (entry,) = _listed(initialised)
    assert (entry["id"], entry["email"]) == (cert_id, ANNA)
    assert entry["fingerprint_sha256"] == issued.fingerprint_sha256
    assert f"1.2.840.113549.1.9.1={ANNA}" in entry["subject"]


@pytest.mark.parametrize(
    ("in_certificate", "given"),
    [("Anna@Example.org", "anna@example.org"), ("anna@example.org", "anna+x@EXAMPLE.org")],
)
def test_address_matching_is_by_canonical_key(
    initialised: Run, smime_ca: SmimeCA, tmp_path: Path, in_certificate: str, given: str
) -> None:
    issued = smime_ca.issue(in_certificate)
    path = _write(tmp_path, "anna.pem", issued.pem())
    result = initialised("cert", "import", "--email", given, str(path))
    cert_id = _imported_id(result, given, issued)
    (entry,) = _listed(initialised)
    assert (entry["id"], entry["email"]) == (cert_id, given)  # kept as the admin wrote it
    assert entry["fingerprint_sha256"] == issued.fingerprint_sha256


# -- refusals -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """What goes into ``cgw cert import`` and what the one error line must say."""

    path: Path
    email: str
    says: list[str]


def _refusal(case: str, ca: SmimeCA, tmp_path: Path) -> Refusal:
    def cert_file(issued: SmimeCert) -> Path:
        return _write(tmp_path, "cert.pem", issued.pem())

    if case == "expired":
        issued = ca.issue(ANNA, validity="expired")
        return Refusal(cert_file(issued), ANNA, [f"expired on {issued.not_after:%Y-%m-%d}"])
    if case == "not-yet-valid":
        issued = ca.issue(ANNA, validity="not-yet-valid")
        start = issued.cert.not_valid_before_utc
        return Refusal(cert_file(issued), ANNA, [f"not valid before {start:%Y-%m-%d}"])
    if case == "other-address":
        issued = ca.issue(BOB)
        return Refusal(cert_file(issued), ANNA, [f"not issued for {ANNA}", BOB])
    if case == "ec-p256-key":
        issued = ca.issue(ANNA, key_type="ec-p256")
        return Refusal(cert_file(issued), ANNA, ["needs an RSA key"])
    if case == "ed25519-key":
        issued = ca.issue(ANNA, key_type="ed25519")
        return Refusal(cert_file(issued), ANNA, ["needs an RSA key"])
    if case == "rsa-1024":
        issued = ca.issue(ANNA, key_type="rsa1024")
        return Refusal(cert_file(issued), ANNA, ["1024 bits", "at least 2048"])
    if case == "no-key-encipherment":
        issued = ca.issue(ANNA, key_encipherment=False)
        return Refusal(cert_file(issued), ANNA, ["does not allow encryption"])
    if case == "server-auth-only":
        issued = ca.issue(ANNA, purpose="server")
        return Refusal(cert_file(issued), ANNA, ["not for e-mail protection"])
    if case == "not-a-certificate":
        path = _write(tmp_path, "notes.txt", b"Dear doctor,\nhere is my key: 1234\n")
        return Refusal(path, ANNA, ["neither a certificate"])
    if case == "corrupt-pem":
        path = _write(
            tmp_path,
            "broken.pem",
            b"-----BEGIN CERTIFICATE-----\nTm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
        )
        return Refusal(path, ANNA, ["no readable certificate"])
    if case == "unreadable-signature":
        mail = (
            b"From: anna@example.org\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";'
            b' micalg=sha-256; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
            b"--b\r\nContent-Type: application/pkcs7-signature\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\nbm90IGEgc2lnbmF0dXJl\r\n--b--\r\n"
        )
        return Refusal(_write(tmp_path, "signed.eml", mail), ANNA, ["signature", "unreadable"])
    if case == "unreadable-path":
        missing = tmp_path / "in" / "no-such-file.pem"
        return Refusal(missing, ANNA, ["cannot read", str(missing)])
    if case == "malformed-email":
        issued = ca.issue(ANNA)
        return Refusal(cert_file(issued), "not-an-address", ["address 'not-an-address'"])
    raise AssertionError(case)


REFUSALS = [
    "expired",
    "not-yet-valid",
    "other-address",
    "ec-p256-key",
    "ed25519-key",
    "rsa-1024",
    "no-key-encipherment",
    "server-auth-only",
    "not-a-certificate",
    "corrupt-pem",
    "unreadable-signature",
    "unreadable-path",
    "malformed-email",
]


def _assert_refused(
    result: subprocess.CompletedProcess[str], says: list[str], cgw: Run, database_url: str
) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    line = _error_line(result)
    for text in says:
        assert text in line, line
    assert _listed(cgw) == []
    assert [e for e in _audit(database_url) if e.action == IMPORTED] == []


@pytest.mark.parametrize("case", REFUSALS)
def test_unusable_input_is_refused_with_one_line_and_nothing_stored(
    initialised: Run, database_url: str, smime_ca: SmimeCA, tmp_path: Path, case: str
) -> None:
    refusal = _refusal(case, smime_ca, tmp_path)
    result = initialised("cert", "import", "--email", refusal.email, str(refusal.path))
    _assert_refused(result, refusal.says, initialised, database_url)


@pytest.mark.parametrize("opaque", [False, True], ids=["multipart-signed", "opaque"])
def test_signed_mail_from_another_address_is_refused(
    initialised: Run, database_url: str, smime_ca: SmimeCA, tmp_path: Path, opaque: bool
) -> None:
    signer = smime_ca.issue(BOB)
    # the From header says Anna; only the signer's certificate counts
    path = _write(tmp_path, "signed.eml", signer.signed_mail(sender=ANNA, opaque=opaque))
    result = initialised("cert", "import", "--email", ANNA, str(path))
    _assert_refused(result, [f"not issued for {ANNA}", BOB], initialised, database_url)


def test_the_same_certificate_twice_is_refused(
    initialised: Run, database_url: str, smime_ca: SmimeCA, tmp_path: Path
) -> None:
    cgw = initialised
    issued = smime_ca.issue(ANNA)
    path = _write(tmp_path, "anna.pem", issued.pem())
    cert_id = _imported_id(cgw("cert", "import", "--email", ANNA, str(path)), ANNA, issued)
    # the same file again, then the same certificate as DER under a +tag of the address
    der = _write(tmp_path, "anna.der", issued.der())
    for email, again in ((ANNA, path), ("anna+certs@example.org", der)):
        result = cgw("cert", "import", "--email", email, str(again))
        assert result.returncode == 1, result.stdout
        assert result.stdout == ""
        line = _error_line(result)
        assert "already imported" in line
        assert f"({cert_id})" in line
    (entry,) = _listed(cgw)
    assert (entry["id"], entry["email"]) == (cert_id, ANNA)
    assert [e.action for e in _audit(database_url)] == [IMPORTED]


# -- audit log ----------------------------------------------------------------------------


def test_an_import_is_audited_once(
    initialised: Run, database_url: str, smime_ca: SmimeCA, tmp_path: Path
) -> None:
    assert _audit(database_url) == []
    issued = smime_ca.issue(ANNA)
    path = _write(tmp_path, "anna.eml", issued.signed_mail(sender=ANNA))
    result = initialised("cert", "import", "--email", ANNA, str(path), "--actor", "it-admin")
    _imported_id(result, ANNA, issued)
    events = [e for e in _audit(database_url) if e.action == IMPORTED]
    assert len(events) == 1
    (event,) = events
    assert event.recipient == ANNA
    assert event.actor == "it-admin"
    assert event.detail == (
        f"sha256 {issued.fingerprint_sha256}, expires {issued.not_after:%Y-%m-%d}"
    )
    # nothing of the message itself reaches the audit trail
    assert "smime.p7s" not in (event.detail or "")


# -- listing ------------------------------------------------------------------------------


def test_list_without_certificates_says_so(initialised: Run) -> None:
    result = initialised("cert", "list")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "no certificates\n"
    assert _listed(initialised) == []


def test_list_shows_a_table(initialised: Run, smime_ca: SmimeCA, tmp_path: Path) -> None:
    cgw = initialised
    anna = smime_ca.issue(ANNA)
    bob = smime_ca.issue(BOB)
    for email, issued in ((BOB, bob), (ANNA, anna)):
        path = _write(tmp_path, f"{email}.pem", issued.pem())
        _imported_id(cgw("cert", "import", "--email", email, str(path)), email, issued)
    result = cgw("cert", "list")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.startswith("ID")
    assert header.split() == ["ID", "EMAIL", "SUBJECT", "EXPIRES", "SHA256"]
    assert len(rows) == 2
    # ordered by address: Anna before Bob, though Bob was imported first
    for row, email, issued in ((rows[0], ANNA, anna), (rows[1], BOB, bob)):
        cells = row.split()
        assert cells[1] == email
        assert f"{issued.not_after:%Y-%m-%d %H:%M:%S} UTC" in row
        assert cells[-1] == issued.fingerprint_sha256[:16]
    ids = [int(r.split()[0]) for r in rows]
    assert ids == [e["id"] for e in _listed(cgw)]


# -- known defect -------------------------------------------------------------------------


def test_pem_with_explanatory_text_before_it_is_read(
    initialised: Run, smime_ca: SmimeCA, tmp_path: Path
) -> None:
    issued = smime_ca.issue(ANNA)
    bag = b"Bag Attributes\n    localKeyID: 01 02 03\nsubject=CN = Test Patient\n"
    path = _write(tmp_path, "anna.pem", bag + issued.pem())
    result = initialised("cert", "import", "--email", ANNA, str(path))
    _imported_id(result, ANNA, issued)
