"""Faults while the gateway runs: the database or the disk away, the next hop down or lying.

Each test puts the fault in place *while the gateway is running*, at the
moment that matters, and checks the reply the client hears and what was
(not) stored or sent: a fault while storing is ``451 4.3.0`` (``452 4.3.1``
when the disk is full) with nothing half-stored; a fault on the way out is a
deferral, retried, and never a delivery in the clear.

Already covered in ``tests/gateway`` and not repeated: a renamed queue table
(451) and ``spool/tmp`` replaced by a file (451) in test_durability; 4xx
replies retried, and a certificate for another name or expired (deferred,
``last_error``) in test_delivery. Here: the database really unreachable, a
read-only and a full spool file system, the next hop down for a while, and
TLS failures against a next hop that would accept plaintext.
"""

from __future__ import annotations

import shutil
import smtplib
import sqlite3
import ssl
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from consent_registry import db
from consent_registry.models import QueueRecipient
from gateway.settings import Settings
from gateway.spool import INLINE_LIMIT
from tests.conftest import PASSWORD, POSTGRES_URL
from tests.gateway.test_durability import _recipients, _stored, _wait
from tests.hostile.helpers import COLLEAGUE, SENDER, audit, message
from tests.pki import TestCA
from tests.runner import GatewayThread, free_port
from tests.sink import Sink, SinkHandler

StartGateway = Callable[[Settings], GatewayThread]


def _leftovers(settings: Settings) -> list[str]:
    """Anything in the spool (files or rows) or in its work directory."""
    tmp = settings.spool_dir / "tmp"
    work = [p.name for p in tmp.iterdir()] if tmp.is_dir() else []
    return _stored(settings) + work


def _accepted_nothing(settings: Settings) -> None:
    assert _recipients(settings) == []
    assert _leftovers(settings) == []
    assert audit(settings, "message.accepted") == []


def _delivered_all(settings: Settings) -> None:
    _wait(
        lambda: (
            all(r.state == "delivered" for r in _recipients(settings)) and _stored(settings) == []
        ),
        "every recipient delivered and the spool empty",
    )


# 8. The database unreachable at DATA ----------------------------------------------


@pytest.fixture
def short_sqlite_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite waits 30 s for a lock (consent_registry.db); a locked database should
    fail this test's DATA in half a second, not thirty. Only the wait changes."""
    tune = db._tune_sqlite

    def shorter(dbapi_connection: sqlite3.Connection, record: Any) -> None:
        tune(dbapi_connection, record)
        dbapi_connection.execute("PRAGMA busy_timeout=500")

    monkeypatch.setattr(db, "_tune_sqlite", shorter)


@contextmanager
def database_unreachable(url: str) -> Iterator[None]:
    """PostgreSQL: the gateway's connections are killed and no new one is allowed.
    SQLite (no server to lose): another process holds the write lock throughout."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        holder = sqlite3.connect(str(parsed.database), isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    name = parsed.database
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
        yield
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()


@pytest.mark.usefixtures("short_sqlite_busy_timeout")
def test_database_unreachable_at_data_answers_451_and_accepts_nothing(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    sink: Sink,
    ca_file: Path,
) -> None:
    settings = make_settings(delivery=f"smtp://127.0.0.1:{sink.port}", delivery_ca_file=ca_file)
    running = start_gateway(settings)
    client = running.logged_in("drsmith", PASSWORD)
    client.mail(SENDER)
    assert client.rcpt(COLLEAGUE)[0] == 250  # the registry answered; it goes away now
    with database_unreachable(settings.database_url):
        code, reply = client.data(message("during-the-outage"))
    assert (code, reply) == (
        451,
        b"4.3.0 Temporary failure in the gateway; please try again later",
    )
    client.quit()
    _accepted_nothing(settings)
    # The database is back: so is the gateway (its pool reconnects).
    client = running.logged_in("drsmith", PASSWORD)
    assert client.sendmail(SENDER, [COLLEAGUE], message("after-the-outage")) == {}
    client.quit()
    (received,) = sink.wait_for(1)
    assert b"after-the-outage" in received.content
    _delivered_all(settings)
    assert len(sink.received) == 1  # the refused message never went anywhere


@pytest.fixture
def relaying(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    sink: Sink,
    ca_file: Path,
) -> GatewayThread:
    """A gateway with a file spool, relaying to the sink."""
    return start_gateway(
        make_settings(
            delivery=f"smtp://127.0.0.1:{sink.port}", delivery_ca_file=ca_file, spool="files"
        )
    )


def test_after_a_451_at_the_end_of_data_the_transaction_is_over(
    relaying: GatewayThread,
) -> None:
    running, settings = relaying, relaying.settings
    engine = db.make_engine(settings.database_url)
    client = running.logged_in("drsmith", PASSWORD)
    try:
        client.mail(SENDER)
        client.rcpt(COLLEAGUE)
        with engine.begin() as conn:  # the queue's table is gone: the commit after DATA fails
            conn.execute(text("ALTER TABLE queue_recipient RENAME TO queue_recipient_away"))
        assert client.data(message("faulted"))[0] == 451
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE queue_recipient_away RENAME TO queue_recipient"))
        # RFC 5321 4.1.1.4: the end of data ends the transaction, whatever the reply.
        assert client.docmd("DATA")[0] == 503
        assert client.mail(SENDER)[0] == 250
    finally:
        client.close()
        engine.dispose()


def _larger_than_memory(marker: str) -> bytes:
    """A message the spool does not keep in memory (over ``INLINE_LIMIT``): it needs a file."""
    return message(marker) + b"".join(b"line %06d\r\n" % n for n in range(INLINE_LIMIT // 8))


def test_without_a_spool_file_small_mail_goes_inline_and_large_mail_gets_451(
    relaying: GatewayThread, sink: Sink
) -> None:
    running, settings = relaying, relaying.settings
    tmp = settings.spool_dir / "tmp"
    tmp.rmdir()
    tmp.write_bytes(b"")  # as in test_durability: no spool file can be created
    client = running.logged_in("drsmith", PASSWORD)
    try:
        # A small message needs no file: it is stored with its queue rows.
        assert client.sendmail(SENDER, [COLLEAGUE], message("small")) == {}
        client.mail(SENDER)
        client.rcpt(COLLEAGUE)
        code, reply = client.data(_larger_than_memory("large"))
        assert (code, reply[:6]) == (451, b"4.3.0 ")
        assert client.docmd("DATA")[0] == 503  # the transaction is over
        assert client.mail(SENDER)[0] == 250
    finally:
        client.close()
        tmp.unlink()
        tmp.mkdir()
    (received,) = sink.wait_for(1)
    assert b"small" in received.content
    _delivered_all(settings)


# 9. The spool's file system read-only, or full -----------------------------------


@pytest.fixture
def mount() -> Iterator[Callable[..., None]]:
    """``mount(*args)`` runs mount(8); every target is unmounted at teardown.

    Skips (saying why) when this environment may not mount: that needs root
    with CAP_SYS_ADMIN, as in the CI sandbox. Ask for this fixture before
    ``start_gateway``, so that the gateway stops before the unmount.
    """
    mounted: list[str] = []

    def run(*args: str) -> None:
        if shutil.which("mount") is None:
            pytest.skip("no mount(8) here: cannot build a read-only or full file system")
        result = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
        if result.returncode != 0 and not mounted:
            pytest.skip(f"mounting is not permitted here: {result.stderr.strip()}")
        assert result.returncode == 0, result.stderr
        if "remount" not in ",".join(args):
            mounted.append(args[-1])

    yield run
    for target in reversed(mounted):
        if subprocess.run(["umount", target], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", target], capture_output=True, timeout=30)


def test_read_only_spool_answers_451_and_stores_nothing(
    mount: Callable[..., None], relaying: GatewayThread, sink: Sink
) -> None:
    running, settings = relaying, relaying.settings
    spool = str(settings.spool_dir)
    mount("--bind", spool, spool)
    mount("-o", "remount,bind,ro", spool)  # EROFS: root cannot write either
    client = running.logged_in("drsmith", PASSWORD)
    client.mail(SENDER)
    client.rcpt(COLLEAGUE)
    # Too large to keep in memory: it needs a spool file, which cannot be made.
    code, reply = client.data(_larger_than_memory("read-only"))
    assert (code, reply[:6]) == (451, b"4.3.0 ")
    client.quit()
    _accepted_nothing(settings)
    mount("-o", "remount,bind,rw", spool)
    client = running.logged_in("drsmith", PASSWORD)
    assert client.sendmail(SENDER, [COLLEAGUE], message("writable-again")) == {}
    client.quit()
    (received,) = sink.wait_for(1)
    assert b"writable-again" in received.content
    _delivered_all(settings)


def test_full_spool_answers_452_leaves_no_partial_file_and_recovers(
    mount: Callable[..., None],
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    sink: Sink,
    ca_file: Path,
) -> None:
    settings = make_settings(
        delivery=f"smtp://127.0.0.1:{sink.port}", delivery_ca_file=ca_file, spool="files"
    )
    settings.spool_dir.mkdir(parents=True)
    mount("-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(settings.spool_dir))
    running = start_gateway(settings)
    client = running.logged_in("drsmith", PASSWORD)
    big = message("too-big-for-the-disk") + b"0123456789abcdef" * 60 + b"\r\n"
    big += big.split(b"\r\n\r\n", 1)[1] * 200  # about 200 kB: more than the disk holds
    client.mail(SENDER)
    client.rcpt(COLLEAGUE)
    code, reply = client.data(big)
    assert (code, reply) == (452, b"4.3.1 Insufficient system storage; please try again later")
    _accepted_nothing(settings)  # the partly written file is gone too
    # The failed write gave its space back: a small message fits, and goes out.
    assert client.sendmail(SENDER, [COLLEAGUE], message("small-enough")) == {}
    client.quit()
    (received,) = sink.wait_for(1)
    assert b"small-enough" in received.content
    _delivered_all(settings)


# 10. The next hop down for a while ---------------------------------------------------


def _deferred_after(running: GatewayThread, marker: str, attempts: int) -> QueueRecipient:
    """Send one message to COLLEAGUE; its row once ``attempts`` deliveries failed (deferred)."""
    client = running.logged_in("drsmith", PASSWORD)
    assert client.sendmail(SENDER, [COLLEAGUE], message(marker)) == {}
    client.quit()
    settings = running.settings
    _wait(lambda: _recipients(settings)[0].attempts >= attempts, f"{attempts} failed attempts")
    (row,) = _recipients(settings)
    assert row.state == "deferred"
    return row


def test_next_hop_down_for_a_while_then_back_gets_the_message_exactly_once(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    ca_file: Path,
    sink_tls: ssl.SSLContext,
) -> None:
    port = free_port()  # nothing listens there: every attempt is refused
    settings = make_settings(
        delivery=f"smtp://127.0.0.1:{port}",
        delivery_ca_file=ca_file,
        retry_backoff="0.1s",
        retry_backoff_max="0.5s",
    )
    row = _deferred_after(start_gateway(settings), "waits-for-the-hop", attempts=4)
    assert "Connect" in (row.last_error or ""), row.last_error
    deferred = audit(settings, "message.deferred")[:4]
    assert {(e.recipient, e.detail) for e in deferred} == {(COLLEAGUE, row.last_error)}
    # Backing off, not hammering: 0.1 + 0.2 + 0.4 s (each -20 % at worst) between them.
    assert (deferred[3].at - deferred[0].at).total_seconds() >= 0.5

    hop = Sink(sink_tls).start_on(port)  # the next hop is back, on the same port
    try:
        (received,) = hop.wait_for(1)
        assert b"waits-for-the-hop" in received.content
        assert received.tls
        _delivered_all(settings)  # nothing left that could be sent again
        assert len(hop.received) == 1
        assert [e.recipient for e in audit(settings, "message.delivered")] == [COLLEAGUE]
    finally:
        hop.stop()


# 11. The next hop's certificate expired, or for another name ------------------------


@dataclass
class _RecordingHandler(SinkHandler):
    """Records every MAIL command, and whether it came over TLS."""

    mails: list[tuple[str, bool]] = field(default_factory=list)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.mails.append((address, session.ssl is not None))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"


class PlaintextTolerantSink(Sink):
    """Offers STARTTLS but, unlike the test sink, would take mail in the clear too:
    a gateway that fell back to plaintext after a TLS failure would show here."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        super().__init__(tls)
        self.handler = _RecordingHandler()

    def _smtp(self) -> SMTP:
        server = super()._smtp()
        server.require_starttls = False
        return server


@pytest.mark.parametrize(
    ("hosts", "expired", "why"),
    [
        (["127.0.0.1"], True, "certificate has expired"),
        (["mail.elsewhere.example"], False, "IP address mismatch"),
    ],
    ids=["expired", "wrong-name"],
)
def test_next_hop_whose_certificate_fails_is_deferred_audited_and_never_sent_in_clear(
    make_settings: Callable[..., Settings],
    start_gateway: StartGateway,
    ca_file: Path,
    test_ca: TestCA,
    tmp_path: Path,
    hosts: list[str],
    expired: bool,
    why: str,
) -> None:
    cert, key = test_ca.server(hosts, expired=expired).write(tmp_path / "hop", "hop")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    hop = PlaintextTolerantSink(context).start()
    try:
        settings = make_settings(
            delivery=f"smtp://127.0.0.1:{hop.port}",
            delivery_ca_file=ca_file,
            retry_backoff="0.2s",
            retry_backoff_max="0.2s",
        )
        row = _deferred_after(start_gateway(settings), "not-over-a-bad-channel", attempts=2)
        assert "TLS certificate of the next hop did not verify" in (row.last_error or "")
        assert why in (row.last_error or ""), row.last_error
        deferred = audit(settings, "message.deferred")
        assert len(deferred) >= 2
        assert all(e.recipient == COLLEAGUE and why in (e.detail or "") for e in deferred)
        assert hop.connections >= 2  # it did try, twice ...
        handler = hop.handler
        assert isinstance(handler, _RecordingHandler)
        assert handler.mails == []  # ... and never got as far as MAIL, in the clear or not
        assert hop.received == []
        # The hop would have taken a plaintext transaction: the check above can fail.
        with smtplib.SMTP("127.0.0.1", hop.port, timeout=30) as plain:
            plain.sendmail("probe@example.org", ["probe@example.org"], b"Subject: probe\r\n\r\n")
        assert handler.mails == [("probe@example.org", False)]
    finally:
        hop.stop()
