"""``cgw audit``: read, export and verify the tamper-evident audit log."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from datetime import date, datetime, time, timedelta

import click

from consent_registry import patients
from gateway.audit import COLUMNS, AuditAction, AuditEntry, AuditFilter, as_record, entries
from gateway.cli import context
from gateway.cli.output import CliError, print_json, print_table
from gateway.settings import Settings


def _instant(value: str | None, option: str, config: Settings, end: bool) -> datetime | None:
    """A date (the whole day, at the practice) or an ISO time with offset."""
    if value is None:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise CliError(f"{option}: {value!r} is neither a date nor an ISO time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=config.zone)
        return moment
    start = datetime.combine(day + timedelta(days=1) if end else day, time(), tzinfo=config.zone)
    return start


@click.group()
def audit() -> None:
    """The audit log: every decision and admin action, never message content."""


@audit.command("list")
@click.option("--since", help="From this date (YYYY-MM-DD) or time (ISO 8601).")
@click.option("--until", help="Up to and including this date, or up to this time.")
@click.option("--patient", "patient_ref", metavar="PATIENT")
@click.option("--user", metavar="USERNAME", help="Entries by or about this user.")
@click.option("--action", help="An action (consent.granted) or a family of them (consent.).")
@context.json_option
def list_(
    since: str | None,
    until: str | None,
    patient_ref: str | None,
    user: str | None,
    action: str | None,
    as_json: bool,
) -> None:
    """Entries in order, filtered."""
    config = context.settings()
    wanted = AuditFilter(
        since=_instant(since, "--since", config, end=False),
        until=_instant(until, "--until", config, end=True),
        user=user,
        action=action,
    )
    with context.transaction(config) as session:
        if patient_ref:
            patient = patients.resolve_patient(session, patient_ref)
            wanted = replace(wanted, patient_id=patient.id)
        found = entries(session, wanted)
    if as_json:
        print_json([as_record(e) for e in found])
        return
    print_table(
        ["seq", "time", "actor", "action", "recipient", "decision", "reason", "ids"],
        [
            (
                e.seq,
                e.at.astimezone(config.zone).strftime("%Y-%m-%d %H:%M:%S"),
                e.actor,
                e.action,
                e.recipient,
                e.decision,
                e.reason,
                _ids(as_record(e)),
            )
            for e in found
        ],
        empty="no audit entries match",
    )


def _ids(record: dict[str, object]) -> str:
    names = {
        "message_id": "msg",
        "patient_id": "patient",
        "consent_id": "consent",
        "username": "user",
    }
    return " ".join(f"{short}={record[key]}" for key, short in names.items() if record[key])


@audit.command()
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@context.actor_option
def export(fmt: str, actor: str) -> None:
    """Every entry, with its hashes, to standard output."""
    config = context.settings()
    with context.transaction(config) as session:
        records = [as_record(e) for e in entries(session, AuditFilter())]
        context.audit(config).record(
            session,
            AuditEntry(AuditAction.AUDIT_EXPORTED, actor, detail=f"{len(records)} as {fmt}"),
            context.now(),
        )
    if fmt == "jsonl":
        click.echo("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), nl=False)
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    click.echo(out.getvalue(), nl=False)


@audit.command()
def verify() -> None:
    """Check the chain: exit 0 when intact, 1 naming the first broken entry."""
    config = context.settings()
    with context.transaction(config) as session:
        count, broken = context.audit(config).verify(session)
    if broken is not None:
        raise CliError(f"audit entry {broken.seq} {broken.problem}")
    click.echo(f"audit log intact: {count} entries")
