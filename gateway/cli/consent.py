"""``cgw consent``: the patient's documented consent to e-mail, per address."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from consent_registry import consents, patients
from consent_registry.consents import ConsentTerms, TermsError
from consent_registry.errors import RegistryError
from consent_registry.io_csv import read_csv, write_csv
from consent_registry.io_fhir import read_fhir, write_fhir
from gateway import registry_audit
from gateway.audit import AuditAction, AuditEntry
from gateway.cli import context
from gateway.cli.output import CliError, print_json, print_table
from policies.status import ConsentStatus


@click.group()
def consent() -> None:
    """Consents: granted, revoked, listed, imported and exported."""


@consent.command()
@click.option("--patient", "patient_ref", required=True, metavar="PATIENT")
@click.option("--email", required=True, help="The exact address the patient consented for.")
@click.option("--clinician", metavar="USERNAME", help="Only this clinician; default practice-wide.")
@click.option("--method", type=click.Choice(consents.METHODS), default="written", show_default=True)
@click.option("--evidence", metavar="REF", help="Where the signed form or record is kept.")
@click.option("--from", "valid_from", help="First valid day (YYYY-MM-DD); default today.")
@click.option("--expires", help="The day it expires (YYYY-MM-DD): no longer valid that day.")
@click.option(
    "--delivery",
    type=click.Choice(consents.DELIVERIES),
    default="encrypted",
    show_default=True,
    help="encrypted: S/MIME only; tls: S/MIME, else verified TLS; plain: also unencrypted.",
)
@click.option("--risk-acknowledged", is_flag=True, help="The patient was told the risks of plain.")
@context.actor_option
def grant(
    patient_ref: str,
    email: str,
    clinician: str | None,
    method: str,
    evidence: str | None,
    valid_from: str | None,
    expires: str | None,
    delivery: str,
    risk_acknowledged: bool,
    actor: str,
) -> None:
    """Record a consent; prints its id."""
    config = context.settings()
    terms = ConsentTerms(
        patient=patient_ref,
        email=email,
        clinician=clinician,
        method=method,
        evidence=evidence,
        valid_from=context.parse_day(valid_from, "--from", config),
        expires=context.parse_day(expires, "--expires", config) if expires else None,
        delivery=delivery,
        risk_acknowledged=risk_acknowledged,
    )
    with context.transaction(config) as session:
        now = context.now()
        try:
            (view,) = consents.grant_many(session, [terms], actor, now, config.zone)
        except TermsError as exc:
            raise CliError(str(exc)) from None
        context.audit(config).record(session, registry_audit.consent_granted(actor, view), now)
    click.echo(view.id)


@consent.command()
@click.argument("consent_id", type=int)
@click.option("--reason", help="Why (kept in the record).")
@context.actor_option
def revoke(consent_id: int, reason: str | None, actor: str) -> None:
    """Revoke a consent, from this moment on."""
    config = context.settings()
    with context.transaction(config) as session:
        now = context.now()
        view = consents.revoke(session, consent_id, reason, actor, now, config.zone)
        context.audit(config).record(
            session,
            AuditEntry(
                AuditAction.CONSENT_REVOKED,
                actor,
                patient_id=view.patient_id,
                consent_id=view.id,
                recipient=view.email,
                detail=reason,
            ),
            now,
        )
    click.echo(f"revoked consent {view.id} ({view.email})")


@consent.command("list")
@click.option("--patient", "patient_ref", metavar="PATIENT")
@click.option("--status", type=click.Choice([s.value for s in ConsentStatus]))
@context.json_option
def list_(patient_ref: str | None, status: str | None, as_json: bool) -> None:
    """List consents with their status now."""
    config = context.settings()
    with context.transaction(config) as session:
        found = patients.resolve_patient(session, patient_ref) if patient_ref else None
        wanted = ConsentStatus(status) if status else None
        views = consents.list_consents(session, found, wanted, context.now(), config.zone)
    if as_json:
        print_json([asdict(v) for v in views])
        return
    print_table(
        ["id", "patient", "email", "grantee", "method", "delivery", "from", "expires", "status"],
        [
            (
                v.id,
                v.patient_id,
                v.email,
                v.clinician or "practice",
                v.method,
                v.delivery,
                v.valid_from,
                v.expires,
                v.status.value,
            )
            for v in views
        ],
        empty="no consents",
    )


def _format_of(path: Path, given: str | None) -> str:
    return given or ("fhir" if path.suffix.lower() == ".json" else "csv")


@consent.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["csv", "fhir"]), help="Default: by extension.")
@context.actor_option
def import_(file: Path, fmt: str | None, actor: str) -> None:
    """Import consents, all or nothing: a bad row names its line and imports nothing."""
    config = context.settings()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {file}: {exc}") from None
    kind = _format_of(file, fmt)
    try:
        rows: list[tuple[str, ConsentTerms]] = read_csv(text) if kind == "csv" else read_fhir(text)
    except RegistryError as exc:
        raise CliError(f"{exc}; nothing imported") from None
    with context.transaction(config) as session:
        now = context.now()
        try:
            views = consents.grant_many(session, [t for _, t in rows], actor, now, config.zone)
        except TermsError as exc:
            raise CliError(
                f"{rows[exc.index][0]}, field {exc.field}: {exc}; nothing imported"
            ) from None
        audit = context.audit(config)  # the key file is read once, not once per row
        for (position, _), view in zip(rows, views, strict=True):
            how = f"imported from {file.name} {position}"
            audit.record(session, registry_audit.consent_granted(actor, view, how), now)
    click.echo(f"imported {len(views)} consents from {file}")


@consent.command()
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "fhir"]), default="csv", show_default=True
)
@context.actor_option
def export(fmt: str, actor: str) -> None:
    """Write every consent (revoked ones too) to standard output."""
    config = context.settings()
    with context.transaction(config) as session:
        now = context.now()
        views = consents.list_consents(session, None, None, now, config.zone)
        context.audit(config).record(
            session,
            AuditEntry(AuditAction.CONSENTS_EXPORTED, actor, detail=f"{len(views)} as {fmt}"),
            now,
        )
    click.echo(write_csv(views) if fmt == "csv" else write_fhir(views), nl=False)
