"""``cgw status``: is this instance healthy, and how does its queue stand."""

from __future__ import annotations

from datetime import datetime

import click

from gateway.cli import context
from gateway.cli.output import CliError, print_json
from gateway.status import check


@click.command()
@context.json_option
@click.option("--quiet", is_flag=True, help="No output; only the exit status (for healthchecks).")
def status(as_json: bool, quiet: bool) -> None:
    """Listening, database reachable, queue depth, oldest deferred, quarantine size.

    Exit status 0 when healthy (the database answers and the submission port
    greets), 1 otherwise.
    """
    result = check(context.settings())
    queue = result.queue
    if as_json and not quiet:
        print_json(
            {
                "healthy": result.healthy,
                "checks": {p.name: {"ok": p.ok, "detail": p.detail} for p in result.probes},
                "queue": None
                if queue is None
                else {
                    "queued": queue.queued,
                    "deferred": queue.deferred,
                    "held_recipients": queue.held_recipients,
                    "held_messages": queue.held_messages,
                    "oldest_deferred": queue.oldest_deferred,
                },
            }
        )
    elif not quiet:
        for probe in result.probes:
            click.echo(f"{probe.name:<12}{'ok' if probe.ok else 'FAILING':<9}{probe.detail}")
        if queue is not None:
            click.echo(
                f"{'queue':<12}{'':<9}{queue.queued} queued, {queue.deferred} deferred"
                f"{_since(queue.oldest_deferred)}"
            )
            click.echo(
                f"{'quarantine':<12}{'':<9}{queue.held_messages} messages held "
                f"({queue.held_recipients} recipients)"
            )
    if not result.healthy:
        failing = "; ".join(f"{p.name} {p.detail}" for p in result.probes if not p.ok)
        raise CliError(f"unhealthy: {failing}")


def _since(oldest: datetime | None) -> str:
    if oldest is None:
        return ""
    waited = context.now() - oldest
    hours = waited.total_seconds() / 3600
    return f" (oldest deferred arrived {oldest:%Y-%m-%d %H:%M} UTC, {hours:.1f} h ago)"
