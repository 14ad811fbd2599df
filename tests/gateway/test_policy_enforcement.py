"""The policy in the SMTP dialogue, end to end: smtplib as the mail client,
``cgw``'s registry behind it, a verified-TLS next hop in front of it."""

from __future__ import annotations

import email
import email.policy
import json
import smtplib
import subprocess
from collections.abc import Callable
from datetime import date, timedelta

import pytest
from sqlmodel import select

from consent_registry.db import make_engine
from consent_registry.models import Consent
from gateway.queue import QueueStore
from tests.cli import cgw_env, in_process
from tests.conftest import DOMAIN, PASSWORD
from tests.gateway.test_durability import _wait
from tests.practice import SENDER, Practice
from tests.practice import now as _now
from tests.runner import GatewayThread
from tests.sink import Sink


def _message(to: str, cc: str = "") -> bytes:
    head = f"From: Dr Smith <{SENDER}>\r\nTo: {to}\r\n" + (f"Cc: {cc}\r\n" if cc else "")
    return (head + "Subject: your results\r\n\r\nYour results are normal.\r\n").encode()


def _rcpt(running: GatewayThread, address: str, login: str = "drsmith") -> tuple[int, bytes]:
    client = running.logged_in(login, PASSWORD)
    client.docmd("MAIL", f"FROM:<{login.replace('drsmith', 'dr.smith')}@{DOMAIN}>")
    reply = client.docmd("RCPT", f"TO:<{address}>")
    client.quit()
    return reply


def test_consented_patient_is_delivered_over_verified_tls(
    practice_gateway: Callable[..., tuple[GatewayThread, Practice]], sink: Sink
) -> None:
    running, practice = practice_gateway()
    client = running.logged_in("drsmith", PASSWORD)
    assert client.sendmail(SENDER, ["Anna+results@EXAMPLE.org"], _message("anna@example.org")) == {}
    client.quit()
    (received,) = sink.wait_for(1)
    assert received.tls and received.rcpt_tos == ("Anna+results@EXAMPLE.org",)
    (row,) = practice.queue()
    assert (row.protection, row.reason) == ("tls", "PATIENT_CONSENTED")
    accepted = [e for e in practice.audit() if e.action == "message.accepted"]
    assert [(e.reason, e.decision, e.consent_id is not None) for e in accepted] == [
        ("PATIENT_CONSENTED", "allow", True)
    ]


SENTENCES = {
    "NO_CONSENT": b"There is no documented consent from this patient",
    "CONSENT_REVOKED": b"The patient has withdrawn consent",
    "CONSENT_EXPIRED": b"consent to e-mail at this address has expired",
    "NO_RELATIONSHIP": b"no established physician-patient relationship",
    "RELATIONSHIP_ENDED": b"relationship with this patient has ended",
}


def _no_consent(p: Practice) -> None:
    p.patient("Carl", "carl@example.org", "C-3")
    p.relate("C-3", "drsmith")


def _revoked(p: Practice) -> None:
    p.patient("Carl", "carl@example.org", "C-3")
    p.relate("C-3", "drsmith")
    p.revoke(p.consent("C-3", "carl@example.org", delivery="tls"))


def _expired(p: Practice) -> None:
    p.patient("Carl", "carl@example.org", "C-3")
    p.relate("C-3", "drsmith")
    p.consent(
        "C-3", "carl@example.org", delivery="tls", valid_from=date(2024, 1, 1), expires=date.today()
    )


def _no_relationship(p: Practice) -> None:
    p.patient("Carl", "carl@example.org", "C-3")
    p.consent("C-3", "carl@example.org", delivery="tls")


def _wrong_clinician(p: Practice) -> None:
    p.patient("Carl", "carl@example.org", "C-3")
    p.relate("C-3", "drjones")
    p.consent("C-3", "carl@example.org", delivery="tls", clinician="drjones")


def _ended(p: Practice) -> None:
    p.patient("Carl", "carl@example.org", "C-3")
    p.end_relationship(p.relate("C-3", "drsmith", since=date(2020, 1, 1)))
    p.consent("C-3", "carl@example.org", delivery="tls")


@pytest.mark.parametrize(
    ("arrange", "reason"),
    [
        (_no_consent, "NO_CONSENT"),
        (_revoked, "CONSENT_REVOKED"),
        (_expired, "CONSENT_EXPIRED"),
        (_no_relationship, "NO_RELATIONSHIP"),
        (_wrong_clinician, "NO_RELATIONSHIP"),
        (_ended, "RELATIONSHIP_ENDED"),
    ],
    ids=["no-consent", "revoked", "expired", "no-relationship", "wrong-clinician", "ended"],
)
def test_refused_at_rcpt_with_the_reason(
    practice_gateway: Callable[..., tuple[GatewayThread, Practice]],
    sink: Sink,
    arrange: Callable[[Practice], None],
    reason: str,
) -> None:
    running, practice = practice_gateway()
    arrange(practice)
    code, text = _rcpt(running, "Carl@Example.org")
    assert code == 550
    assert text.startswith(b"5.7.1 <Carl@Example.org>: ")
    assert SENTENCES[reason] in text
    denied = [e for e in practice.audit() if e.action == "message.denied"]
    assert [(e.recipient, e.reason) for e in denied] == [("Carl@Example.org", reason)]
    assert sink.received == []


@pytest.mark.parametrize(
    ("to", "cc", "envelope"),
    [
        ("anna@example.org, bob@example.org", "", ["anna@example.org", "bob@example.org"]),
        ("anna@example.org", "Bob <bob@example.org>", ["anna@example.org", "bob@example.org"]),
        # Bob is only in the header, not the envelope: Anna would still see him.
        ("anna@example.org, bob+x@example.org", "", ["anna@example.org"]),
    ],
    ids=["two-in-to", "one-in-cc", "header-only"],
)
def test_patients_shown_to_each_other_are_refused_after_data(
    practice_gateway: Callable[..., tuple[GatewayThread, Practice]],
    sink: Sink,
    to: str,
    cc: str,
    envelope: list[str],
) -> None:
    running, practice = practice_gateway()
    client = running.logged_in("drsmith", PASSWORD)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail(SENDER, envelope, _message(to, cc))
    assert refused.value.smtp_code == 550
    assert b"another patient's address" in refused.value.smtp_error
    client.quit()
    assert sink.received == [] and practice.queue() == []
    assert {e.reason for e in practice.audit() if e.action == "message.denied"} == {
        "PATIENTS_EXPOSED"
    }


def test_patients_in_bcc_are_fine(
    practice_gateway: Callable[..., tuple[GatewayThread, Practice]], sink: Sink
) -> None:
    running, _ = practice_gateway()
    client = running.logged_in("drsmith", PASSWORD)
    message = _message(f"Dr Smith <{SENDER}>").replace(
        b"Subject:", b"Bcc: anna@example.org, bob@example.org\r\nSubject:"
    )
    assert client.sendmail(SENDER, ["anna@example.org", "bob@example.org"], message) == {}
    client.quit()
    (received,) = sink.wait_for(1)
    assert set(received.rcpt_tos) == {"anna@example.org", "bob@example.org"}
    assert b"Bcc:" not in received.content


def test_mixed_recipients_in_reject_mode_deliver_to_the_allowed_only(
    practice_gateway: Callable[..., tuple[GatewayThread, Practice]], sink: Sink
) -> None:
    running, practice = practice_gateway()
    _no_consent(practice)
    client = running.logged_in("drsmith", PASSWORD)
    refused = client.sendmail(
        SENDER,
        ["anna@example.org", "carl@example.org", f"team@{DOMAIN}"],
        _message("anna@example.org"),
    )
    client.quit()
    assert list(refused) == ["carl@example.org"] and refused["carl@example.org"][0] == 550
    (received,) = sink.wait_for(1)
    assert set(received.rcpt_tos) == {"anna@example.org", f"team@{DOMAIN}"}


def test_mixed_recipients_in_bounce_mode_get_one_report(
    practice_gateway: Callable[..., tuple[GatewayThread, Practice]], sink: Sink
) -> None:
    running, practice = practice_gateway(denial_mode="bounce")
    _no_consent(practice)
    _wrong_clinician_patient = practice.patient("Dora", "dora@example.org", "D-4")
    client = running.logged_in("drsmith", PASSWORD)
    refused = client.sendmail(
        SENDER,
        ["anna@example.org", "carl@example.org", "dora@example.org"],
        _message("anna@example.org"),
    )
    client.quit()
    assert refused == {}  # bounce mode: accepted in the dialogue ...
    delivered = sink.wait_for(2)
    by_recipient = {r.rcpt_tos: r for r in delivered}
    assert ("anna@example.org",) in by_recipient
    report = by_recipient[(SENDER,)]  # ... and reported in one DSN to the sender
    assert report.mail_from == "<>"  # the null sender
    parsed = email.message_from_bytes(report.content, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    status = next(p for p in parsed.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "Final-Recipient: rfc822; carl@example.org" in text
    assert "Final-Recipient: rfc822; dora@example.org" in text
    assert "Status: 5.7.1" in text
    assert b"Your results are normal" not in report.content  # never the body
    assert len(sink.received) == 2 and _wrong_clinician_patient > 0


def test_consent_without_a_secure_channel_is_held(
    practice_gateway: Callable[..., tuple[GatewayThread, Practice]], sink: Sink
) -> None:
    running, practice = practice_gateway()
    practice.patient("Eve", "eve@example.org", "E-5")
    practice.relate("E-5", "drsmith")
    practice.consent("E-5", "eve@example.org")  # encrypted, and no certificate on file
    client = running.logged_in("drsmith", PASSWORD)
    client.mail(SENDER)
    client.rcpt("eve@example.org")
    code, reply = client.data(_message("eve@example.org"))
    client.quit()
    assert code == 250 and b"1 recipient(s) held for review" in reply
    held = [r for r in practice.queue() if r.address == "eve@example.org"]
    assert [(r.state, r.reason) for r in held] == [("quarantined", "NO_SECURE_CHANNEL")]
    assert [e.reason for e in practice.audit() if e.action == "message.quarantined"] == [
        "NO_SECURE_CHANNEL"
    ]
    # Only the sender hears of it: a notice from the null sender that quotes
    # neither the subject nor the body of the held message.
    (notice,) = sink.wait_for(1)
    assert (notice.mail_from, notice.rcpt_tos) == ("<>", (SENDER,))
    assert b"Action: delayed" in notice.content and b"<eve@example.org>" in notice.content
    assert b"no secure way to deliver" in notice.content
    assert b"your results" not in notice.content.lower()


def test_staff_send_on_behalf_unless_the_practice_refuses(
    practice_gateway: Callable[..., tuple[GatewayThread, Practice]],
) -> None:
    running, _ = practice_gateway()
    client = running.logged_in("nurse", PASSWORD)
    client.docmd("MAIL", f"FROM:<nurse@{DOMAIN}>")
    assert client.docmd("RCPT", "TO:<anna@example.org>")[0] == 250
    client.quit()


def test_staff_refused_when_the_practice_says_so(
    practice_gateway: Callable[..., tuple[GatewayThread, Practice]],
) -> None:
    running, _ = practice_gateway(staff_patient_mail="refuse")
    client = running.logged_in("nurse", PASSWORD)
    client.docmd("MAIL", f"FROM:<nurse@{DOMAIN}>")
    code, text = client.docmd("RCPT", "TO:<anna@example.org>")
    assert code == 550 and b"Only clinicians may e-mail patients" in text
    client.quit()


def test_permanent_failure_at_the_next_hop_bounces_to_the_sender(
    practice_gateway: Callable[..., tuple[GatewayThread, Practice]], sink: Sink
) -> None:
    sink.handler.rcpt_replies["anna@example.org"] = "550 5.1.1 mailbox unavailable"
    running, practice = practice_gateway()
    client = running.logged_in("drsmith", PASSWORD)
    client.sendmail(SENDER, ["anna@example.org"], _message("anna@example.org"))
    client.quit()
    (report,) = sink.wait_for(1)
    assert report.mail_from == "<>"  # the null sender and report.rcpt_tos == (SENDER,)
    parsed = email.message_from_bytes(report.content, policy=email.policy.default)
    status = next(p for p in parsed.walk() if p.get_content_type() == "message/delivery-status")
    assert "Final-Recipient: rfc822; anna@example.org" in status.as_string()
    assert "550 5.1.1 mailbox unavailable" in status.as_string()
    headers = next(p for p in parsed.walk() if p.get_content_type() == "text/rfc822-headers")
    assert "Subject: your results" in headers.as_string()
    assert b"Your results are normal" not in report.content
    _wait(lambda: any(r.state == "failed" for r in practice.queue()), "the failure")


def test_cgw_check_tells_staff_what_the_gateway_would_do(
    practice_gateway: Callable[..., tuple[GatewayThread, Practice]],
) -> None:
    running, practice = practice_gateway()
    _no_consent(practice)
    cgw = in_process(
        cgw_env(
            CGW_DATA_DIR=str(running.settings.data_dir),
            CGW_DATABASE_URL=running.settings.database_url,
            CGW_PRACTICE_DOMAINS=DOMAIN,
        )
    )

    def check(*recipients: str, as_json: bool = False) -> subprocess.CompletedProcess[str]:
        args = [a for r in recipients for a in ("--to", r)] + (["--json"] if as_json else [])
        return cgw("check", "--from", SENDER, *args)

    def outcomes(*recipients: str) -> tuple[dict[str, tuple[str, str, str]], object]:
        done = check(*recipients, as_json=True)
        assert done.returncode == 0, done.stderr
        verdict = json.loads(done.stdout)
        rows = {
            r["to"]: (r["outcome"], r["reason"], r["protection"]) for r in verdict["recipients"]
        }
        return rows, verdict["message"]

    assert outcomes("anna@example.org", f"team@{DOMAIN}") == (
        {
            "anna@example.org": ("allow", "PATIENT_CONSENTED", "tls"),
            f"team@{DOMAIN}": ("allow", "INTERNAL", "none"),
        },
        None,
    )
    assert outcomes("Carl@example.org")[0] == {"Carl@example.org": ("deny", "NO_CONSENT", "none")}
    both = check("anna@example.org", "bob@example.org")
    assert both.returncode == 0
    assert "another patient's address" in both.stdout
    # What check says is what the gateway does.
    code, text = _rcpt(running, "Carl@example.org")
    assert code == 550 and SENTENCES["NO_CONSENT"] in text
    unknown = cgw("check", "--from", "nobody@example.org", "--to", "a@b.example")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == (
        "cgw: error: nobody@example.org is not the address of an active cgw user"
    )


def test_a_consent_revoked_while_the_message_waits_stops_it_leaving(
    practice_gateway: Callable[..., tuple[GatewayThread, Practice]], sink: Sink
) -> None:
    sink.handler.data_replies.append("451 4.3.0 try again later")
    running, practice = practice_gateway(retry_backoff="1h", retry_backoff_max="2h")
    client = running.logged_in("drsmith", PASSWORD)
    client.sendmail(SENDER, ["anna@example.org"], _message("anna@example.org"))
    client.quit()
    _wait(lambda: practice.queue()[0].state == "deferred", "the first attempt to be deferred")
    with practice.session() as session:
        consent_id = session.exec(
            select(Consent.id).where(Consent.address_key == "anna@example.org")
        ).one()
    practice.revoke(consent_id)
    message_id = practice.queue()[0].message_id
    engine = make_engine(running.settings.database_url)
    QueueStore(engine, "test", timedelta(0)).retry_now(message_id, _now())
    engine.dispose()
    _wait(lambda: practice.queue()[0].state == "failed", "the retry to be refused", timeout=30)
    assert "withdrawn consent" in (practice.queue()[0].last_error or "")
    (report,) = sink.wait_for(1)  # only the report to the sender ever reached the next hop
    assert report.rcpt_tos == (SENDER,) and report.mail_from == "<>"


def test_the_privacy_officer_sees_what_is_held_and_opening_it_is_audited(
    practice_gateway: Callable[..., tuple[GatewayThread, Practice]], sink: Sink
) -> None:
    running, practice = practice_gateway()
    practice.patient("Eve", "eve@example.org", "E-5")
    practice.relate("E-5", "drsmith")
    practice.consent("E-5", "eve@example.org")  # encrypted only, no certificate: held
    client = running.logged_in("drsmith", PASSWORD)
    client.sendmail(SENDER, ["eve@example.org"], _message("eve@example.org"))
    client.quit()
    run = in_process(
        cgw_env(
            CGW_DATA_DIR=str(running.settings.data_dir),
            CGW_DATABASE_URL=running.settings.database_url,
        )
    )

    listed = run("quarantine", "list", "--json")
    (held,) = json.loads(listed.stdout)
    assert (held["recipients"], held["reasons"], held["user"]) == (
        ["eve@example.org"],
        ["NO_SECURE_CHANNEL"],
        "drsmith",
    )
    assert "results are normal" not in listed.stdout  # never the content in a list
    shown = run("quarantine", "show", held["id"], "--actor", "privacy-officer")
    assert shown.returncode == 0, shown.stderr
    assert "Your results are normal." in shown.stdout
    assert shown.stdout.startswith("Received: by gateway.test")
    (event,) = [e for e in practice.audit() if e.action == "quarantine.shown"]
    assert (event.actor, event.message_id) == ("privacy-officer", held["id"])
    missing = run("quarantine", "show", "NOSUCH")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "cgw: error: no held message 'NOSUCH' (see: cgw quarantine list)"
    )
    # Nothing left but the notice to the sender.
    assert [r.rcpt_tos for r in sink.wait_for(1)] == [(SENDER,)]
