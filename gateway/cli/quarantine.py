"""``cgw quarantine``: messages held by policy, for the privacy officer to review.

Held messages stay sealed in the spool; ``show`` opens one for an admin and
is itself audited. (Release and reject arrive with the rest of the quarantine.)
"""

from __future__ import annotations

from collections import defaultdict

import click

from gateway.audit import AuditAction, AuditEntry
from gateway.cli import context
from gateway.cli.output import CliError, print_json, print_table
from gateway.cli.queue import queue_store
from gateway.crypto_at_rest import storage_key
from gateway.queue import QueueRow
from gateway.settings import Settings
from gateway.spool import Spool


def _held(config: Settings) -> dict[str, list[QueueRow]]:
    with context.registry(config) as engine:
        rows = queue_store(engine).held()
    messages: dict[str, list[QueueRow]] = defaultdict(list)
    for row in rows:
        messages[row.message_id].append(row)
    return messages


@click.group()
def quarantine() -> None:
    """Messages held by policy (never their content in lists)."""


@quarantine.command("list")
@context.json_option
def list_(as_json: bool) -> None:
    """Held messages: when, from whom, to whom, and why."""
    messages = _held(context.settings())
    if as_json:
        print_json(
            [
                {
                    "id": message_id,
                    "received_at": rows[0].received_at,
                    "sender": rows[0].mail_from,
                    "user": rows[0].username,
                    "recipients": [r.recipient for r in rows],
                    "reasons": sorted({r.reason or "" for r in rows}),
                }
                for message_id, rows in messages.items()
            ]
        )
        return
    print_table(
        ["id", "received", "sender", "recipients", "reason"],
        [
            (
                mid,
                rows[0].received_at,
                rows[0].mail_from,
                [r.recipient for r in rows],
                ", ".join(sorted({r.reason or "" for r in rows})),
            )
            for mid, rows in messages.items()
        ],
        empty="nothing is held",
    )


@quarantine.command()
@click.argument("message_id")
@context.actor_option
def show(message_id: str, actor: str) -> None:
    """The held message itself, headers and body (audited)."""
    config = context.settings()
    rows = _held(config).get(message_id)
    if not rows:
        raise CliError(f"no held message {message_id!r} (see: cgw quarantine list)")
    key, _ = storage_key(config)
    content = Spool(config.spool_dir, key).load(message_id)
    with context.transaction(config) as session:
        context.audit(config).record(
            session,
            AuditEntry(
                AuditAction.QUARANTINE_SHOWN,
                actor,
                message_id=message_id,
                detail=f"held for {', '.join(r.recipient for r in rows)}",
            ),
            context.now(),
        )
    click.echo(content.decode("utf-8", errors="replace"), nl=False)
