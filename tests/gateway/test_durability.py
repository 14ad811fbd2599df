"""Durability: 250 means on disk, sealed; a crash loses nothing; faults answer 4xx."""

from __future__ import annotations

import json
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session, SQLModel, select

from consent_registry.db import make_engine
from consent_registry.models import QueueMessage, QueueRecipient
from gateway.app import initialise
from gateway.crypto_at_rest import storage_key
from gateway.settings import Settings
from gateway.spool import INLINE_LIMIT, open_spool
from tests.conftest import DOMAIN, PASSWORD, create_user
from tests.runner import GatewayThread
from tests.sink import Sink
from tests.spools import store

SENDER = f"dr.smith@{DOMAIN}"
MARKER = "CONFIDENTIAL-DIAGNOSIS-7f3e9a"


def _message(marker: str = MARKER) -> bytes:
    return (
        f"From: {SENDER}\r\nTo: colleague@{DOMAIN}\r\nSubject: {marker} subject\r\n\r\n"
        f"The body says {marker}.\r\n"
    ).encode()


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _recipients(settings: Settings) -> list[QueueRecipient]:
    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as session:
            return list(session.exec(select(QueueRecipient)).all())
    finally:
        engine.dispose()


def _message_done(settings: Settings, message_id: str) -> bool:
    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as session:
            message = session.get(QueueMessage, message_id)
            return message is not None and message.done_at is not None
    finally:
        engine.dispose()


def _stored(settings: Settings) -> list[str]:
    """The ids in the spool, wherever it is (files with SQLite, rows with PostgreSQL)."""
    engine = make_engine(settings.database_url)
    try:
        return open_spool(settings, engine, storage_key(settings)[0]).stored_ids()
    finally:
        engine.dispose()


def _plaintext_hits(settings: Settings, marker: str) -> list[str]:
    """Every file under data_dir and every row of every table that holds the marker."""
    needle = marker.encode()
    hits = [
        str(p) for p in settings.data_dir.rglob("*") if p.is_file() and needle in p.read_bytes()
    ]
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            for table in SQLModel.metadata.sorted_tables:
                for row in conn.execute(table.select()):
                    if marker in repr(tuple(row)):
                        hits.append(f"table {table.name}")
    finally:
        engine.dispose()
    return hits


class ServeProcess:
    """``cgw serve`` as a real process, the way an admin runs it."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        cgw = Path(sys.executable).with_name("cgw")
        self.process = subprocess.Popen(
            [str(cgw), "serve", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        self.port = 0
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if "submission (STARTTLS)" in line and "listening on" in line:
                self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
            if line.startswith("Stop with"):
                break
            if line.startswith("{") and json.loads(line).get("event") == "started":
                listening = json.loads(line)["listening"]
                (address,) = [a for a, label in listening.items() if "STARTTLS" in label]
                self.port = int(address.rsplit(":", 1)[1])
                break
        assert self.port, "".join(self.output)
        # Keep reading: a busy gateway would block on a full pipe.
        self._reader = threading.Thread(target=self._read_rest, daemon=True)
        self._reader.start()

    def _read_rest(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._reader.join(10)

    def stop(self) -> int:
        """SIGTERM, as systemd or Docker stop it; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
        self._reader.join(10)
        return self.process.returncode

    def wait(self, timeout: float) -> int:
        """The exit status, once the process ended by itself (and all its output is read)."""
        status = self.process.wait(timeout)
        self._reader.join(10)
        return status


def _send(port: int, cafile: Path, content: bytes) -> str:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.starttls(context=ssl.create_default_context(cafile=str(cafile)))
    client.login("drsmith", PASSWORD)
    client.mail(SENDER)
    client.rcpt(f"colleague@{DOMAIN}")
    code, reply = client.data(content)
    client.quit()
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def test_sigkill_after_250_then_restart_delivers_exactly_once(
    make_settings: Callable[..., Settings],
    serve_env: Callable[..., dict[str, str]],
    sink_tls: ssl.SSLContext,
) -> None:
    settings = make_settings()
    initialise(settings)
    create_user(settings, "drsmith", [SENDER])
    stalled = Sink(sink_tls, stall=True).start()  # takes the connection, never greets
    first = ServeProcess(serve_env(settings, f"smtp://127.0.0.1:{stalled.port}"))
    try:
        message_id = _send(first.port, settings.tls_dir / "dev-cert.pem", _message())
        _wait(lambda: stalled.connections > 0, "the delivery attempt to start")
        first.kill()
    finally:
        first.stop()
        stalled.stop()
    assert _stored(settings) == [message_id]
    assert _plaintext_hits(settings, MARKER) == []

    sink = Sink(sink_tls).start()
    second = ServeProcess(serve_env(settings, f"smtp://127.0.0.1:{sink.port}"))
    try:
        (received,) = sink.wait_for(1)
        _wait(lambda: _message_done(settings, message_id), "the queue to record the delivery")
        assert MARKER.encode() in received.content
        assert len(sink.received) == 1
        # The file goes right after the commit that completes the message.
        _wait(lambda: _stored(settings) == [], "the spooled copy to go")
        assert "Configure your mail client" in "".join(second.output)
        assert second.stop() == 0
    finally:
        second.stop()
        sink.stop()


def test_a_delivered_message_left_in_the_spool_goes_at_the_next_start(
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    sink: Sink,
    ca_file: Path,
) -> None:
    settings = make_settings(delivery=f"smtp://127.0.0.1:{sink.port}", delivery_ca_file=ca_file)
    first = start_gateway(settings)
    client = first.logged_in("drsmith", PASSWORD)
    client.sendmail(SENDER, [f"colleague@{DOMAIN}"], _message())
    client.quit()
    sink.wait_for(1)
    (delivered,) = {r.message_id for r in _recipients(settings)}
    _wait(lambda: _message_done(settings, delivered), "the delivery to be recorded")
    first.stop()
    # A kill between the commit that finished the message and the removal of
    # its copy leaves the copy behind; a young one nobody acknowledged stays
    # (its intake may still be committing), as before.
    engine = make_engine(settings.database_url)
    try:
        spool = open_spool(settings, engine, storage_key(settings)[0])
        store(spool, delivered, b"left by a kill")
        store(spool, "never-acknowledged", b"an intake still under way")
    finally:
        engine.dispose()
    assert sorted(_stored(settings)) == sorted([delivered, "never-acknowledged"])
    GatewayThread(settings).start().stop()
    assert _stored(settings) == ["never-acknowledged"]
    assert len(sink.received) == 1


def test_no_plaintext_anywhere_while_a_message_waits_in_the_spool(
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    ca_file: Path,
) -> None:
    # The next hop is down: the message is deferred and stays in the spool.
    settings = make_settings(delivery="smtp://127.0.0.1:9", delivery_ca_file=ca_file)
    running = start_gateway(settings)
    client = running.logged_in("drsmith", PASSWORD)
    client.sendmail(SENDER, [f"colleague@{DOMAIN}"], _message())
    client.quit()
    _wait(lambda: any(r.state == "deferred" for r in _recipients(settings)), "a deferral")
    assert len(_stored(settings)) == 1
    assert _plaintext_hits(settings, MARKER) == []


def test_spool_fault_answers_451_and_stores_nothing(
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    sink: Sink,
    ca_file: Path,
) -> None:
    settings = make_settings(
        delivery=f"smtp://127.0.0.1:{sink.port}", delivery_ca_file=ca_file, spool="files"
    )
    running = start_gateway(settings)
    tmp = settings.spool_dir / "tmp"
    tmp.rmdir()
    tmp.write_bytes(b"")  # the spool's work directory is now a file: every write fails
    client = running.logged_in("drsmith", PASSWORD)
    # Larger than the spool keeps in memory: it must go to a file, and cannot.
    too_large = _message() + b"".join(b"line %06d\r\n" % n for n in range(INLINE_LIMIT // 8))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail(SENDER, [f"colleague@{DOMAIN}"], too_large)
    assert refused.value.smtp_code == 451
    assert refused.value.smtp_error.startswith(b"4.3.0")
    assert _stored(settings) == []
    assert _recipients(settings) == []
    tmp.unlink()
    tmp.mkdir()
    client.sendmail(SENDER, [f"colleague@{DOMAIN}"], _message())  # healed: accepted again
    client.quit()
    assert len(sink.wait_for(1)) == 1


def test_database_fault_answers_451_and_leaves_no_spool_file(
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    ca_file: Path,
) -> None:
    settings = make_settings(delivery="smtp://127.0.0.1:9", delivery_ca_file=ca_file)
    running = start_gateway(settings)
    client = running.logged_in("drsmith", PASSWORD)
    engine = make_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE queue_recipient RENAME TO queue_recipient_away"))
    try:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(SENDER, [f"colleague@{DOMAIN}"], _message())
        assert refused.value.smtp_code == 451
        assert _stored(settings) == []
        assert list((settings.spool_dir / "tmp").iterdir()) == []
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE queue_recipient_away RENAME TO queue_recipient"))
        engine.dispose()
    client.quit()
