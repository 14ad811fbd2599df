"""``cgw queue``: what waits for delivery, and a nudge to try again now."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta

import click
from sqlalchemy import Engine

from consent_registry.db import session_scope
from gateway.audit import AuditAction, AuditEntry
from gateway.cli import context
from gateway.cli.output import CliError, print_json, print_table
from gateway.queue import QueueStore


def queue_store(engine: Engine) -> QueueStore:
    """The queue as the CLI reads and nudges it (it claims nothing)."""
    return QueueStore(engine, "cgw-cli", timedelta(0))


@click.group()
def queue() -> None:
    """The delivery queue (message bodies are never shown)."""


@queue.command("list")
@context.json_option
def list_(as_json: bool) -> None:
    """Recipients waiting: queued, deferred (with the last error) or held."""
    config = context.settings()
    with context.registry(config) as engine:
        rows = queue_store(engine).pending()
    if as_json:
        print_json([asdict(r) for r in rows])
        return
    print_table(
        ["id", "received", "from", "to", "state", "tries", "next try", "last error"],
        [
            (
                r.message_id,
                r.received_at,
                r.mail_from or "<>",
                r.recipient,
                r.state,
                r.attempts,
                r.next_attempt_at if r.state != "quarantined" else None,
                r.last_error,
            )
            for r in rows
        ],
        empty="the queue is empty",
    )


@queue.command()
@click.argument("message_id")
@context.actor_option
def retry(message_id: str, actor: str) -> None:
    """Try a deferred message again now, instead of at its next scheduled time."""
    config = context.settings()
    with context.registry(config) as engine:
        now = context.now()
        count = queue_store(engine).retry_now(message_id, now)
        if count == 0:
            raise CliError(f"no deferred recipients of message {message_id!r} in the queue")
        with session_scope(engine) as session:
            context.audit(config).record(
                session,
                AuditEntry(
                    AuditAction.QUEUE_RETRIED,
                    actor,
                    message_id=message_id,
                    detail=f"{count} recipients due now",
                ),
                now,
            )
    click.echo(
        f"{count} recipients of {message_id} are due now; a running gateway takes them "
        "within seconds"
    )
