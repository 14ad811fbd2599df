"""Hostile clients on the submission port: injection, overlong lines, brute force, floods.

Every case states the reply the gateway gives and checks what got through:
the next hop (the sink) must receive exactly the transactions the gateway
acknowledged, to exactly the recipients it acknowledged, and nothing else.

What ``tests/gateway`` already covers is not repeated here: NOOP pipelined
behind STARTTLS, a bare CR before a second RCPT, non-ASCII addresses without
SMTPUTF8 (553 5.6.7), back-off and lock-out with AUTH PLAIN on one port, the
per-client cap and the idle and session timeouts on the STARTTLS port.

Cases marked ``xfail(strict=True)`` are product bugs found by this suite:
each asserts the correct behaviour and fails today; the marker has to go when
the bug is fixed (strict: an unexpected pass fails the run).

The protocol layer is the same whatever the database, so these run on SQLite.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.settings import Settings
from tests.conftest import DOMAIN, PASSWORD
from tests.gateway.test_durability import _recipients, _stored
from tests.hostile.helpers import (
    COLLEAGUE,
    SENDER,
    audit,
    b64,
    body_of,
    closed_within,
    greeting,
    held_connections,
    logged_in_raw,
    message,
    open_data,
    plain_token,
    transaction,
)
from tests.runner import GatewayThread
from tests.sink import Sink

StartGateway = Callable[[Settings], GatewayThread]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: nothing here depends on the database engine."""
    return f"sqlite:///{tmp_path / 'data' / 'cgw.db'}"


def _nothing_accepted(gateway: GatewayThread, sink: Sink) -> None:
    assert _recipients(gateway.settings) == []
    assert _stored(gateway.settings) == []
    assert sink.received == []


# 1. Commands pipelined behind STARTTLS ------------------------------------------------


def test_auth_and_mail_pipelined_behind_starttls_do_not_survive_the_handshake(
    gateway: GatewayThread, sink: Sink
) -> None:
    plain = gateway.raw(starttls=False)
    # Injected in the same packet as STARTTLS, in the clear: a valid login and a transaction.
    plain.send(
        b"STARTTLS\r\n"
        + f"AUTH PLAIN {plain_token('drsmith', PASSWORD)}\r\n".encode()
        + f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{COLLEAGUE}>\r\n".encode()
    )
    plain.expect("220 ")
    tls = gateway.client_context().wrap_socket(plain.sock, server_hostname="127.0.0.1")
    replies = tls.makefile("rb")
    tls.sendall(b"NOOP first-inside-tls\r\n")
    # Had any injected command survived, its reply (235, 250, 503, ...) would come first.
    assert replies.readline() == b"250 2.0.0 OK\r\n"
    tls.sendall(b"EHLO client.test\r\n")
    while not replies.readline().startswith(b"250 "):
        pass
    # A fresh session: the injected AUTH did not log it in.
    tls.sendall(f"MAIL FROM:<{SENDER}>\r\n".encode())
    assert replies.readline() == b"530 5.7.0 Authentication required\r\n"
    tls.sendall(f"RCPT TO:<{COLLEAGUE}>\r\nDATA\r\n".encode())
    assert replies.readline().startswith(b"530 5.7.0")
    assert replies.readline().startswith(b"530 5.7.0")
    tls.close()
    _nothing_accepted(gateway, sink)
    assert audit(gateway.settings, "auth.failed") == []  # not even seen as a login attempt


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_command_sent_with_the_clients_finished_is_answered(
    loop: str,
    monkeypatch: pytest.MonkeyPatch,
    sink: Sink,
    ca_file: Path,
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
) -> None:
    """TLS 1.3 lets a client send its first command in the segment that ends the handshake.

    That command is encrypted, so it is no pipelined plaintext: discarding it
    along with the plaintext left the client waiting for a reply that never
    came (as ``cgw demo``'s client did). asyncio's loop hands it over before
    STARTTLS's task resumes; uvloop's did not here, but nothing promises that.
    """
    if loop == "asyncio":  # cgw serve's loop where uvloop is not installed
        monkeypatch.setattr("tests.runner.new_event_loop", asyncio.new_event_loop)
    gateway = start_gateway(
        make_settings(delivery=f"smtp://127.0.0.1:{sink.port}", delivery_ca_file=ca_file)
    )
    raw = gateway.raw(timeout=10, starttls=False)
    raw.send(b"STARTTLS\r\n")
    raw.expect("220 ")
    plain = raw.sock
    context = gateway.client_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            plain.sendall(outgoing.read())
            incoming.write(plain.recv(65536))
    tls.write(b"EHLO client.test\r\n")
    plain.sendall(outgoing.read())  # the client's Finished and the EHLO in one segment
    received = b""
    while not received.endswith(b"\r\n") or b"\r\n250 " not in b"\r\n" + received:
        try:
            received += tls.read(65536)
        except ssl.SSLWantReadError:
            incoming.write(plain.recv(65536))  # a timeout here: the EHLO went unanswered
    assert received.startswith(b"250-gateway.test")
    assert b"250-AUTH " in received
    plain.close()


# 2. CR, LF and NUL inside MAIL FROM / RCPT TO ------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(f"RCPT TO:<colleague\0@{DOMAIN}>", "553 5.1.3 ", id="rcpt-NUL-in-local-part"),
        pytest.param(f"RCPT TO:<{COLLEAGUE}>\0RSET", "553 5.1.3 ", id="rcpt-NUL-then-command"),
        pytest.param(
            f"RCPT TO:<{COLLEAGUE}>\0RCPT TO:<victim@example.org>",
            "553 5.1.3 ",
            id="rcpt-NUL-then-second-rcpt",
        ),
        pytest.param(f"RCPT TO:<{COLLEAGUE}%0d%0a>", "553 5.1.3 ", id="rcpt-encoded-CRLF-domain"),
        pytest.param(
            f"RCPT TO:<colleague%0d%0aRSET@{DOMAIN}>", "553 5.1.3 ", id="rcpt-encoded-CRLF-local"
        ),
        pytest.param(f"RCPT TO:<colle\rague@{DOMAIN}>", "553 5.1.3 ", id="rcpt-CR-in-local-part"),
        pytest.param(f"RCPT TO:<{COLLEAGUE}>\rRSET", "553 5.1.3 ", id="rcpt-CR-then-command"),
        pytest.param(
            f"RCPT TO:<{COLLEAGUE}\rRSET>",
            "553 5.1.3 ",
            id="rcpt-CR-inside-brackets",
        ),
        pytest.param(
            f"RCPT TO:{COLLEAGUE}\rDATA",
            "553 5.1.3 ",
            id="rcpt-CR-unbracketed",
        ),
    ],
)
def test_control_characters_in_a_recipient_never_make_a_second_command(
    gateway: GatewayThread, sink: Sink, line: str, expected: str
) -> None:
    raw = logged_in_raw(gateway)
    try:
        raw.send(f"MAIL FROM:<{SENDER}>\r\n".encode())
        raw.expect("250 2.1.0")
        raw.send(line.encode() + b"\r\nNOOP\r\n")
        reply = raw.reply()
        assert reply.startswith(expected), reply
        assert raw.reply() == "250 2.0.0 OK"  # the very next reply is NOOP's: one line, one reply
        # The transaction is still open: finish it with a practice colleague, so delivery happens.
        raw.send(f"RCPT TO:<{COLLEAGUE}>\r\nDATA\r\n".encode())
        raw.expect("250 2.1.5")
        raw.expect("354")
        raw.send(message("control-characters") + b".\r\n")
        raw.expect("250 2.0.0 Ok: queued as")
    finally:
        raw.close()
    (received,) = sink.wait_for(1)
    assert (received.mail_from, received.rcpt_tos) == (SENDER, (COLLEAGUE,))
    assert [r.address for r in _recipients(gateway.settings)] == [COLLEAGUE]


@pytest.mark.parametrize(
    ("sent", "taken"),
    [
        pytest.param(
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{COLLEAGUE}>\nRCPT TO:<victim@example.org>\r\n",
            ["250 2.1.0"],  # MAIL ended in CRLF
            id="rcpt-bare-LF-then-second-rcpt",
        ),
        pytest.param(
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{COLLEAGUE}> X-PAD={'x' * 5000}\n"
            "RCPT TO:<victim@example.org>\r\n",
            ["250 2.1.0"],  # the bare LF at the end of an overlong line counts too
            id="overlong-line-ending-in-bare-LF",
        ),
        pytest.param(f"MAIL FROM:<{SENDER}>\nRCPT TO:<{COLLEAGUE}>\r\n", [], id="mail-bare-LF"),
        pytest.param("NOOP\n", [], id="lines-ending-in-LF-only"),  # openssl s_client without -crlf
    ],
)
def test_a_bare_lf_in_a_command_line_ends_the_session_before_anything_after_it(
    gateway: GatewayThread, sent: str, taken: list[str]
) -> None:
    raw = logged_in_raw(gateway)
    try:
        raw.send(sent.encode() + b"DATA\r\n" + message("after-a-bare-LF") + b".\r\nNOOP\r\n")
        for reply in taken:
            raw.expect(reply)
        assert raw.reply().startswith("521 5.5.2 gateway.test Error: bare <LF> received")
        with pytest.raises(ConnectionError, match="closed"):
            raw.reply()  # nothing after it was answered: no RCPT, DATA or NOOP
    finally:
        raw.close()
    assert _recipients(gateway.settings) == []


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(f"MAIL FROM:<dr.smith\0@{DOMAIN}>", "553 5.1.3 ", id="mail-NUL-in-address"),
        pytest.param(
            f"MAIL FROM:<{SENDER}>\0RCPT TO:<victim@example.org>",
            "553 5.1.3 ",
            id="mail-NUL-then-rcpt",
        ),
        pytest.param(f"MAIL FROM:<{SENDER}%0d%0a>", "553 5.1.3 ", id="mail-encoded-CRLF"),
        pytest.param(
            f"MAIL FROM:<{SENDER}>\rRCPT TO:<victim@example.org>",
            "553 5.1.3 ",
            id="mail-CR-then-rcpt",
        ),
    ],
)
def test_control_characters_in_the_sender_never_make_a_second_command(
    gateway: GatewayThread, sink: Sink, line: str, expected: str
) -> None:
    raw = logged_in_raw(gateway)
    raw.send(line.encode() + b"\r\nNOOP\r\n")
    reply = raw.reply()
    assert reply.startswith(expected), reply
    assert raw.reply() == "250 2.0.0 OK"
    # No sender was set: a recipient now is out of sequence.
    raw.send(f"RCPT TO:<{COLLEAGUE}>\r\n".encode())
    raw.expect("503 5.5.1")
    assert transaction(raw, [COLLEAGUE], message("after-bad-sender")).startswith("250 2.0.0")
    raw.close()
    (received,) = sink.wait_for(1)
    assert (received.mail_from, received.rcpt_tos) == (SENDER, (COLLEAGUE,))


@pytest.mark.parametrize("hostile", ["colle\rague", "colle\0ague"], ids=["CR", "NUL"])
def test_a_refusal_never_echoes_control_characters(gateway: GatewayThread, hostile: str) -> None:
    raw = logged_in_raw(gateway)
    raw.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{hostile}@{DOMAIN}>\r\n".encode())
    raw.expect("250 2.1.0")
    reply = raw.expect("553 5.1.3")
    raw.close()
    assert "\r" not in reply and "\0" not in reply, repr(reply)


# 3. Overlong command and text lines ---------------------------------------------------


def test_overlong_command_lines_are_500_and_the_session_goes_on(
    gateway: GatewayThread, sink: Sink
) -> None:
    raw = logged_in_raw(gateway)
    raw.send(f"MAIL FROM:<{SENDER}>\r\n".encode())
    raw.expect("250 2.1.0")
    # Over 512 octets (RFC 5321 4.5.3.1.4), and far over the reader's line limit.
    for line in (
        f"RCPT TO:<victim@example.org> X-PAD={'x' * 600}",
        f"RCPT TO:<{'v' * 600}@example.org>",
        f"RCPT TO:<victim@example.org> X-PAD={'x' * 50_000}",
        f"NOOP {'x' * 50_000}",
    ):
        raw.send(line.encode() + b"\r\n")
        assert raw.reply() == "500 5.5.2 Command line too long"
    raw.send(b"NOOP\r\n")
    raw.expect("250 2.0.0 OK")
    # The transaction survived: the sender still stands, no recipient was added.
    raw.send(f"RCPT TO:<{COLLEAGUE}>\r\nDATA\r\n".encode())
    raw.expect("250 2.1.5")
    raw.expect("354")
    raw.send(message("after-long-commands") + b".\r\n")
    raw.expect("250 2.0.0")
    raw.close()
    (received,) = sink.wait_for(1)
    assert received.rcpt_tos == (COLLEAGUE,)


def test_an_overlong_mail_command_is_refused_however_often_the_client_said_ehlo(
    gateway: GatewayThread,
) -> None:
    raw = logged_in_raw(gateway)
    for _ in range(12):
        raw.send(b"EHLO client.test\r\n")
        raw.expect("250 ")
    # 512 octets plus SIZE (26) and SMTPUTF8 (10) is the most a MAIL line may take.
    raw.send(f"MAIL FROM:<{SENDER}> X-PAD={'x' * 700}\r\n".encode())
    assert raw.reply() == "500 5.5.2 Command line too long"
    raw.close()


def test_an_overlong_text_line_refuses_the_whole_message_and_the_session_goes_on(
    gateway: GatewayThread, sink: Sink
) -> None:
    raw = logged_in_raw(gateway)
    long_line = b"A" * 1_500
    reply = transaction(raw, [COLLEAGUE], message("too-long") + long_line + b"\r\nafter\r\n")
    assert reply == "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"
    raw.send(b"NOOP\r\n")
    raw.expect("250 2.0.0 OK")
    raw.send(b"DATA\r\n")  # the transaction is over: nothing of it is left to send
    raw.expect("503 5.5.1")
    # A line of exactly 1,000 octets with its CRLF is allowed, and arrives unchanged.
    longest = message("longest-line") + b"B" * 998 + b"\r\n"
    assert transaction(raw, [COLLEAGUE], longest).startswith("250 2.0.0")
    raw.close()
    (received,) = sink.wait_for(1)
    assert body_of(received.content) == body_of(longest)
    assert [r.address for r in _recipients(gateway.settings)] == [COLLEAGUE]


def test_the_tail_of_an_overlong_line_never_ends_the_data_early(gateway: GatewayThread) -> None:
    """An overlong line cut where the reader's limit ran out, its tail ".<CRLF>":

    that tail is not the lone dot, so what follows stays message data and is
    never run as commands. The pause lets the gateway read (and cut) the long
    part before the rest arrives; without it the cut falls elsewhere and the
    test proves less, never wrongly.
    """
    raw = logged_in_raw(gateway)
    open_data(raw)
    raw.send(message("cut") + b"A" * 1_500 + b".")
    time.sleep(0.5)
    raw.send(b"\r\nVRFY <someone@praxis.example>\r\n.\r\n")
    assert raw.reply() == "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"
    raw.send(b"NOOP\r\n")
    assert raw.reply() == "250 2.0.0 OK"  # not VRFY's 252: it was data, not a command
    raw.close()
    assert _recipients(gateway.settings) == []


def test_a_text_line_of_1001_octets_is_refused(gateway: GatewayThread, sink: Sink) -> None:
    raw = logged_in_raw(gateway)
    reply = transaction(raw, [COLLEAGUE], message("1001") + b"C" * 999 + b"\r\n")
    raw.close()
    assert reply.startswith("500 5.5.2"), reply


# 6. AUTH brute force -------------------------------------------------------------------


def _auth_login(client: smtplib.SMTP, login: str, password: str) -> tuple[int, bytes]:
    code, _ = client.docmd("AUTH", f"LOGIN {b64(login)}")
    assert code == 334
    return client.docmd(b64(password))


def _implicit(running: GatewayThread, source: str = "127.0.0.1") -> smtplib.SMTP:
    client = smtplib.SMTP_SSL(
        "127.0.0.1",
        running.port(implicit=True),
        context=running.client_context(),
        timeout=30,
        source_address=(source, 0),
    )
    client.ehlo("client.test")
    return client


def _starttls(running: GatewayThread, source: str) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", running.port(), timeout=30, source_address=(source, 0))
    client.starttls(context=running.client_context())
    client.ehlo("client.test")
    return client


def test_auth_login_failures_on_both_ports_add_up_to_one_audited_lock_out(
    make_settings: Callable[..., Settings], start_gateway: StartGateway
) -> None:
    running = start_gateway(make_settings(auth_lockout=3))
    client = running.smtp()
    assert _auth_login(client, "drsmith", "guess-1") == (
        535,
        b"5.7.8 Authentication credentials invalid",
    )
    assert _auth_login(client, "dr.smith@praxis.example", "guess-2")[0] == 535
    client.close()
    other_port = _implicit(running)  # the implicit-TLS listener shares the count
    assert other_port.docmd("AUTH", f"PLAIN {plain_token('drsmith', 'guess-3')}")[0] == 535
    code, text = _auth_login(other_port, "drsmith", PASSWORD)
    assert (code, text[:6]) == (454, b"4.7.0 ")  # locked out, even with the right password
    other_port.close()
    again = running.smtp()
    assert _auth_login(again, "drsmith", PASSWORD)[0] == 454
    again.close()

    failed = audit(running.settings, "auth.failed")
    assert [e.username for e in failed] == ["drsmith", "dr.smith@praxis.example", "drsmith"]
    locked = audit(running.settings, "auth.locked_out")
    assert len(locked) == 2
    for entry in failed + locked:
        assert (entry.actor, entry.detail) == ("gateway", "client 127.0.0.1")
        assert "guess" not in repr(entry.model_dump())
        assert PASSWORD not in repr(entry.model_dump())


def test_lock_out_is_per_client_address_not_per_account(
    make_settings: Callable[..., Settings], start_gateway: StartGateway
) -> None:
    # An attacker guessing from one workstation must not lock the physician out elsewhere.
    running = start_gateway(make_settings(auth_lockout=2))
    attacker = _starttls(running, "127.0.0.1")
    for guess in ("guess-1", "guess-2"):
        assert attacker.docmd("AUTH", f"PLAIN {plain_token('drsmith', guess)}")[0] == 535
    assert attacker.docmd("AUTH", f"PLAIN {plain_token('drsmith', PASSWORD)}")[0] == 454
    attacker.close()
    physician = _starttls(running, "127.0.0.2")
    assert physician.docmd("AUTH", f"PLAIN {plain_token('drsmith', PASSWORD)}")[0] == 235
    physician.quit()
    assert {e.detail for e in audit(running.settings, "auth.failed")} == {"client 127.0.0.1"}


def test_every_535_is_an_audited_failure_that_counts_towards_the_lock_out(
    make_settings: Callable[..., Settings], start_gateway: StartGateway
) -> None:
    running = start_gateway(make_settings(auth_lockout=1))
    client = running.smtp()
    undecodable = plain_token("drsmith", b"\xff\xfe not utf-8")
    assert client.docmd("AUTH", f"PLAIN {undecodable}") == (
        535,
        b"5.7.8 Authentication credentials invalid",
    )
    assert len(audit(running.settings, "auth.failed")) == 1
    assert client.docmd("AUTH", f"PLAIN {plain_token('drsmith', PASSWORD)}")[0] == 454
    client.close()


# 7. Connection floods and idle clients ----------------------------------------------


def test_the_per_client_cap_holds_on_the_implicit_tls_port_and_spares_other_clients(
    make_settings: Callable[..., Settings], start_gateway: StartGateway
) -> None:
    running = start_gateway(make_settings(max_connections_per_client=2))
    port, context = running.port(implicit=True), running.client_context()
    held = [
        context.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="127.0.0.1"
        )
        for _ in range(2)
    ]
    try:
        for sock in held:
            assert sock.makefile("rb").readline().startswith(b"220 ")
        refused = greeting(port, context=context)
        assert refused == b"421 4.7.0 gateway.test Too many connections from your address\r\n"
        # Another workstation (another address) is not affected by this one's flood.
        assert greeting(port, source="127.0.0.2", context=context).startswith(b"220 ")
        with held_connections(running.port(), 2):  # the STARTTLS port counts on its own
            assert greeting(running.port()).startswith(b"421 4.7.0")
            assert greeting(running.port(), source="127.0.0.2").startswith(b"220 ")
    finally:
        for sock in held:
            sock.close()


def _abort_midway(port: int, how: str) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    reader = sock.makefile("rb")
    reader.readline()
    if how == "reset-after-greeting":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        sock.close()
        return
    sock.sendall(b"EHLO flood.test\r\n")
    while not reader.readline().startswith(b"250 "):
        pass
    sock.sendall(b"STARTTLS\r\n")
    reader.readline()
    if how == "garbage-handshake":
        sock.sendall(b"\x16\x03\x01\x00\x05hello" + b"\0" * 64)
    sock.close()


def test_a_flood_of_aborted_sessions_leaves_no_phantom_connection_slots(
    make_settings: Callable[..., Settings], start_gateway: StartGateway
) -> None:
    running = start_gateway(make_settings(max_connections_per_client=3))
    port = running.port()
    for _ in range(8):
        for how in ("reset-after-greeting", "close-before-handshake", "garbage-handshake"):
            _abort_midway(port, how)

    def three_fit() -> bool:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
        try:
            return all(s.makefile("rb").readline().startswith(b"220 ") for s in socks)
        finally:
            for sock in socks:
                sock.close()

    # Once the gateway has seen the aborts, all three slots are free again.
    deadline = time.monotonic() + 15
    while not three_fit():
        assert time.monotonic() < deadline, "connection slots were not given back"
        time.sleep(0.1)


def test_a_client_that_stalls_inside_data_gets_421_and_nothing_is_stored(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    sink: Sink,
    ca_file: Path,
) -> None:
    running = start_gateway(
        make_settings(
            smtp_idle_timeout="0.5s",
            delivery=f"smtp://127.0.0.1:{sink.port}",
            delivery_ca_file=ca_file,
        )
    )
    raw = logged_in_raw(running)
    open_data(raw)
    raw.send(message("half a message"))  # ... and then nothing, not even the final dot
    assert raw.reply() == "421 4.4.2 gateway.test Error: timeout exceeded"
    assert closed_within(raw.sock, 10)
    _nothing_accepted(running, sink)


def test_a_slow_but_steady_upload_is_not_cut_off_as_idle(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    sink: Sink,
    ca_file: Path,
) -> None:
    running = start_gateway(
        make_settings(
            smtp_idle_timeout="1s",
            delivery=f"smtp://127.0.0.1:{sink.port}",
            delivery_ca_file=ca_file,
        )
    )
    raw = logged_in_raw(running)
    open_data(raw)
    raw.send(message("slow upload"))
    try:
        for n in range(8):  # never silent for more than 0.3 s, 2.4 s in all
            time.sleep(0.3)
            raw.send(f"chunk {n}\r\n".encode())
        raw.send(b".\r\n")
        reply = raw.reply()
    except (OSError, ConnectionError) as exc:
        pytest.fail(f"the gateway hung up during the upload: {exc!r}")
    assert reply.startswith("250 2.0.0"), reply
    assert len(sink.wait_for(1)) == 1


def test_a_silent_connection_to_the_implicit_tls_port_is_dropped_like_an_idle_one(
    make_settings: Callable[..., Settings], start_gateway: StartGateway
) -> None:
    running = start_gateway(make_settings(smtp_idle_timeout="0.5s"))
    silent = socket.create_connection(("127.0.0.1", running.port(implicit=True)), timeout=30)
    try:
        assert closed_within(silent, 3), "still open long after the idle timeout"
    finally:
        silent.close()
