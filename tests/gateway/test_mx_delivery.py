"""CGW_DELIVERY=mx: MX lookup, preference order, null MX, and TLS as each
recipient's decision demands (verified for TLS-only consents)."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.settings import Settings
from tests.conftest import DOMAIN, PASSWORD
from tests.fake_dns import FakeDns
from tests.gateway.test_durability import _wait
from tests.pki import TestCA
from tests.practice import SENDER, Practice
from tests.runner import GatewayThread
from tests.sink import Sink


def _context(ca: TestCA, host: str, tmp: Path) -> ssl.SSLContext:
    cert, key = ca.server([host]).write(tmp, host)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture
def mx_world(test_ca: TestCA, tmp_path: Path) -> Iterator[Callable[..., tuple[Sink, FakeDns]]]:
    started: list[Sink | FakeDns] = []

    def build(tls_name: str | None, zone: dict[tuple[str, str], list[str]]) -> tuple[Sink, FakeDns]:
        hop = Sink(_context(test_ca, tls_name, tmp_path) if tls_name else None).start()
        dns_server = FakeDns(zone).start()
        started.extend([hop, dns_server])
        return hop, dns_server

    yield build
    for item in started:
        item.stop()


def _start(
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    ca_file: Path,
    hop: Sink,
    dns_server: FakeDns,
    **overrides: object,
) -> tuple[GatewayThread, Practice]:
    settings = make_settings(
        delivery="mx",
        mx_port=hop.port,
        dns_resolvers=f"127.0.0.1:{dns_server.port}",
        delivery_ca_file=ca_file,
        timezone="UTC",
        **overrides,
    )
    running = start_gateway(settings)
    practice = Practice(settings)
    practice.patient("Anna Muster", "anna@example.org", "A-1")
    practice.relate("A-1", "drsmith")
    practice.consent("A-1", "anna@example.org", delivery="tls")
    return running, practice


def _send(running: GatewayThread, to: str) -> None:
    client = running.logged_in("drsmith", PASSWORD)
    client.sendmail(SENDER, [to], f"From: {SENDER}\r\nTo: {to}\r\n\r\nhello\r\n".encode())
    client.quit()


def test_mx_in_preference_order_with_verified_tls_for_a_tls_consent(
    mx_world: Callable[..., tuple[Sink, FakeDns]],
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    ca_file: Path,
) -> None:
    hop, dns_server = mx_world(
        "mx2.example.org",
        {
            ("example.org", "MX"): ["20 mx2.example.org.", "10 mx1.example.org."],
            ("mx1.example.org", "A"): ["127.0.0.2"],  # loopback, but nobody listens there
            ("mx2.example.org", "A"): ["127.0.0.1"],
        },
    )
    running, _ = _start(make_settings, start_gateway, ca_file, hop, dns_server)
    _send(running, "anna@example.org")
    (received,) = hop.wait_for(1)
    assert received.tls and received.rcpt_tos == ("anna@example.org",)


def test_tls_consent_gets_nothing_from_a_host_with_the_wrong_certificate(
    mx_world: Callable[..., tuple[Sink, FakeDns]],
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    ca_file: Path,
) -> None:
    hop, dns_server = mx_world(
        "other.example.net",
        {
            ("example.org", "MX"): ["10 mx1.example.org."],
            ("mx1.example.org", "A"): ["127.0.0.1"],
        },
    )
    running, practice = _start(make_settings, start_gateway, ca_file, hop, dns_server)
    _send(running, "anna@example.org")
    _wait(lambda: any(r.state == "deferred" for r in practice.queue()), "the deferral")
    (row,) = practice.queue()
    assert "did not verify" in (row.last_error or "")
    assert hop.received == []
    deferred = [e for e in practice.audit() if e.action == "message.deferred"]
    assert "did not verify" in (deferred[0].detail or "")


def test_tls_consent_gets_nothing_without_starttls_but_other_mail_goes(
    mx_world: Callable[..., tuple[Sink, FakeDns]],
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    ca_file: Path,
) -> None:
    hop, dns_server = mx_world(
        None,
        {  # a host that offers no STARTTLS at all
            ("example.org", "MX"): ["10 mx1.example.org."],
            ("mx1.example.org", "A"): ["127.0.0.1"],
            ("elsewhere.example", "MX"): ["10 mx1.example.org."],
        },
    )
    running, practice = _start(make_settings, start_gateway, ca_file, hop, dns_server)
    _send(running, "anna@example.org")
    _wait(lambda: any(r.state == "deferred" for r in practice.queue()), "the deferral")
    assert "does not offer STARTTLS" in (practice.queue()[0].last_error or "")
    _send(running, "someone@elsewhere.example")  # not patient mail: TLS when offered
    (received,) = hop.wait_for(1)
    assert received.rcpt_tos == ("someone@elsewhere.example",) and not received.tls


def test_null_mx_fails_and_bounces_and_no_mx_means_the_domain_itself(
    mx_world: Callable[..., tuple[Sink, FakeDns]],
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    ca_file: Path,
) -> None:
    hop, dns_server = mx_world(
        "praxis.example",
        {
            ("nomail.example", "MX"): ["0 ."],
            (DOMAIN, "A"): ["127.0.0.1"],  # no MX record: the implicit MX
            ("nomail.example", "A"): ["127.0.0.1"],
        },
    )
    running, practice = _start(make_settings, start_gateway, ca_file, hop, dns_server)
    _send(running, "someone@nomail.example")
    (report,) = hop.wait_for(1)  # the bounce, delivered to the sender via the implicit MX
    assert report.rcpt_tos == (SENDER,) and report.mail_from == "<>"
    assert b"null MX" in report.content
    assert [r.state for r in practice.queue() if r.address == "someone@nomail.example"] == [
        "failed"
    ]
