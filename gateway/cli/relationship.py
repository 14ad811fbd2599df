"""``cgw relationship``: who is whose clinician, since when, until when."""

from __future__ import annotations

from dataclasses import asdict

import click

from consent_registry import patients, relationships
from gateway import registry_audit
from gateway.audit import AuditAction, AuditEntry
from gateway.cli import context
from gateway.cli.output import print_json, print_table


@click.group()
def relationship() -> None:
    """Clinician-patient relationships (never deleted: ended)."""


@relationship.command("add")
@click.option("--patient", "patient_ref", required=True, metavar="PATIENT")
@click.option("--clinician", required=True, metavar="USERNAME")
@click.option("--since", help="First day (YYYY-MM-DD); default today.")
@click.option(
    "--kind", type=click.Choice(relationships.KINDS), default="primary", show_default=True
)
@context.actor_option
def add(patient_ref: str, clinician: str, since: str | None, kind: str, actor: str) -> None:
    """Record an established relationship; prints its id."""
    config = context.settings()
    first_day = context.parse_day(since, "--since", config)
    with context.transaction(config) as session:
        now = context.now()
        found = patients.resolve_patient(session, patient_ref)
        view = relationships.add_relationship(
            session, found, clinician, first_day, kind, actor, now, config.zone
        )
        context.audit(config).record(session, registry_audit.relationship_added(actor, view), now)
    click.echo(view.id)


@relationship.command()
@click.argument("relationship_id", type=int)
@click.option("--on", "on_day", help="The day it ends (YYYY-MM-DD); default today.")
@context.actor_option
def end(relationship_id: int, on_day: str | None, actor: str) -> None:
    """End a relationship: from that day on it is no longer active."""
    config = context.settings()
    last = context.parse_day(on_day, "--on", config)
    with context.transaction(config) as session:
        now = context.now()
        view = relationships.end_relationship(
            session, relationship_id, last, actor, now, config.zone
        )
        context.audit(config).record(
            session,
            AuditEntry(
                AuditAction.RELATIONSHIP_ENDED,
                actor,
                patient_id=view.patient_id,
                username=view.clinician,
                detail=f"relationship {view.id} ended on {last}",
            ),
            now,
        )
    click.echo(f"relationship {view.id} ends on {last}")


@relationship.command("list")
@click.option("--patient", "patient_ref", metavar="PATIENT")
@context.json_option
def list_(patient_ref: str | None, as_json: bool) -> None:
    """List relationships, with their status today."""
    config = context.settings()
    with context.transaction(config) as session:
        found = patients.resolve_patient(session, patient_ref) if patient_ref else None
        views = relationships.list_relationships(session, found, context.now(), config.zone)
    if as_json:
        print_json([asdict(v) for v in views])
        return
    print_table(
        ["id", "patient", "name", "clinician", "kind", "since", "ended", "status"],
        [
            (
                v.id,
                v.patient_id,
                v.patient_name,
                v.clinician,
                v.kind,
                v.since,
                v.ended_on,
                v.status.value,
            )
            for v in views
        ],
        empty="no relationships",
    )
