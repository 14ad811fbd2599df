"""SIGTERM, as Docker or systemd send it: stop accepting, let a transaction in
progress finish (or tell it 421 after the grace period), lose nothing."""

from __future__ import annotations

import signal
import smtplib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlmodel import Session, select

from consent_registry.db import make_engine
from consent_registry.models import QueueMessage
from gateway.app import initialise
from gateway.settings import Settings
from tests.conftest import DOMAIN, PASSWORD, create_user
from tests.gateway.test_durability import SENDER, ServeProcess, _message

Env = Callable[..., dict[str, str]]


def _logged_in(port: int, cafile: Path) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.starttls(context=ssl.create_default_context(cafile=str(cafile)))
    client.login("drsmith", PASSWORD)
    return client


def _in_data(port: int, cafile: Path) -> smtplib.SMTP:
    """A client that has sent DATA and got 354, the message not yet sent."""
    client = _logged_in(port, cafile)
    client.mail(SENDER)
    client.rcpt(f"colleague@{DOMAIN}")
    client.putcmd("data")
    code, _ = client.getreply()
    assert code == 354
    return client


def _start(
    make_settings: Callable[..., Settings], serve_env: Env, **extra: str
) -> tuple[Settings, ServeProcess]:
    settings = make_settings()
    initialise(settings)
    create_user(settings, "drsmith", [SENDER])
    # A next hop that never answers: accepted mail stays queued, for the check below.
    env = serve_env(settings, "smtp://127.0.0.1:9?tls=implicit")
    env.update(extra)
    return settings, ServeProcess(env)


def _queued_ids(settings: Settings) -> list[str]:
    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as session:
            return list(session.exec(select(QueueMessage.id)).all())
    finally:
        engine.dispose()


def test_sigterm_lets_the_transaction_in_progress_finish(
    make_settings: Callable[..., Settings], serve_env: Env
) -> None:
    settings, serve = _start(make_settings, serve_env)
    cafile = settings.tls_dir / "dev-cert.pem"
    busy = _in_data(serve.port, cafile)
    idle = _logged_in(serve.port, cafile)  # between transactions
    serve.process.send_signal(signal.SIGTERM)

    code, reply = idle.getreply()  # told at once, without having asked
    assert (code, reply.split(b" ")[0]) == (421, b"4.3.2")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", serve.port), timeout=5)

    busy.send(_message().replace(b"\r\n.", b"\r\n..") + b".\r\n")
    code, reply = busy.getreply()
    assert code == 250, reply  # the transaction in progress completes
    queue_id = reply.decode().rsplit(" ", 1)[1]
    with pytest.raises((smtplib.SMTPServerDisconnected, smtplib.SMTPResponseException)):
        # the next transaction is not started: 421, then the connection closes
        busy.mail(SENDER)
        busy.rcpt(f"colleague@{DOMAIN}")
    assert serve.wait(30) == 0
    assert _queued_ids(settings) == [queue_id]  # accepted, so kept for the next start


def test_a_transaction_that_does_not_finish_in_the_grace_period_gets_421(
    make_settings: Callable[..., Settings], serve_env: Env
) -> None:
    settings, serve = _start(make_settings, serve_env, CGW_SHUTDOWN_GRACE="1s")
    stalled = _in_data(serve.port, settings.tls_dir / "dev-cert.pem")
    stalled.send(b"From: half a message\r\n")
    serve.process.send_signal(signal.SIGTERM)
    code, reply = stalled.getreply()
    assert (code, reply.split(b" ")[0]) == (421, b"4.3.2")
    assert serve.wait(30) == 0
    assert _queued_ids(settings) == []  # never acknowledged, so nothing half-stored
    assert "1 SMTP sessions were cut off" in "".join(serve.output)
