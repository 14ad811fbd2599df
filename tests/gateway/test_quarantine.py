"""The quarantine end to end: a real gateway holds, ``cgw quarantine`` releases
or rejects, a verified-TLS sink stands for the next hop."""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, select

from consent_registry import certificates
from consent_registry.db import make_engine, session_scope
from consent_registry.models import Consent, QueueMessage, SpooledMessage
from gateway.app import initialise
from gateway.audit import audit_log
from gateway.crypto_at_rest import storage_key
from gateway.policy_gate import PolicyGate
from gateway.quarantine import NotHeld, Quarantine
from gateway.queue import QueuedRecipient, QueueStore, RecipientResult, Verdict, settle
from gateway.reports import Reports
from gateway.settings import Settings
from gateway.spool import FileSpool, Spool, open_spool
from tests.cli import Run
from tests.conftest import DOMAIN, PASSWORD, create_user
from tests.gateway.test_durability import _plaintext_hits, _wait
from tests.practice import SENDER, Practice
from tests.practice import now as _now
from tests.runner import GatewayThread
from tests.sink import Received, Sink
from tests.smime_pki import SmimeCA
from tests.spools import store

SUBJECT_MARKER = "QZX-subject-7731"
BODY_MARKER = "QZX-body-5521"
# The CLI reads the practice's settings the way the running gateway does.
PRACTICE_ENV = {"CGW_PRACTICE_DOMAINS": DOMAIN, "CGW_TIMEZONE": "UTC"}

StartPractice = Callable[..., tuple[GatewayThread, Practice]]


def _message(to: str) -> bytes:
    return (
        f"From: Dr Smith <{SENDER}>\r\nTo: {to}\r\nSubject: Befund {SUBJECT_MARKER}\r\n"
        f"\r\nDear patient,\r\nyour thyroid values: {BODY_MARKER}.\r\n"
    ).encode()


def _send(running: GatewayThread, to: str) -> None:
    client = running.logged_in("drsmith", PASSWORD)
    assert client.sendmail(SENDER, [to], _message(to)) == {}
    client.quit()


def _held_id(cgw: Run, env: dict[str, str] = PRACTICE_ENV) -> str:
    listed = cgw("quarantine", "list", "--json", extra=env)
    assert listed.returncode == 0, listed.stderr
    (held,) = json.loads(listed.stdout)
    return str(held["id"])


def _eve_held(practice: Practice) -> None:
    """A consented patient whose consent asks for encryption, and no certificate yet."""
    practice.patient("Eve", "eve@example.org", "E-5")
    practice.relate("E-5", "drsmith")
    practice.consent("E-5", "eve@example.org")


def _reports(sink: Sink, count: int, kind: bytes) -> list[Received]:
    """The reports to the sender among what the sink got, once ``count`` arrived."""
    return [r for r in sink.wait_for(count) if r.mail_from == "<>" and kind in r.content]


def _actions(practice: Practice, message_id: str) -> list[tuple[str, str, str | None]]:
    return [(e.action, e.actor, e.reason) for e in practice.audit() if e.message_id == message_id]


def test_a_held_message_is_nowhere_in_plaintext(
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    cgw: Run,
) -> None:
    # Outbox delivery: everything the gateway writes, the notice included, is under data_dir.
    settings = make_settings(timezone="UTC")
    running = start_gateway(settings)
    practice = Practice(settings)
    _eve_held(practice)
    _send(running, "eve@example.org")
    _wait(lambda: any(settings.outbox_dir.glob("*.eml")), "the notice to the sender")
    message_id = _held_id(cgw)
    shown = cgw("quarantine", "show", message_id, extra=PRACTICE_ENV)
    assert shown.returncode == 0, shown.stderr
    assert SUBJECT_MARKER in shown.stdout and BODY_MARKER in shown.stdout  # it is all there
    (notice,) = settings.outbox_dir.glob("*.eml")
    assert b"Action: delayed" in notice.read_bytes()
    for marker in (SUBJECT_MARKER, BODY_MARKER):
        assert _plaintext_hits(settings, marker) == []


def test_release_delivers_only_once_a_secure_channel_is_on_file(
    practice_gateway: StartPractice, sink: Sink, cgw: Run, tmp_path: Path
) -> None:
    running, practice = practice_gateway()
    _eve_held(practice)
    _send(running, "eve@example.org")
    message_id = _held_id(cgw)

    refused = cgw(
        "quarantine", "release", message_id, "--actor", "privacy-officer", extra=PRACTICE_ENV
    )
    assert refused.returncode == 1
    assert refused.stdout.startswith(
        "still held <eve@example.org> (NO_SECURE_CHANNEL): There is no secure way"
    )
    assert refused.stderr == (
        f"cgw: error: 1 recipient(s) of {message_id} stay held; "
        "record what is missing and release again, or reject\n"
    )
    assert [r.state for r in practice.queue() if r.address == "eve@example.org"] == ["quarantined"]

    issued = SmimeCA().issue("eve@example.org")
    with practice.session() as session:
        certificates.import_certificate(session, "eve@example.org", issued.pem(), "test", _now())
    released = cgw(
        "quarantine", "release", message_id, "--actor", "privacy-officer", extra=PRACTICE_ENV
    )
    assert released.returncode == 0, released.stderr
    assert released.stdout == "released <eve@example.org> (smime); it is delivered shortly\n"
    running.wake()
    (delivered,) = [r for r in sink.wait_for(2) if r.rcpt_tos == ("eve@example.org",)]
    outer = email.message_from_bytes(delivered.content, policy=email.policy.default)
    assert outer.get_content_type() == "application/pkcs7-mime"
    for marker in (SUBJECT_MARKER, BODY_MARKER):
        assert marker.encode() not in delivered.content
    assert BODY_MARKER.encode() in _decrypt(delivered.content, issued, tmp_path)
    _wait(
        lambda: ("message.delivered", "gateway", None) in _actions(practice, message_id),
        "the delivery to be recorded",
    )
    assert _actions(practice, message_id) == [
        ("message.quarantined", "drsmith", "NO_SECURE_CHANNEL"),
        ("message.sender_notified", "gateway", None),
        ("message.still_held", "privacy-officer", "NO_SECURE_CHANNEL"),
        ("message.released", "privacy-officer", "PATIENT_CONSENTED"),
        ("message.delivered", "gateway", None),
    ]
    again = cgw("quarantine", "release", message_id, extra=PRACTICE_ENV)
    assert again.returncode == 1
    assert (
        again.stderr == f"cgw: error: no held message {message_id!r} (see: cgw quarantine list)\n"
    )


def _decrypt(wire: bytes, issued: object, tmp_path: Path) -> bytes:
    key = tmp_path / "key.pem"
    key.write_bytes(
        issued.key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    message = tmp_path / "wire.eml"
    message.write_bytes(wire)
    return subprocess.run(
        ["openssl", "cms", "-decrypt", "-in", str(message), "-inkey", str(key)],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout


def test_release_after_the_patient_and_consent_are_recorded(
    practice_gateway: StartPractice, sink: Sink, cgw: Run
) -> None:
    running, practice = practice_gateway(unknown_external="quarantine")
    env = {**PRACTICE_ENV, "CGW_UNKNOWN_EXTERNAL": "quarantine"}
    _send(running, "frank@example.net")  # nobody the practice knows yet: held for review
    (notice,) = _reports(sink, 1, b"Action: delayed")
    assert b"<frank@example.net>" in notice.content
    message_id = _held_id(cgw, env)

    # The privacy officer finds Frank is a patient: registered, related, but no consent yet.
    practice.patient("Frank", "frank@example.net", "F-6")
    practice.relate("F-6", "drsmith")
    refused = cgw("quarantine", "release", message_id, extra=env)
    assert refused.returncode == 1
    assert refused.stdout.startswith(
        "still held <frank@example.net> (NO_CONSENT): There is no documented consent"
    )

    practice.consent("F-6", "frank@example.net", delivery="tls")
    released = cgw("quarantine", "release", message_id, extra=env)
    assert released.returncode == 0, released.stderr
    assert released.stdout == "released <frank@example.net> (tls); it is delivered shortly\n"
    running.wake()
    (delivered,) = [r for r in sink.wait_for(2) if r.rcpt_tos == ("frank@example.net",)]
    assert BODY_MARKER.encode() in delivered.content
    (row,) = [r for r in practice.queue() if r.address == "frank@example.net"]
    assert (row.protection, row.reason, row.patient_id is not None) == (
        "tls",
        "PATIENT_CONSENTED",
        True,
    )


def test_releasing_an_unknown_external_recipient_is_the_review(
    practice_gateway: StartPractice, sink: Sink, cgw: Run
) -> None:
    running, practice = practice_gateway(unknown_external="quarantine")
    env = {**PRACTICE_ENV, "CGW_UNKNOWN_EXTERNAL": "quarantine"}
    _send(running, "lab@partner.example")
    message_id = _held_id(cgw, env)
    released = cgw("quarantine", "release", message_id, "--actor", "privacy-officer", extra=env)
    assert released.returncode == 0, released.stderr
    running.wake()
    (delivered,) = [r for r in sink.wait_for(2) if r.rcpt_tos == ("lab@partner.example",)]
    assert BODY_MARKER.encode() in delivered.content
    assert ("message.released", "privacy-officer", "UNKNOWN_EXTERNAL") in _actions(
        practice, message_id
    )


def test_reject_returns_the_message_to_its_sender_in_one_bounce(
    practice_gateway: StartPractice, sink: Sink, cgw: Run
) -> None:
    running, practice = practice_gateway()
    _eve_held(practice)
    _send(running, "eve@example.org")
    message_id = _held_id(cgw)
    rejected = cgw(
        "quarantine",
        "reject",
        message_id,
        "--reason",
        "wrong patient,\nsee chart",
        "--actor",
        "privacy-officer",
        extra=PRACTICE_ENV,
    )
    assert rejected.returncode == 0, rejected.stderr
    assert rejected.stdout == (
        f"rejected {message_id} for <eve@example.org>; the sender gets a bounce\n"
    )
    running.wake()
    (bounce,) = _reports(sink, 2, b"Action: failed")
    assert bounce.rcpt_tos == (SENDER,)
    assert b"Status: 5.7.1" in bounce.content
    assert b"did not release it: wrong patient, see chart" in bounce.content
    assert BODY_MARKER.encode() not in bounce.content  # the header only, never the body
    (row,) = [r for r in practice.queue() if r.address == "eve@example.org"]
    assert row.state == "failed"
    assert _actions(practice, message_id)[-2:] == [
        ("message.rejected", "privacy-officer", "NO_SECURE_CHANNEL"),
        ("message.bounced", "gateway", None),
    ]
    settings = practice.settings
    engine = make_engine(settings.database_url)
    spool = open_spool(settings, engine, storage_key(settings)[0])
    _wait(lambda: message_id not in spool.stored_ids(), "the held copy to be removed")
    engine.dispose()
    for command in ("reject", "release", "show"):
        gone = cgw("quarantine", command, message_id, extra=PRACTICE_ENV)
        assert gone.returncode == 1 and "no held message" in gone.stderr
    with practice.session() as session:
        reports = session.exec(select(QueueMessage).where(QueueMessage.is_bounce)).all()
    assert len(reports) == 2  # the notice when it was held, and the one bounce


def test_holds_past_the_retention_are_rejected_with_a_bounce(
    practice_gateway: StartPractice, sink: Sink
) -> None:
    running, practice = practice_gateway(quarantine_retention="1s")
    _eve_held(practice)
    _send(running, "eve@example.org")
    (bounce,) = _reports(sink, 2, b"Action: failed")
    assert b"Status: 5.4.7" in bounce.content and b"longer than 1s" in bounce.content
    (row,) = [r for r in practice.queue() if r.address == "eve@example.org"]
    assert row.state == "failed"
    (event,) = [e for e in practice.audit() if e.action == "message.rejected"]
    assert (event.actor, event.detail) == (
        "gateway",
        "held longer than 1s (CGW_QUARANTINE_RETENTION)",
    )


def _quarantine(settings: Settings) -> Quarantine:
    engine = make_engine(settings.database_url)
    audit = audit_log(settings)
    return Quarantine(
        QueueStore(engine, "test", timedelta(minutes=1), audit),
        open_spool(settings, engine, storage_key(settings)[0]),
        audit,
        Reports(audit, settings.hostname, settings.quarantine_retention),
        PolicyGate(engine, settings.policy()),
    )


def _hold(quarantine: Quarantine, message_id: str, now: datetime | None = None) -> None:
    now = now or datetime.now(UTC)
    store(quarantine.spool, message_id, _message("lab@partner.example"))
    with session_scope(quarantine.engine) as session:
        QueueStore.enqueue(
            session,
            message_id,
            SENDER,
            "drsmith",
            100,
            [QueuedRecipient("lab@partner.example", reason="UNKNOWN_EXTERNAL", quarantined=True)],
            now,
        )


@pytest.fixture
def held_store(make_settings: Callable[..., Settings]) -> Iterator[Quarantine]:
    """The quarantine of a gateway that holds unknown external recipients, drsmith recorded."""
    settings = make_settings(unknown_external="quarantine")
    initialise(settings)
    create_user(settings, "drsmith", [SENDER])
    quarantine = _quarantine(settings)
    try:
        yield quarantine
    finally:
        quarantine.engine.dispose()


@pytest.mark.parametrize("second", ["reject", "release"])
def test_two_admins_at_once_one_wins(held_store: Quarantine, second: str) -> None:
    quarantine = held_store
    _hold(quarantine, "RACE1")
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def act(what: str) -> None:
        barrier.wait()
        try:
            if what == "reject":
                quarantine.reject("RACE1", what)
            else:
                quarantine.release("RACE1", what)
            outcomes.append(what)
        except NotHeld:
            outcomes.append("not held")
        except Exception as exc:  # reported below, not lost in the thread
            outcomes.append(repr(exc))

    threads = [threading.Thread(target=act, args=(w,)) for w in ("reject", second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert sorted(outcomes) in (sorted(["not held", "reject"]), sorted(["not held", second]))
    with Session(quarantine.engine) as session:
        reports = session.exec(select(QueueMessage).where(QueueMessage.is_bounce)).all()
        assert len(reports) == (1 if "reject" in outcomes else 0)
        count, broken = quarantine.audit.verify(session)
    assert broken is None and count > 0


def test_a_secure_channel_lost_while_the_message_waits_puts_it_back_on_hold(
    practice_gateway: StartPractice, sink: Sink
) -> None:
    sink.handler.data_replies.append("451 4.3.0 try again later")
    running, practice = practice_gateway(retry_backoff="1h", retry_backoff_max="2h")
    _send(running, "anna@example.org")  # consented for TLS: queued, then deferred once
    _wait(lambda: practice.queue()[0].state == "deferred", "the first attempt to be deferred")
    # The patient withdraws the TLS consent and signs one that asks for encryption.
    with practice.session() as session:
        tls_consent = session.exec(
            select(Consent.id).where(Consent.address_key == "anna@example.org")
        ).one()
    practice.revoke(tls_consent)
    practice.consent("A-1", "anna@example.org")
    message_id = practice.queue()[0].message_id
    engine = make_engine(running.settings.database_url)
    QueueStore(engine, "test", timedelta(0)).retry_now(message_id, _now())
    engine.dispose()
    running.wake()
    (notice,) = _reports(sink, 1, b"Action: delayed")  # nothing went to Anna
    assert notice.rcpt_tos == (SENDER,) and b"<anna@example.org>" in notice.content
    assert [r.rcpt_tos for r in sink.received] == [(SENDER,)]
    (row,) = [r for r in practice.queue() if r.address == "anna@example.org"]
    assert (row.state, row.reason) == ("quarantined", "NO_SECURE_CHANNEL")
    assert ("message.quarantined", "gateway", "NO_SECURE_CHANNEL") in _actions(practice, message_id)


def _damage(spool: Spool, message_id: str) -> None:
    """Cut the end off a sealed message, wherever the spool keeps it."""
    if isinstance(spool, FileSpool) and spool.path(message_id).exists():
        path = spool.path(message_id)
        path.write_bytes(path.read_bytes()[:-20])
        return
    with session_scope(spool.engine) as session:  # an inline copy
        row = session.get(SpooledMessage, message_id)
        assert row is not None
        row.sealed = row.sealed[:-20]
        session.add(row)


def test_a_damaged_held_message_does_not_stop_retention(held_store: Quarantine) -> None:
    quarantine = held_store
    _hold(quarantine, "OLD1", datetime.now(UTC) - timedelta(days=40))
    _hold(quarantine, "OLD2", datetime.now(UTC) - timedelta(days=35))
    _hold(quarantine, "YOUNG", datetime.now(UTC) - timedelta(days=1))
    _damage(quarantine.spool, "OLD1")  # the oldest can no longer be opened
    assert quarantine.expire(timedelta(days=30)) == ["OLD1", "OLD2"]
    assert [r.message_id for r in quarantine.queue.held()] == ["YOUNG"]
    with Session(quarantine.engine) as session:
        reports = session.exec(select(QueueMessage).where(QueueMessage.is_bounce)).all()
    assert len(reports) == 2  # the damaged one is bounced too, without its header


def test_a_release_starts_the_queue_lifetime_afresh(held_store: Quarantine) -> None:
    quarantine = held_store
    _hold(quarantine, "LATE", datetime.now(UTC) - timedelta(days=8))  # longer than 5d
    assert quarantine.release("LATE", "privacy-officer").still_held == []
    (claimed,) = quarantine.queue.claim_due(datetime.now(UTC), 10)
    later = datetime.now(UTC) + timedelta(hours=1)
    greylisted = {"lab@partner.example": RecipientResult(Verdict.DEFERRED, "451 4.7.1 later")}
    settled = settle(claimed, greylisted, later, timedelta(days=5))
    assert settled["lab@partner.example"].verdict is Verdict.DEFERRED  # not failed at once
    settled = settle(claimed, greylisted, later + timedelta(days=5), timedelta(days=5))
    assert settled["lab@partner.example"].verdict is Verdict.FAILED
