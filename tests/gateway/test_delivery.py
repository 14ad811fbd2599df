"""Delivery to the next hop: verified TLS or nothing, retries, per-recipient results."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlmodel import Session, select

from consent_registry.db import make_engine
from consent_registry.models import AuditEvent
from gateway.audit import audit_log
from gateway.settings import Settings
from tests.conftest import DOMAIN, PASSWORD
from tests.gateway.test_durability import _recipients, _wait
from tests.pki import TestCA
from tests.runner import GatewayThread
from tests.sink import Sink

SENDER = f"dr.smith@{DOMAIN}"
BODY = f"From: {SENDER}\r\nTo: team@{DOMAIN}\r\nSubject: rota\r\n\r\nrota attached\r\n".encode()

StartGateway = Callable[[Settings], GatewayThread]


def _send(running: GatewayThread, recipients: list[str]) -> None:
    client = running.logged_in("drsmith", PASSWORD)
    assert client.sendmail(SENDER, recipients, BODY) == {}
    client.quit()


def _states(settings: Settings) -> dict[str, tuple[str, str | None]]:
    return {r.address: (r.state, r.last_error) for r in _recipients(settings)}


def _context(ca: TestCA, hosts: list[str], tmp: Path, expired: bool = False) -> ssl.SSLContext:
    cert, key = ca.server(hosts, expired=expired).write(tmp, "hop")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def _deferred_without_delivery(
    hop: Sink,
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    ca_file: Path,
    expected: str,
) -> None:
    hop.start()
    try:
        settings = make_settings(delivery=f"smtp://127.0.0.1:{hop.port}", delivery_ca_file=ca_file)
        running = start_gateway(settings)
        _send(running, [f"team@{DOMAIN}"])
        _wait(lambda: _states(settings).get(f"team@{DOMAIN}", ("",))[0] == "deferred", "deferral")
        _, error = _states(settings)[f"team@{DOMAIN}"]
        assert expected in (error or ""), error
        assert hop.received == []
    finally:
        hop.stop()


def test_next_hop_without_starttls_gets_nothing(
    make_settings: Callable[..., Settings], start_gateway: StartGateway, ca_file: Path
) -> None:
    _deferred_without_delivery(
        Sink(tls=None), make_settings, start_gateway, ca_file, "does not offer STARTTLS"
    )


def test_next_hop_with_a_certificate_for_another_name_gets_nothing(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    ca_file: Path,
    test_ca: TestCA,
    tmp_path: Path,
) -> None:
    context = _context(test_ca, ["mail.elsewhere.example"], tmp_path)
    _deferred_without_delivery(
        Sink(tls=context), make_settings, start_gateway, ca_file, "did not verify"
    )


def test_next_hop_with_an_expired_certificate_gets_nothing(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    ca_file: Path,
    test_ca: TestCA,
    tmp_path: Path,
) -> None:
    context = _context(test_ca, ["127.0.0.1"], tmp_path, expired=True)
    _deferred_without_delivery(
        Sink(tls=context), make_settings, start_gateway, ca_file, "certificate has expired"
    )


def test_next_hop_signed_by_an_untrusted_ca_gets_nothing(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    ca_file: Path,
    tmp_path: Path,
) -> None:
    context = _context(TestCA("some other CA"), ["127.0.0.1"], tmp_path)
    _deferred_without_delivery(
        Sink(tls=context), make_settings, start_gateway, ca_file, "did not verify"
    )


def test_implicit_tls_smarthost_with_auth_receives_the_message(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    ca_file: Path,
    sink_tls: ssl.SSLContext,
) -> None:
    hop = Sink(tls=sink_tls, implicit=True, credentials=("relay-user", "relay p@ss")).start()
    try:
        settings = make_settings(
            delivery=f"smtp://relay-user:relay%20p%40ss@127.0.0.1:{hop.port}?tls=implicit",
            delivery_ca_file=ca_file,
        )
        running = start_gateway(settings)
        _send(running, [f"team@{DOMAIN}"])
        (received,) = hop.wait_for(1)
        assert received.rcpt_tos == (f"team@{DOMAIN}",)
    finally:
        hop.stop()


def test_temporary_failures_are_retried_and_delivered_once(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    ca_file: Path,
    sink_tls: ssl.SSLContext,
) -> None:
    hop = Sink(
        tls=sink_tls, data_replies=["421 4.3.2 shutting down", "451 4.3.0 try later"]
    ).start()
    try:
        settings = make_settings(
            delivery=f"smtp://127.0.0.1:{hop.port}",
            delivery_ca_file=ca_file,
            retry_backoff="0.1s",
            retry_backoff_max="0.3s",
        )
        running = start_gateway(settings)
        _send(running, [f"team@{DOMAIN}"])
        hop.wait_for(1)
        _wait(lambda: _states(settings)[f"team@{DOMAIN}"][0] == "delivered", "delivery")
        assert len(hop.received) == 1
        (row,) = _recipients(settings)
        assert row.attempts == 3
    finally:
        hop.stop()


PIPELINING = pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])


@PIPELINING
def test_permanent_refusal_fails_only_that_recipient(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    ca_file: Path,
    sink_tls: ssl.SSLContext,
    pipelining: bool,
) -> None:
    gone = f"left.the.practice@{DOMAIN}"
    replies = {gone: "550 5.1.1 no such user"}
    hop = Sink(tls=sink_tls, rcpt_replies=replies, pipelining=pipelining).start()
    try:
        settings = make_settings(delivery=f"smtp://127.0.0.1:{hop.port}", delivery_ca_file=ca_file)
        running = start_gateway(settings)
        _send(running, [f"team@{DOMAIN}", gone])
        (received,) = hop.wait_for(1)
        assert received.rcpt_tos == (f"team@{DOMAIN}",)
        _wait(lambda: _states(settings)[gone][0] == "failed", "the refusal to be recorded")
        assert _states(settings)[gone] == ("failed", "550 5.1.1 no such user")
        assert _states(settings)[f"team@{DOMAIN}"][0] == "delivered"
    finally:
        hop.stop()


@PIPELINING
@pytest.mark.parametrize("reply", ["554 5.7.1 rejected by policy"])
def test_permanent_refusal_of_data_fails_every_recipient(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    ca_file: Path,
    sink_tls: ssl.SSLContext,
    reply: str,
    pipelining: bool,
) -> None:
    hop = Sink(tls=sink_tls, data_replies=[reply], pipelining=pipelining).start()
    try:
        settings = make_settings(delivery=f"smtp://127.0.0.1:{hop.port}", delivery_ca_file=ca_file)
        running = start_gateway(settings)
        _send(running, [f"a@{DOMAIN}", f"b@{DOMAIN}"])
        _wait(
            lambda: {_states(settings).get(f"{n}@{DOMAIN}", ("",))[0] for n in "ab"} == {"failed"},
            "both to fail",
        )
        (report,) = hop.wait_for(1)  # what arrives is the bounce to the sender, not the message
        assert (report.mail_from, report.rcpt_tos) == ("<>", (SENDER,))
        assert b"rota attached" not in report.content
    finally:
        hop.stop()


def test_connections_to_the_smarthost_are_reused_and_a_stale_one_is_replaced(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    ca_file: Path,
    sink_tls: ssl.SSLContext,
) -> None:
    hop = Sink(tls=sink_tls).start()
    try:
        settings = make_settings(delivery=f"smtp://127.0.0.1:{hop.port}", delivery_ca_file=ca_file)
        running = start_gateway(settings)
        for n in range(1, 5):  # one after the other: each finds the previous connection idle
            _send(running, [f"team@{DOMAIN}"])
            hop.wait_for(n)
            _wait(lambda: all(s == "delivered" for s, _ in _states(settings).values()), "done")
        assert hop.connections == 1
    finally:
        hop.stop()
    # The next hop restarts (its connections die); the next message still goes out.
    again = Sink(tls=sink_tls)
    again.start_on(hop.port)
    try:
        _send(running, [f"team@{DOMAIN}"])
        (received,) = again.wait_for(1)
        assert received.rcpt_tos == (f"team@{DOMAIN}",)
    finally:
        again.stop()


def test_still_deferred_after_the_queue_lifetime_bounces_once_and_never_bounces_a_bounce(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    ca_file: Path,
    sink_tls: ssl.SSLContext,
) -> None:
    slow = f"slow@{DOMAIN}"
    # The recipient is always 'try later'; the sender's own address refuses mail for good,
    # so the report about the first message must not cause a report about the report.
    hop = Sink(
        tls=sink_tls,
        rcpt_replies={slow: "451 4.2.1 mailbox busy", SENDER: "550 5.1.1 no such user"},
    ).start()
    try:
        settings = make_settings(
            delivery=f"smtp://127.0.0.1:{hop.port}",
            delivery_ca_file=ca_file,
            queue_lifetime="1s",
            retry_backoff="0.3s",
            retry_backoff_max="0.3s",
        )
        running = start_gateway(settings)
        _send(running, [slow])
        _wait(lambda: _states(settings).get(slow, ("",))[0] == "failed", "the lifetime to end")
        assert "queue lifetime exceeded; last error: 451 4.2.1 mailbox busy" in (
            _states(settings)[slow][1] or ""
        )
        # The report went to the sender (and was refused there): one report, no second.
        _wait(lambda: _states(settings).get(SENDER, ("",))[0] == "failed", "the report to fail")
        rows = _recipients(settings)
        assert sorted(r.address for r in rows) == sorted([slow, SENDER])
        assert hop.received == []
    finally:
        hop.stop()


def test_a_reply_in_another_charset_is_recorded_once_not_resent(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    ca_file: Path,
    sink_tls: ssl.SSLContext,
) -> None:
    # A Latin-1 reply (not UTF-8) must not stop the queue from recording the delivery.
    hop = Sink(tls=sink_tls, data_replies=[b"250 Nachricht f\xfcr M\xfcller angenommen"]).start()
    try:
        settings = make_settings(delivery=f"smtp://127.0.0.1:{hop.port}", delivery_ca_file=ca_file)
        running = start_gateway(settings)
        _send(running, [f"team@{DOMAIN}"])
        _wait(lambda: _states(settings).get(f"team@{DOMAIN}", ("",))[0] == "delivered", "record")
        assert len(hop.received) == 1
        engine = make_engine(settings.database_url)
        with Session(engine) as session:
            (event,) = session.exec(
                select(AuditEvent).where(AuditEvent.action == "message.delivered")
            ).all()
            assert event.detail is not None and "M\ufffdller" in event.detail
            assert audit_log(settings).verify(session)[1] is None
        engine.dispose()
    finally:
        hop.stop()
