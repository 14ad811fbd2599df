"""What an operator watches: ``cgw status`` (the Docker healthcheck) and JSON logs."""

from __future__ import annotations

import json
import smtplib
import ssl
from collections.abc import Callable

from gateway.app import initialise
from gateway.settings import Settings
from tests.cli import Run
from tests.conftest import DOMAIN, PASSWORD, create_user
from tests.gateway.test_durability import (
    MARKER,
    SENDER,
    ServeProcess,
    _message,
    _recipients,
    _wait,
)
from tests.runner import free_port

Env = Callable[..., dict[str, str]]


def _gateway_env(
    make_settings: Callable[..., Settings], serve_env: Env
) -> tuple[Settings, dict[str, str]]:
    settings = make_settings()
    initialise(settings)
    create_user(settings, "drsmith", [SENDER])
    env = serve_env(settings, "smtp://127.0.0.1:9?tls=implicit")  # a next hop that is down
    env.update(
        CGW_SUBMISSION_LISTEN=f"127.0.0.1:{free_port()}",
        CGW_SMTPS_LISTEN=f"127.0.0.1:{free_port()}",
        CGW_RETRY_BACKOFF="1h",
    )
    return settings, env


def _send(settings: Settings, port: int) -> str:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.starttls(
        context=ssl.create_default_context(cafile=str(settings.tls_dir / "dev-cert.pem"))
    )
    client.login("drsmith", PASSWORD)
    client.mail(SENDER)
    client.rcpt(f"colleague@{DOMAIN}")
    code, reply = client.data(_message())
    client.quit()
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def test_status_reports_health_and_the_queue(
    make_settings: Callable[..., Settings], serve_env: Env, cgw: Run
) -> None:
    settings, env = _gateway_env(make_settings, serve_env)
    serve = ServeProcess(env)
    try:
        _send(settings, serve.port)
        shown = cgw("status", "--json", extra=env)
        assert shown.returncode == 0, shown.stderr
        report = json.loads(shown.stdout)
        assert report["healthy"] is True
        assert {name: check["ok"] for name, check in report["checks"].items()} == {
            "submission": True,
            "smtps": True,
            "database": True,
        }
        queue = report["queue"]
        # The next hop is down: the message waits, queued or already deferred once.
        assert queue["queued"] + queue["deferred"] == 1 and queue["held_messages"] == 0
        text = cgw("status", extra=env)
        assert text.returncode == 0 and "submission  ok" in text.stdout
        quiet = cgw("status", "--quiet", extra=env)
        assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    finally:
        assert serve.stop() == 0
    down = cgw("status", "--quiet", extra=env)
    assert down.returncode == 1 and down.stdout == ""
    assert down.stderr.startswith("cgw: error: unhealthy: submission 127.0.0.1:")
    assert "not answering" in down.stderr and len(down.stderr.splitlines()) == 1
    gone = cgw(
        "status", extra={**env, "CGW_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/x"}
    )
    assert gone.returncode == 1 and "database unreachable" in gone.stderr


def test_json_logs_are_one_object_per_line_without_content(
    make_settings: Callable[..., Settings], serve_env: Env
) -> None:
    settings, env = _gateway_env(make_settings, serve_env)
    serve = ServeProcess(env, "--log-format", "json")
    queue_id = _send(settings, serve.port)
    _wait(lambda: _recipients(settings)[0].state == "deferred", "the first delivery attempt")
    assert serve.stop() == 0
    lines = serve.output
    events = [json.loads(line) for line in lines]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= set(e) for e in events)
    (started,) = [e for e in events if e.get("event") == "started"]
    assert started["message"] == "Consent Gateway is running."
    (accepted,) = [e for e in events if e.get("event") == "accepted"]
    assert accepted["queue_id"] == queue_id and "from=<dr.smith@" in accepted["message"]
    (delivery,) = [e for e in events if e.get("event") == "delivery"]
    assert (delivery["queue_id"], delivery["verdict"]) == (queue_id, "deferred")
    assert not [e for e in events if e["logger"].startswith("alembic")]
    assert events[-1]["event"] == "stopped"
    assert not [line for line in lines if MARKER in line]
