"""SMTP smuggling: end-of-data look-alikes must never split one message into two.

Each case hides a second transaction behind a non-standard end-of-data
sequence. The gateway must answer the whole DATA with one refusal (bare CR
or LF is not accepted), accept nothing, and deliver nothing.
"""

from __future__ import annotations

import pytest

from tests.conftest import DOMAIN, PASSWORD
from tests.runner import GatewayThread
from tests.sink import Sink

SENDER = f"dr.smith@{DOMAIN}"
SMUGGLED = (
    f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<victim@{DOMAIN}>\r\nDATA\r\n"
    f"From: {SENDER}\r\n\r\nsmuggled\r\n"
).encode()


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"],
    ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF", "CR.CRLF"],
)
def test_fake_end_of_data_is_refused_as_one_message(
    gateway: GatewayThread, sink: Sink, fake_end: bytes
) -> None:
    raw = gateway.raw()
    raw.login("drsmith", PASSWORD)
    raw.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<colleague@{DOMAIN}>\r\nDATA\r\n".encode())
    raw.expect("250 2.1.0")
    raw.expect("250 2.1.5")
    raw.expect("354")
    raw.send(f"From: {SENDER}\r\n\r\nfirst".encode() + fake_end + SMUGGLED + b"\r\n.\r\n")
    assert raw.reply().startswith("550 5.6.0")
    raw.send(b"NOOP\r\n")
    raw.expect("250 2.0.0")  # the very next reply: no smuggled transaction was answered
    raw.close()
    assert list(gateway.settings.spool_dir.glob("*.msg")) == []
    assert sink.received == []


def test_commands_pipelined_behind_starttls_are_discarded(gateway: GatewayThread) -> None:
    plain = gateway.raw(starttls=False)
    # HELP, not NOOP: NOOP's reply is the same as RSET's, which would hide a survivor.
    plain.send(b"STARTTLS\r\nHELP injected-before-tls\r\n")
    plain.expect("220")
    tls = gateway.client_context().wrap_socket(plain.sock, server_hostname="127.0.0.1")
    tls.sendall(b"RSET\r\n")
    # Had the injected HELP survived, its reply would come first; RSET's is "250 2.0.0 OK".
    first = tls.recv(1024)
    assert first == b"250 2.0.0 OK\r\n"
    tls.close()


def test_crlf_inside_an_address_cannot_inject_commands(gateway: GatewayThread, sink: Sink) -> None:
    raw = gateway.raw()
    raw.login("drsmith", PASSWORD)
    raw.send(f"MAIL FROM:<{SENDER}>\r\n".encode())
    raw.expect("250 2.1.0")
    raw.send(f"RCPT TO:<colleague@{DOMAIN}>\rRCPT TO:<victim@example.org>\r\n".encode())
    assert raw.reply()[:1] == "5"
    raw.send(b"RSET\r\n")
    raw.expect("250 2.0.0")
    raw.close()
    assert sink.received == []
