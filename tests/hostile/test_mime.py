"""Malformed and pathological MIME: answered in bounded time, delivered untouched.

The gateway reads only the header block and never parses the body (README:
"The body is never changed"), so each of these messages is expected to be
accepted with ``250 2.0.0`` and to arrive at the next hop byte for byte; one
addressed to a patient with a certificate is expected to leave S/MIME-encrypted
and to open to the very same bytes. Each test measures how long the gateway
took (``-s`` prints it); the timeout only guards against a hang, it is not a
speed requirement. After each one, the gateway must still serve the next client
and its delivery worker must still deliver.

The database plays no part in MIME handling, so these run on SQLite.
"""

from __future__ import annotations

import base64
import email
import email.policy
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import pkcs7

from consent_registry import certificates
from gateway.settings import Settings
from tests.conftest import PASSWORD
from tests.gateway.conftest import practice_gateway  # noqa: F401 (a fixture, used by name)
from tests.gateway.test_durability import _recipients, _stored, _wait
from tests.hostile.helpers import COLLEAGUE, SENDER, body_of, message
from tests.practice import Practice
from tests.practice import now as _now
from tests.runner import GatewayThread
from tests.sink import Sink
from tests.smime_pki import SmimeCA

HANG_GUARD = 90  # seconds; generous, on a loaded two-core machine


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: nothing here depends on the database engine."""
    return f"sqlite:///{tmp_path / 'data' / 'cgw.db'}"


def _headers(to: str, content_type: str, extra: bytes = b"") -> bytes:
    return (
        f"From: Dr Smith <{SENDER}>\r\nTo: <{to}>\r\nSubject: pathological MIME\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: {content_type}\r\n"
    ).encode() + extra


def nested(depth: int, to: str = COLLEAGUE) -> bytes:
    """``depth`` multipart levels, each the only part of the one above it."""
    opening = b"".join(
        f'--n{level}\r\nContent-Type: multipart/mixed; boundary="n{level + 1}"\r\n\r\n'.encode()
        for level in range(depth - 1)
    )
    innermost = f"--n{depth - 1}\r\nContent-Type: text/plain\r\n\r\nthe deepest part\r\n".encode()
    closing = b"".join(f"--n{level}--\r\n".encode() for level in reversed(range(depth)))
    return _headers(to, 'multipart/mixed; boundary="n0"') + b"\r\n" + opening + innermost + closing


def unclosed_boundary() -> bytes:
    parts = b"".join(
        f"--open\r\nContent-Type: text/plain\r\n\r\npart {n}\r\n".encode() for n in range(20)
    )
    return _headers(COLLEAGUE, 'multipart/mixed; boundary="open"') + b"\r\n" + parts


def tiny_parts(count: int) -> bytes:
    return (
        _headers(COLLEAGUE, "multipart/mixed; boundary=p")
        + b"\r\n"
        + b"--p\r\n\r\nx\r\n" * count
        + b"--p--\r\n"
    )


def folded_header(lines: int, width: int) -> bytes:
    """A header field folded over ``lines`` continuation lines, each under 1,000 octets."""
    folds = b"".join(b" %06d " % n + b"f" * width + b"\r\n" for n in range(lines))
    return _headers(COLLEAGUE, "text/plain", b"X-Folded: start\r\n" + folds) + b"\r\nbody\r\n"


def invalid_base64() -> bytes:
    return (
        _headers(COLLEAGUE, 'multipart/mixed; boundary="b"')
        + b"\r\n--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b"!!!! this is not base64 at all ====\r\nQUJD\r\nQUJDRA=\r\n====\r\n=QUJD\r\n"
        + b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b"A" * 997
        + b"\r\n--b--\r\n"
    )


CASES = {
    "5000-nested-multiparts": lambda: nested(5_000),
    "boundary-never-closes": unclosed_boundary,
    "50000-tiny-parts": lambda: tiny_parts(50_000),
    "3000-folded-header-lines": lambda: folded_header(3_000, 300),
    "invalid-base64": invalid_base64,
}


def _send(running: GatewayThread, recipients: list[str], content: bytes) -> tuple[int, bytes]:
    client = running.logged_in("drsmith", PASSWORD)
    try:
        client.mail(SENDER)
        for rcpt in recipients:
            code, reply = client.rcpt(rcpt)
            assert code == 250, reply
        return client.data(content)
    finally:
        client.quit()


def _next_client_is_served(running: GatewayThread, sink: Sink, count: int) -> None:
    """A fresh session is answered, and its message delivered (the worker is alive)."""
    code, reply = _send(running, [COLLEAGUE], message("the next client"))
    assert code == 250, reply
    assert b"the next client" in sink.wait_for(count)[-1].content


@pytest.mark.timeout(HANG_GUARD)
@pytest.mark.parametrize("build", list(CASES.values()), ids=list(CASES))
def test_pathological_mime_is_accepted_and_delivered_unchanged(
    gateway: GatewayThread, sink: Sink, build: Callable[[], bytes]
) -> None:
    content = build()
    started = time.monotonic()
    code, reply = _send(gateway, [COLLEAGUE], content)
    answered = time.monotonic() - started
    assert (code, reply[:20]) == (250, b"2.0.0 Ok: queued as "), reply
    (received,) = sink.wait_for(1, timeout=HANG_GUARD)
    delivered = time.monotonic() - started
    print(f"\n{len(content):,} octets: 250 after {answered:.2f} s, delivered at {delivered:.2f} s")
    assert received.rcpt_tos == (COLLEAGUE,)
    assert body_of(received.content) == body_of(content)
    if b"X-Folded:" in content:  # every continuation line arrives, in order
        start = content.index(b"X-Folded:")
        field = content[start : content.index(b"\r\n\r\n")]
        assert field in received.content
    _next_client_is_served(gateway, sink, 2)
    _wait(lambda: _stored(gateway.settings) == [], "the spool to empty", timeout=HANG_GUARD)


@pytest.mark.timeout(HANG_GUARD)
def test_deeply_nested_mime_to_a_patient_leaves_encrypted_and_opens_unchanged(
    practice_gateway: Callable[..., tuple[GatewayThread, Practice]],  # noqa: F811
    sink: Sink,
) -> None:
    running, practice = practice_gateway()
    issued = SmimeCA().issue("anna@example.org")
    with practice.session() as session:
        certificates.import_certificate(session, "anna@example.org", issued.pem(), "test", _now())
    content = nested(5_000, to="anna@example.org")
    started = time.monotonic()
    code, reply = _send(running, ["anna@example.org"], content)
    assert code == 250, reply
    (received,) = sink.wait_for(1, timeout=HANG_GUARD)
    took = time.monotonic() - started
    print(f"\n{len(content):,} octets encrypted and delivered in {took:.2f} s")
    assert received.rcpt_tos == ("anna@example.org",)
    outer = email.message_from_bytes(received.content, policy=email.policy.default)
    assert outer.get_content_type() == "application/pkcs7-mime"
    assert b"the deepest part" not in received.content
    der = base64.b64decode(body_of(received.content))
    inner = pkcs7.pkcs7_decrypt_der(der, issued.cert, issued.key, [])  # type: ignore[arg-type]
    assert body_of(inner) == body_of(content)
    _wait(
        lambda: [r.state for r in _recipients(running.settings)] == ["delivered"],
        "the delivery to be recorded",
    )
    _next_client_is_served(running, sink, 2)


def test_a_message_over_the_size_limit_is_refused_cleanly_whatever_its_structure(
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    sink: Sink,
    ca_file: Path,
) -> None:
    running = start_gateway(
        make_settings(
            max_message_size=100_000,
            delivery=f"smtp://127.0.0.1:{sink.port}",
            delivery_ca_file=ca_file,
        )
    )
    code, reply = _send(running, [COLLEAGUE], tiny_parts(50_000))  # 500 kB of parts
    assert (code, reply) == (552, b"5.3.4 Message too big for system")
    assert _recipients(running.settings) == []
    assert _stored(running.settings) == []
    _next_client_is_served(running, sink, 1)


def test_a_header_block_over_one_mib_is_refused_and_nothing_is_kept(
    gateway: GatewayThread, sink: Sink
) -> None:
    """The header block is the one part held in memory while DATA streams to the spool."""
    content = folded_header(4_000, 300)  # 1.2 MB of one folded field
    code, reply = _send(gateway, [COLLEAGUE], content)
    assert (code, reply) == (552, b"5.3.4 Message header too big for system (the limit is 1 MiB)")
    assert _recipients(gateway.settings) == []
    assert _stored(gateway.settings) == []
    assert list((gateway.settings.spool_dir / "tmp").iterdir()) == []
    _next_client_is_served(gateway, sink, 1)
