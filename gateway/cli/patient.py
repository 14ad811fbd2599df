"""``cgw patient``: patients and their addresses."""

from __future__ import annotations

from dataclasses import asdict

import click

from consent_registry import certificates, consents, patients, relationships
from consent_registry.patients import PatientView
from gateway import registry_audit
from gateway.audit import AuditAction, AuditEntry
from gateway.cli import context
from gateway.cli.output import print_json, print_table


@click.group()
def patient() -> None:
    """Patients: who they are and the addresses they write from."""


@patient.command("add")
@click.option("--name", required=True, help="The patient's name.")
@click.option("--email", "emails", multiple=True, required=True, help="An address (repeatable).")
@click.option("--mrn", help="Medical record number, unique in the practice.")
@context.actor_option
def add(name: str, emails: tuple[str, ...], mrn: str | None, actor: str) -> None:
    """Register a patient; prints the patient id."""
    config = context.settings()
    with context.transaction(config) as session:
        now = context.now()
        view = patients.add_patient(session, name, list(emails), mrn, actor, now)
        context.audit(config).record(session, registry_audit.patient_added(actor, view.id), now)
    click.echo(view.id)


@patient.command("add-email")
@click.argument("patient_ref", metavar="PATIENT")
@click.argument("email")
@context.actor_option
def add_email(patient_ref: str, email: str, actor: str) -> None:
    """Register another address of a patient."""
    config = context.settings()
    with context.transaction(config) as session:
        now = context.now()
        found = patients.resolve_patient(session, patient_ref)
        view = patients.add_patient_email(session, found, email, actor, now)
        context.audit(config).record(
            session,
            AuditEntry(AuditAction.PATIENT_EMAIL_ADDED, actor, patient_id=view.id, recipient=email),
            now,
        )
    click.echo(f"patient {view.id}: {', '.join(view.addresses)}")


def _row(view: PatientView) -> tuple[object, ...]:
    return (view.id, view.name, view.mrn, view.addresses, view.created_at)


@patient.command("list")
@context.json_option
def list_(as_json: bool) -> None:
    """List patients."""
    config = context.settings()
    with context.transaction(config) as session:
        found = patients.list_patients(session)
    if as_json:
        print_json([asdict(p) for p in found])
        return
    print_table(
        ["id", "name", "mrn", "addresses", "registered"],
        [_row(p) for p in found],
        empty="no patients yet; add one with: cgw patient add --name NAME --email EMAIL",
    )


@patient.command()
@click.argument("patient_ref", metavar="PATIENT")
@context.json_option
def show(patient_ref: str, as_json: bool) -> None:
    """A patient with relationships, consents and certificates."""
    config = context.settings()
    now = context.now()
    with context.transaction(config) as session:
        found = patients.resolve_patient(session, patient_ref)
        (view,) = patients.views(session, [found])
        related = relationships.list_relationships(session, found, now, config.zone)
        granted = consents.list_consents(session, found, None, now, config.zone)
        certs = certificates.list_certificates(session, patients.address_keys(session, found))
    if as_json:
        print_json(
            {
                **asdict(view),
                "relationships": [asdict(r) for r in related],
                "consents": [asdict(c) for c in granted],
                "certificates": [asdict(c) for c in certs],
            }
        )
        return
    click.echo(f"Patient {view.id}: {view.name}" + (f" (MRN {view.mrn})" if view.mrn else ""))
    click.echo(f"Addresses: {', '.join(view.addresses)}")
    click.echo("\nRelationships:")
    print_table(
        ["id", "clinician", "kind", "since", "ended", "status"],
        [(r.id, r.clinician, r.kind, r.since, r.ended_on, r.status.value) for r in related],
        empty="  none",
    )
    click.echo("\nConsents:")
    print_table(
        ["id", "email", "grantee", "delivery", "from", "expires", "status"],
        [
            (
                c.id,
                c.email,
                c.clinician or "practice",
                c.delivery,
                c.valid_from,
                c.expires,
                c.status.value,
            )
            for c in granted
        ],
        empty="  none",
    )
    click.echo("\nCertificates:")
    print_table(
        ["id", "email", "expires", "fingerprint"],
        [(c.id, c.email, c.not_after, c.fingerprint_sha256[:16]) for c in certs],
        empty="  none",
    )
