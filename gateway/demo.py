"""``cgw demo``: a tour of the gateway in a temporary directory, in seconds.

Everything runs in this process on one event loop: a practice's registry in
SQLite, the gateway itself (``Gateway``, as ``cgw serve`` runs it), a stand-in
for the practice's mail provider (an aiosmtpd next hop with STARTTLS that the
gateway verifies, keeping what it receives in memory) and Dr Smith's mail
client (aiosmtplib). Three messages show the three outcomes: delivered
encrypted, refused at RCPT, held for review. The tour then shows the
quarantine and the audit trail as ``cgw quarantine list`` and ``cgw audit``
would.

Settings come from keyword arguments only (``DemoSettings``): no ``CGW_*``
variable and no ``./cgw.toml`` can point the tour at a real database or data
directory. The directory is removed at the end, also after an error, Ctrl-C
or cancellation, unless the caller asks to keep it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import secrets
import shutil
import ssl
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope
from aiosmtpd.smtp import Session as SmtpSession
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource
from sqlalchemy import Engine
from sqlmodel import Session

from consent_registry import certificates, consents, patients, relationships, users
from consent_registry.consents import ConsentTerms
from consent_registry.db import make_engine, session_scope
from gateway import registry_audit
from gateway.app import Gateway, tls_files
from gateway.audit import AuditEntry, AuditFilter, AuditLog, audit_log, entries
from gateway.cli.output import table_lines
from gateway.cli.queue import queue_store
from gateway.headers import parse_fields, split_message
from gateway.queue import DUE_STATES, QueueRow, QueueStore
from gateway.settings import ListenAddress, Settings
from gateway.tls import create_dev_certificate, server_context
from policies.status import practice_day

Output = Callable[[str], None]

ACTOR = "cgw-demo"
DOMAIN = "praxis.example"
CLINICIAN = "drsmith"
SENDER = f"dr.smith@{DOMAIN}"
ANNA = "anna@example.org"
BOB = "bob@example.org"
EVE = "eve@example.org"
DELIVERY_WAIT = 20.0  # seconds for the next hop to receive what the tour expects


@dataclass(frozen=True)
class DemoPatient:
    """A patient of Dr Smith's, what the registry holds, and the letter Dr Smith writes."""

    name: str
    address: str
    mrn: str
    consent: str | None  # the consent's delivery; None: no consent on file
    certificate: bool
    subject: str
    letter: str


PATIENTS = (
    DemoPatient(
        "Anna Muster",
        ANNA,
        "A-100",
        "encrypted",
        True,
        "Your blood test results",
        "Dear Ms Muster,\n\nyour blood test of Monday is normal; "
        "the TSH value is 2.1 mU/l.\n\nKind regards,\nDr Smith\n",
    ),
    DemoPatient(
        "Bob Beispiel",
        BOB,
        "B-200",
        None,
        False,
        "Your appointment",
        "Dear Mr Beispiel,\n\nyour appointment is on Friday at 9:00.\n\nDr Smith\n",
    ),
    DemoPatient(
        "Eve Exempel",
        EVE,
        "E-300",
        "encrypted",
        False,
        "Your prescription",
        "Dear Ms Exempel,\n\nyour prescription is ready for collection.\n\nDr Smith\n",
    ),
)


class DemoError(Exception):
    """The tour did not go as it should; the message says where."""


class DemoSettings(Settings):
    """Settings from keyword arguments only: the caller's ``CGW_*`` variables
    and ``./cgw.toml`` (or ``CGW_CONFIG``) are not sources at all."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def demo_settings(directory: Path, next_hop_port: int, next_hop_ca: Path) -> Settings:
    return DemoSettings(
        data_dir=directory / "data",
        database_url=f"sqlite:///{directory / 'data' / 'cgw.db'}",
        hostname="cgw-demo.test",
        instance_name="cgw-demo",
        submission_listen="127.0.0.1:0",
        smtps_listen=None,
        practice_domains=DOMAIN,
        delivery=f"smtp://127.0.0.1:{next_hop_port}",
        delivery_ca_file=next_hop_ca,
        delivery_timeout="10s",
        denial_mode="reject",
        protect_subject=True,
        spool="files",
        timezone="UTC",
        auth_backoff="0s",
        shutdown_grace="5s",
    )


# --- the next hop ------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    tls: bool


@dataclass
class _NextHopHandler:
    received: list[Received] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle_DATA(self, server: SMTP, session: SmtpSession, envelope: Envelope) -> str:
        async with self.changed:
            self.received.append(
                Received(
                    envelope.mail_from or "",
                    tuple(envelope.rcpt_tos),
                    envelope.original_content or b"",
                    session.ssl is not None,
                )
            )
            self.changed.notify_all()
        return "250 2.0.0 OK: stored"


class NextHop:
    """The practice's mail provider, played by aiosmtpd on 127.0.0.1 with STARTTLS."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cert, self.key = create_dev_certificate(directory, "localhost")
        self.handler = _NextHopHandler()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._protocols: list[SMTP] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        tls = server_context(self.cert, self.key)

        def protocol() -> SMTP:
            smtp = SMTP(
                self.handler,
                tls_context=tls,
                require_starttls=True,
                hostname="next-hop.test",
                ident="demo next hop",
                loop=loop,
            )
            self._protocols.append(smtp)
            return smtp

        self._server = await loop.create_server(protocol, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for smtp in self._protocols:
            if smtp.transport is not None:
                smtp.transport.close()
        await self._server.wait_closed()

    async def wait_for(self, done: Callable[[list[Received]], bool]) -> None:
        """Until ``done`` says so of what was received (the caller sets a timeout)."""
        async with self.handler.changed:
            await self.handler.changed.wait_for(lambda: done(self.handler.received))


# --- the practice --------------------------------------------------------------


@dataclass(frozen=True)
class PatientCertificate:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def patient_certificate(address: str, name: str) -> PatientCertificate:
    """A self-signed S/MIME certificate as a patient's mail program makes one."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, address),
        ]
    )
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(address)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
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
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return PatientCertificate(cert, key)


def record_practice(
    settings: Settings, engine: Engine, password: str, certs: dict[str, PatientCertificate]
) -> None:
    """The registry as an admin would write it with ``cgw user/patient/relationship/
    consent/cert``, each change with its audit entry, in one transaction."""
    audit = audit_log(settings, create=False)
    zone = settings.zone
    now = datetime.now(UTC)
    today = practice_day(now, zone)

    def record(session: Session, entry: AuditEntry) -> None:
        audit.record(session, entry, now)

    with session_scope(engine) as session:
        clinician = users.add_user(session, CLINICIAN, [SENDER], "clinician", password, ACTOR, now)
        record(session, registry_audit.user_added(ACTOR, clinician))
        for patient in PATIENTS:
            added = patients.add_patient(
                session, patient.name, [patient.address], patient.mrn, ACTOR, now
            )
            record(session, registry_audit.patient_added(ACTOR, added.id))
            found = patients.resolve_patient(session, patient.mrn)
            link = relationships.add_relationship(
                session, found, CLINICIAN, today, "primary", ACTOR, now, zone
            )
            record(session, registry_audit.relationship_added(ACTOR, link))
            if patient.consent is None:
                continue
            terms = ConsentTerms(
                patient=patient.mrn,
                email=patient.address,
                evidence="demo consent form",
                delivery=patient.consent,
            )
            (granted,) = consents.grant_many(session, [terms], ACTOR, now, zone)
            record(session, registry_audit.consent_granted(ACTOR, granted))
        for address, cert in certs.items():
            view = certificates.import_certificate(session, address, cert.pem(), ACTOR, now)
            record(session, registry_audit.certificate_imported(ACTOR, view))


# --- Dr Smith's mail client ----------------------------------------------------


def _letter(patient: DemoPatient) -> bytes:
    message = EmailMessage()
    message["From"] = f"Dr Smith <{SENDER}>"
    message["To"] = f"{patient.name} <{patient.address}>"
    message["Subject"] = patient.subject
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain=DOMAIN)
    message.set_content(patient.letter)
    return message.as_bytes(policy=email.policy.SMTP)


@dataclass
class Sent:
    recipient: str
    rcpt: tuple[int, str]
    data: tuple[int, str] | None = None


async def send_letters(
    out: Output, address: ListenAddress, ca_file: Path, password: str
) -> list[Sent]:
    """Dr Smith sends one message per patient, over STARTTLS with a login."""
    client = aiosmtplib.SMTP(
        hostname=address.host,
        port=address.port,
        start_tls=True,
        tls_context=ssl.create_default_context(cafile=str(ca_file)),
        local_hostname="reception.praxis.example",
        timeout=30,
    )
    sent: list[Sent] = []
    await client.connect()
    try:
        await client.login(CLINICIAN, password)
        for patient in PATIENTS:
            recipient = patient.address
            out(f'  To {patient.name} <{recipient}>, "{patient.subject}"')
            await client.mail(SENDER)
            try:
                reply = await client.rcpt(recipient)
            except aiosmtplib.SMTPRecipientRefused as refused:
                out(f"    RCPT TO  {refused.code} {refused.message}")
                out("             refused in the mail client; nothing was sent")
                sent.append(Sent(recipient, (refused.code, refused.message)))
                await client.rset()
                continue
            out(f"    RCPT TO  {reply.code} {reply.message}")
            accepted = await client.data(_letter(patient))
            out(f"    DATA     {accepted.code} {accepted.message}")
            sent.append(
                Sent(recipient, (reply.code, reply.message), (accepted.code, accepted.message))
            )
    finally:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await client.quit()
        client.close()
    return sent


# --- what happened -------------------------------------------------------------


def _headers(content: bytes, names: Sequence[str]) -> list[str]:
    """These header fields as they are on the wire (unfolded), in their order there."""
    header_block, _ = split_message(content)
    wanted = {name.lower() for name in names}
    return [
        " ".join(f.raw.decode("utf-8", "replace").split())
        for f in parse_fields(header_block)
        if f.name in wanted
    ]


def show_anna(out: Output, copy: Received, anna: PatientCertificate) -> None:
    if not copy.tls:
        raise DemoError("Anna's copy reached the next hop without TLS")
    out(f"  Anna's copy, as it left the gateway ({len(copy.content):,} bytes, over verified TLS):")
    for line in _headers(copy.content, ("From", "To", "Subject", "Content-Type")):
        out(f"    {line}")
    subject, letter = PATIENTS[0].subject, PATIENTS[0].letter
    if subject.encode() in copy.content or b"TSH value" in copy.content:
        raise DemoError("the subject or body of Anna's message is readable on the wire")
    out("    (the real subject and the text appear nowhere in it)")
    inner = pkcs7.pkcs7_decrypt_smime(copy.content, anna.cert, anna.key, [])
    opened = email.message_from_bytes(inner, policy=email.policy.default)
    text = opened.get_content() if isinstance(opened, EmailMessage) else ""
    out("  Opened with Anna's private key (what her mail program shows):")
    out(f"    Subject: {opened['Subject']}")
    for line in str(text).splitlines():
        out(f"    | {line}".rstrip())
    if opened["Subject"] != subject or str(text).splitlines() != letter.splitlines():
        raise DemoError("Anna's decrypted copy is not the message Dr Smith sent")


def show_notice(out: Output, notice: Received) -> None:
    parsed = email.message_from_bytes(notice.content, policy=email.policy.default)
    out(f"  The notice Dr Smith got about the held message (to {', '.join(notice.rcpt_tos)}):")
    for line in _headers(notice.content, ("From", "Subject")):
        out(f"    {line}")
    text = parsed.get_body(("plain",)) if isinstance(parsed, EmailMessage) else None
    content = text.get_content() if text is not None else ""
    for line in str(content).splitlines():
        if f"<{EVE}>" in line:
            out(f"    | {line.strip()}")


def _write_files(directory: Path, anna_copy: Received, anna: PatientCertificate) -> None:
    """Anna's copy, key and certificate, to open with ``openssl cms`` (with --keep)."""
    (directory / "anna.eml").write_bytes(anna_copy.content)
    (directory / "anna-cert.pem").write_bytes(anna.pem())
    key = anna.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_file = directory / "anna-key.pem"
    key_file.touch(mode=0o600)
    key_file.write_bytes(key)


def _wait_until_recorded(store: QueueStore, deadline: float) -> None:
    """Deliveries the next hop has are recorded a moment later: wait for that."""
    while store.pending(DUE_STATES):
        if time.monotonic() > deadline:
            raise DemoError("deliveries were not recorded in time")
        time.sleep(0.05)


def _explain(rows: list[QueueRow]) -> str:
    waiting = [f"<{r.recipient}> {r.state}: {r.last_error or '-'}" for r in rows]
    return "; ".join(waiting) or "nothing is waiting in the queue"


def show_audit(out: Output, engine: Engine, audit: AuditLog) -> int:
    with session_scope(engine) as session:
        found = entries(session, AuditFilter())
        count, broken = audit.verify(session)
    for line in table_lines(
        ["seq", "action", "actor", "patient", "recipient", "decision", "reason"],
        [
            (e.seq, e.action, e.actor, e.patient_id, e.recipient, e.decision, e.reason)
            for e in found
        ],
        "nothing",
    ):
        out("  " + line)
    if broken is not None:
        raise DemoError(f"audit entry {broken.seq} {broken.problem}")
    out(f"  cgw audit verify: audit log intact: {count} entries")
    return count


# --- the tour --------------------------------------------------------------------


async def run_demo(out: Output, keep: bool = False) -> Path:
    """The whole tour; returns its directory (removed by then unless ``keep``).

    Whatever was started is stopped and the directory removed on the way out,
    also when the tour fails or is cancelled (Ctrl-C cancels ``asyncio.run``'s task).
    """
    started = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix="cgw-demo-"))
    async with contextlib.AsyncExitStack() as cleanup:
        if not keep:
            cleanup.callback(shutil.rmtree, directory, ignore_errors=True)
        out(f"Consent Gateway demo, in {directory}")
        out("")
        await _tour(out, directory, cleanup)
    seconds = time.monotonic() - started
    if keep:
        out(f"Done in {seconds:.1f} s. Kept {directory}; look around with, for example:")
        out(f"  CGW_DATA_DIR={directory / 'data'} cgw quarantine list")
        hop = directory / "next-hop"
        out(f"  openssl cms -decrypt -in {hop / 'anna.eml'} -inkey {hop / 'anna-key.pem'}")
    else:
        out(f"Done in {seconds:.1f} s; {directory} is removed.")
    return directory


async def _tour(out: Output, directory: Path, cleanup: contextlib.AsyncExitStack) -> None:
    next_hop = await asyncio.to_thread(NextHop, directory / "next-hop")
    cleanup.push_async_callback(next_hop.stop)
    await next_hop.start()
    settings = demo_settings(directory, next_hop.port, next_hop.cert)
    gateway = Gateway(settings)  # starting it initialises the data directory
    cleanup.push_async_callback(gateway.stop)
    await gateway.start()
    engine = make_engine(settings.database_url)
    cleanup.callback(engine.dispose)
    password = secrets.token_urlsafe(18)
    certs = {
        p.address: await asyncio.to_thread(patient_certificate, p.address, p.name)
        for p in PATIENTS
        if p.certificate
    }
    await asyncio.to_thread(record_practice, settings, engine, password, certs)
    out("1. The practice's records (as cgw user/patient/relationship/consent/cert add them)")
    for line in table_lines(
        ["who", "address", "relationship", "consent", "certificate"],
        [
            ("drsmith (clinician)", SENDER, None, None, None),
            *(
                (
                    p.name,
                    p.address,
                    CLINICIAN,
                    p.consent or "none",
                    "yes (RSA 2048, made for the demo)" if p.certificate else "none",
                )
                for p in PATIENTS
            ),
        ],
        "nothing",
    ):
        out("  " + line)
    out("  drsmith's password was generated for this demo.")
    out("")

    submission = gateway.listeners[0].address
    out("2. The gateway and the practice's mail provider")
    out(f"  gateway   {submission}  submission: STARTTLS and login required")
    out(f"  next hop  127.0.0.1:{next_hop.port}  stands in for the provider; the gateway")
    out("            delivers to it only over TLS with a verified certificate")
    out("")

    out("3. Dr Smith sends three messages (what the mail client sees)")
    ca_file, _ = tls_files(settings)
    sent = await send_letters(out, submission, ca_file, password)
    out("")
    _check_replies(sent)

    store = queue_store(engine)  # as the CLI reads it
    await _wait_for_deliveries(next_hop, store)
    out("4. What the next hop received")
    received = next_hop.handler.received
    anna_copy, notice = _copy_for(received, ANNA), _copy_for(received, SENDER)
    if anna_copy is None or notice is None:
        raise DemoError("the next hop lost a message")
    show_anna(out, anna_copy, certs[ANNA])
    show_notice(out, notice)
    out("")
    await asyncio.to_thread(_write_files, next_hop.directory, anna_copy, certs[ANNA])

    out("5. The quarantine (cgw quarantine list)")
    held = await asyncio.to_thread(store.held)
    for line in table_lines(
        ["id", "sender", "recipient", "reason"],
        [(r.message_id, r.mail_from, r.recipient, r.reason) for r in held],
        "nothing is held",
    ):
        out("  " + line)
    if [r.recipient for r in held] != [EVE]:
        raise DemoError(f"expected Eve's message in the quarantine, found {len(held)} held")
    out("  Sealed in the spool until an admin runs cgw quarantine release or reject.")
    out("")

    out("6. The audit trail (cgw audit list; never a subject or body)")
    await asyncio.to_thread(show_audit, out, engine, audit_log(settings, create=False))
    out("")


async def _wait_for_deliveries(next_hop: NextHop, store: QueueStore) -> None:
    """Until the next hop has Anna's copy and the held notice, and the gateway
    has recorded both deliveries."""

    def arrived(got: list[Received]) -> bool:
        return _copy_for(got, ANNA) is not None and _copy_for(got, SENDER) is not None

    try:
        async with asyncio.timeout(DELIVERY_WAIT):
            await next_hop.wait_for(arrived)
    except TimeoutError:
        waiting = await asyncio.to_thread(store.pending, DUE_STATES)
        raise DemoError(
            f"the next hop did not receive Anna's copy and the held notice within "
            f"{DELIVERY_WAIT:g} s ({_explain(waiting)})"
        ) from None
    await asyncio.to_thread(_wait_until_recorded, store, time.monotonic() + DELIVERY_WAIT)


def _copy_for(received: Sequence[Received], recipient: str) -> Received | None:
    return next((r for r in received if recipient in r.rcpt_tos), None)


def _check_replies(sent: list[Sent]) -> None:
    replies = {s.recipient: s for s in sent}
    anna, bob, eve = replies[ANNA], replies[BOB], replies[EVE]
    if anna.data is None or anna.data[0] != 250:
        raise DemoError(f"the gateway did not accept the message to Anna: {anna.rcpt}")
    if bob.rcpt[0] != 550 or "There is no documented consent" not in bob.rcpt[1]:
        raise DemoError(f"the gateway did not refuse Bob for want of consent: {bob.rcpt}")
    if eve.data is None or "held for review" not in eve.data[1]:
        raise DemoError(f"the gateway did not hold the message to Eve: {eve.rcpt}")
