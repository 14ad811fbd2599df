"""``cgw quarantine``: messages held by policy, for the privacy officer to review.

Held messages stay sealed in the spool. ``show`` opens one for an admin and
is itself audited; ``release`` asks the policy again and queues only what it
now allows; ``reject`` returns the message to its sender in one bounce.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import click
from sqlalchemy.exc import SQLAlchemyError

from consent_registry.db import driver_error
from gateway.cli import context
from gateway.cli.output import CliError, print_json, print_table
from gateway.cli.queue import queue_store
from gateway.crypto_at_rest import SealError
from gateway.policy_gate import PolicyGate
from gateway.quarantine import NotHeld, Quarantine
from gateway.queue import QueueRow
from gateway.reports import Reports
from gateway.spool import open_spool


@contextmanager
def _quarantine() -> Iterator[Quarantine]:
    config = context.settings()
    with context.registry(config) as engine:
        audit = context.audit(config)
        quarantine = Quarantine(
            queue_store(engine),
            open_spool(config, engine, context.storage(config)),
            audit,
            Reports(audit, config.hostname, config.quarantine_retention),
            PolicyGate(engine, config.policy()),
        )
        try:
            yield quarantine
        except NotHeld as exc:
            raise CliError(str(exc)) from None
        except SealError as exc:
            raise CliError(f"the held message cannot be opened: {exc}") from None
        except OSError as exc:
            raise CliError(f"the held message's file: {exc}") from None
        except SQLAlchemyError as exc:
            raise CliError(f"database error: {driver_error(exc)[1]}") from None


@click.group()
def quarantine() -> None:
    """Messages held by policy (never their content in lists)."""


@quarantine.command("list")
@context.json_option
def list_(as_json: bool) -> None:
    """Held messages: when, from whom, to whom, and why."""
    config = context.settings()
    with context.registry(config) as engine:  # needs no keys: it shows no content
        messages: dict[str, list[QueueRow]] = defaultdict(list)
        for row in queue_store(engine).held():
            messages[row.message_id].append(row)
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
    with _quarantine() as held_messages:
        content = held_messages.show(message_id, actor)
    click.echo(content.decode("utf-8", errors="replace"), nl=False)


@quarantine.command()
@click.argument("message_id")
@context.actor_option
def release(message_id: str, actor: str) -> None:
    """Deliver what the policy allows now; the rest stays held, and says why.

    Exit status 0 when every held recipient was released, 1 when any stays held.
    """
    with _quarantine() as held_messages:
        result = held_messages.release(message_id, actor)
    for address, decision in result.released:
        click.echo(f"released <{address}> ({decision.protection.value}); it is delivered shortly")
    for address, decision in result.still_held:
        click.echo(f"still held <{address}> ({decision.reason.value}): {decision.sentence}")
    if result.still_held:
        raise CliError(
            f"{len(result.still_held)} recipient(s) of {message_id} stay held; "
            "record what is missing and release again, or reject"
        )


@quarantine.command()
@click.argument("message_id")
@click.option("--reason", help="Why, for the sender (in the bounce) and the audit log.")
@context.actor_option
def reject(message_id: str, reason: str | None, actor: str) -> None:
    """Do not deliver: the held recipients fail and the sender gets one bounce."""
    with _quarantine() as held_messages:
        rejected = held_messages.reject(message_id, actor, reason)
    click.echo(
        f"rejected {message_id} for {', '.join(f'<{a}>' for a in rejected)}; "
        "the sender gets a bounce"
    )
