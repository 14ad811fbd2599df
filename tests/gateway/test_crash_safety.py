"""Crash safety: kill -9 at random moments during delivery, twenty times over.

Every message the gateway accepted must reach the next hop in the end.
Delivery is at least once: a duplicate is possible only when a kill falls
between the next hop's 250 and the queue update, and the test counts them.
"""

from __future__ import annotations

import random
import ssl
import time
from collections.abc import Callable

from gateway.app import initialise
from gateway.settings import Settings
from tests.conftest import DOMAIN, create_user
from tests.gateway.test_durability import ServeProcess, _message_done, _send, _stored, _wait
from tests.sink import Sink

SENDER = f"dr.smith@{DOMAIN}"
BATCH = 24
KILLS = 20


def test_every_accepted_message_survives_twenty_kills(
    make_settings: Callable[..., Settings],
    serve_env: Callable[..., dict[str, str]],
    sink_tls: ssl.SSLContext,
) -> None:
    settings = make_settings()
    initialise(settings)
    create_user(settings, "drsmith", [SENDER])
    sink = Sink(sink_tls, delay=0.05).start()  # each delivery takes a while: kills land mid-way
    env = serve_env(settings, f"smtp://127.0.0.1:{sink.port}")
    env["CGW_RETRY_BACKOFF"] = "1s"
    env["CGW_RETRY_BACKOFF_MAX"] = "1s"
    cafile = settings.tls_dir / "dev-cert.pem"
    rng = random.Random(2026)
    accepted: dict[str, str] = {}
    try:
        gateway = ServeProcess(env)
        for n in range(BATCH):
            marker = f"crash-marker-{n:03d}"
            accepted[marker] = _send(gateway.port, cafile, _body(marker))
        for kill in range(KILLS):
            gateway.kill()
            gateway = ServeProcess(env)
            marker = f"crash-marker-after-kill-{kill:02d}"  # new work in every life
            accepted[marker] = _send(gateway.port, cafile, _body(marker))
            time.sleep(rng.uniform(0.0, 0.4))  # a random moment to kill at: the point here
        gateway.kill()
        gateway = ServeProcess(env)
        _wait(
            lambda: all(_message_done(settings, mid) for mid in accepted.values()),
            "every message to be delivered",
            timeout=120,
        )
        assert gateway.stop() == 0
    finally:
        sink.stop()
    received = [r.content for r in sink.received]
    for marker in accepted:
        copies = sum(marker.encode() in content for content in received)
        assert copies >= 1, f"{marker} was accepted but never delivered"
    duplicates = len(received) - len(accepted)
    print(f"\n{KILLS} kills, {len(accepted)} messages, {duplicates} duplicate deliveries")
    _wait(lambda: _stored(settings) == [], "the spool to empty")


def _body(marker: str) -> bytes:
    return f"From: {SENDER}\r\nTo: team@{DOMAIN}\r\nSubject: {marker}\r\n\r\n{marker}\r\n".encode()
