"""Shared by the hostile-input and fault suites: raw sessions, and what got through.

The gateway tests' own helpers (``_wait``, ``_recipients``, ``_stored`` in
``tests.gateway.test_durability``) are reused; this adds what hostile tests
need on top: replies read as raw bytes, a whole transaction on a raw session,
and the audit entries of one action.
"""

from __future__ import annotations

import base64
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlmodel import Session, select

from consent_registry.db import make_engine
from consent_registry.models import AuditEvent
from gateway.settings import Settings
from tests.conftest import DOMAIN, PASSWORD
from tests.runner import GatewayThread, RawClient

SENDER = f"dr.smith@{DOMAIN}"
COLLEAGUE = f"colleague@{DOMAIN}"


def message(marker: str, to: str = COLLEAGUE) -> bytes:
    return (
        f"From: Dr Smith <{SENDER}>\r\nTo: <{to}>\r\nSubject: {marker}\r\n\r\nbody {marker}\r\n"
    ).encode()


def body_of(content: bytes) -> bytes:
    """What follows the header block (the gateway never changes it)."""
    return content.split(b"\r\n\r\n", 1)[1]


def plain_token(login: str, password: str | bytes) -> str:
    secret = password if isinstance(password, bytes) else password.encode()
    return base64.b64encode(b"\0" + login.encode() + b"\0" + secret).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def logged_in_raw(gateway: GatewayThread) -> RawClient:
    raw = gateway.raw()
    raw.login("drsmith", PASSWORD)
    return raw


def open_data(raw: RawClient, recipient: str = COLLEAGUE) -> None:
    """MAIL, RCPT and DATA in one write (PIPELINING), up to the 354."""
    raw.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode())
    raw.expect("250 2.1.0")
    raw.expect("250 2.1.5")
    raw.expect("354")


def transaction(raw: RawClient, recipients: list[str], content: bytes) -> str:
    """MAIL, RCPT, DATA on a logged-in raw session; returns the reply to the data."""
    raw.send(f"MAIL FROM:<{SENDER}>\r\n".encode())
    raw.expect("250 2.1.0")
    for rcpt in recipients:
        raw.send(f"RCPT TO:<{rcpt}>\r\n".encode())
        raw.expect("250 2.1.5")
    raw.send(b"DATA\r\n")
    raw.expect("354")
    raw.send(content.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    return raw.reply()


def audit(settings: Settings, action: str) -> list[AuditEvent]:
    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as session:
            query = select(AuditEvent).where(AuditEvent.action == action)
            return list(session.exec(query.order_by(AuditEvent.seq)).all())
    finally:
        engine.dispose()


def greeting(port: int, source: str = "127.0.0.1", context: ssl.SSLContext | None = None) -> bytes:
    """The first line a new connection hears (over implicit TLS with ``context``)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    try:
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        return sock.makefile("rb").readline()
    finally:
        sock.close()


@contextmanager
def held_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` plain connections that have been greeted, held open."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            held.append(sock)
            assert sock.makefile("rb").readline().startswith(b"220 ")
        yield held
    finally:
        for sock in held:
            sock.close()


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes (or resets) ``sock`` within ``seconds``; data is read past."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if sock.recv(65536) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False
