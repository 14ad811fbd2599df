"""``cgw cert``: recipients' S/MIME certificates."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from consent_registry import certificates
from gateway import registry_audit
from gateway.cli import context
from gateway.cli.output import CliError, print_json, print_table


@click.group()
def cert() -> None:
    """Recipient certificates for S/MIME encryption."""


@cert.command("import")
@click.option("--email", required=True, help="The address the certificate is for.")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@context.actor_option
def import_(email: str, file: Path, actor: str) -> None:
    """Import a certificate: PEM, DER, or a signed .eml the patient sent."""
    config = context.settings()
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {file}: {exc}") from None
    with context.transaction(config) as session:
        now = context.now()
        view = certificates.import_certificate(session, email, data, actor, now)
        context.audit(config).record(
            session,
            registry_audit.certificate_imported(actor, view),
            now,
        )
    click.echo(
        f"imported certificate {view.id} for {view.email}, valid until {view.not_after:%Y-%m-%d}"
    )


@cert.command("list")
@context.json_option
def list_(as_json: bool) -> None:
    """List recipient certificates."""
    config = context.settings()
    with context.transaction(config) as session:
        views = certificates.list_certificates(session)
    if as_json:
        print_json([asdict(v) for v in views])
        return
    print_table(
        ["id", "email", "subject", "expires", "sha256"],
        [(v.id, v.email, v.subject, v.not_after, v.fingerprint_sha256[:16]) for v in views],
        empty="no certificates",
    )
