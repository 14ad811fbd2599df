"""Several ``cgw serve`` processes on one PostgreSQL database and nothing else:
no shared directory, the spool in the database, claims with leases."""

from __future__ import annotations

import base64
import os
import smtplib
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from consent_registry.db import make_engine
from consent_registry.models import QueueMessage, QueueRecipient
from gateway.app import initialise
from gateway.settings import Settings
from tests.conftest import DOMAIN, PASSWORD, create_user
from tests.gateway.test_durability import SENDER, ServeProcess, _wait
from tests.sink import Sink

Env = Callable[..., dict[str, str]]
RECIPIENT = f"colleague@{DOMAIN}"


@pytest.fixture
def two_instances(
    make_settings: Callable[..., Settings],
    serve_env: Env,
    database_url: str,
    tmp_path: Path,
    sink: Sink,
) -> Callable[..., tuple[Settings, dict[str, str], dict[str, str]]]:
    if not database_url.startswith("postgresql"):
        pytest.skip("several instances share a PostgreSQL database; SQLite is one machine's")

    def build(**extra: str) -> tuple[Settings, dict[str, str], dict[str, str]]:
        keys = {
            "storage_key": base64.b64encode(os.urandom(32)).decode(),
            "audit_key": base64.b64encode(os.urandom(32)).decode(),
        }
        settings = make_settings(**keys)
        initialise(settings)
        create_user(settings, "drsmith", [SENDER])
        first = serve_env(settings, f"smtp://127.0.0.1:{sink.port}")
        first.update(
            CGW_STORAGE_KEY=keys["storage_key"],
            CGW_AUDIT_KEY=keys["audit_key"],
            CGW_INSTANCE_NAME="cgw-a",
            **extra,
        )
        # The second shares the database and the keys, not one file.
        second = {**first, "CGW_DATA_DIR": str(tmp_path / "b"), "CGW_INSTANCE_NAME": "cgw-b"}
        return settings, first, second

    return build


@contextmanager
def _running(env: dict[str, str]) -> Iterator[ServeProcess]:
    serve = ServeProcess(env)
    try:
        yield serve
    finally:
        serve.stop()


def _submit(port: int, cafile: Path, markers: list[str]) -> None:
    """One client on one connection, one message per marker."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=60)
    client.starttls(context=ssl.create_default_context(cafile=str(cafile)))
    client.login("drsmith", PASSWORD)
    for marker in markers:
        content = f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: {marker}\r\n\r\n{marker}\r\n"
        assert client.sendmail(SENDER, [RECIPIENT], content.encode()) == {}
    client.quit()


def _submit_all(targets: list[tuple[int, Path]], markers: list[str], per_target: int = 3) -> None:
    """Spread the markers over the instances, a few clients each, in parallel."""
    lanes = [(port, cafile) for port, cafile in targets for _ in range(per_target)]
    threads = [
        threading.Thread(target=_submit, args=(port, cafile, markers[i :: len(lanes)]))
        for i, (port, cafile) in enumerate(lanes)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
        assert not thread.is_alive()


def _deliveries(sink: Sink) -> Counter[str]:
    return Counter(
        received.content.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        for received in list(sink.received)
    )


def _done(settings: Settings) -> int:
    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as session:
            return len(
                session.exec(
                    select(QueueMessage.id).where(col(QueueMessage.done_at).is_not(None))
                ).all()
            )
    finally:
        engine.dispose()


def test_two_instances_deliver_each_message_exactly_once(
    two_instances: Callable[..., tuple[Settings, dict[str, str], dict[str, str]]],
    sink: Sink,
) -> None:
    settings, first_env, second_env = two_instances()
    markers = [f"instance-marker-{n:03d}" for n in range(500)]
    with _running(first_env) as first, _running(second_env) as second:
        _submit_all(
            [
                (first.port, Path(first_env["CGW_DATA_DIR"]) / "tls" / "dev-cert.pem"),
                (second.port, Path(second_env["CGW_DATA_DIR"]) / "tls" / "dev-cert.pem"),
            ],
            markers,
        )
        _wait(lambda: _done(settings) == 500, "all 500 messages to be delivered", timeout=240)
    delivered = _deliveries(sink)
    assert set(delivered) == set(markers)
    assert [m for m, copies in delivered.items() if copies != 1] == []
    # Both instances delivered: the queue is shared, whoever accepted a message.
    for serve in (first, second):
        assert sum(" delivered: " in line for line in serve.output) > 0
    for env in (first_env, second_env):  # the spool was the database, not a directory
        assert not list((Path(env["CGW_DATA_DIR"]) / "spool").glob("*.msg"))


def test_a_killed_instances_claims_are_taken_over_after_the_lease(
    two_instances: Callable[..., tuple[Settings, dict[str, str], dict[str, str]]],
    sink: Sink,
) -> None:
    sink.handler.delay = 0.05  # deliveries take a while: the victim holds claims when it dies
    lease = timedelta(seconds=3)
    settings, first_env, second_env = two_instances(CGW_CLAIM_LEASE="3s")
    markers = [f"takeover-marker-{n:03d}" for n in range(200)]
    victim = ServeProcess(first_env)
    _submit_all([(victim.port, Path(first_env["CGW_DATA_DIR"]) / "tls" / "dev-cert.pem")], markers)
    _wait(lambda: len(sink.received) >= 20, "deliveries to be under way")
    killed_at = datetime.now(UTC)
    victim.kill()
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        orphaned = session.exec(
            select(QueueRecipient.id)
            .where(QueueRecipient.claimed_by == "cgw-a")
            .where(col(QueueRecipient.state).in_(("queued", "deferred")))
        ).all()
    assert orphaned, "the victim held no claims when it died: the test proves nothing"
    with _running(second_env):
        _wait(lambda: _done(settings) == 200, "the survivor to finish", timeout=240)
    with Session(engine) as session:
        taken_over = session.exec(
            select(QueueRecipient).where(col(QueueRecipient.id).in_(orphaned))
        ).all()
    engine.dispose()
    assert {r.state for r in taken_over} == {"delivered"}
    assert min(r.updated_at for r in taken_over) >= killed_at + lease - timedelta(seconds=1)
    delivered = _deliveries(sink)
    assert set(delivered) == set(markers)  # nothing accepted was lost
    # At least once: only what was on the wire when the victim died can arrive twice.
    duplicates = {m: n for m, n in delivered.items() if n > 1}
    assert len(duplicates) <= 8, duplicates
