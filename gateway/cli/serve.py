"""``cgw init``, ``cgw serve`` and ``cgw config show``."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING

import click
from sqlalchemy.exc import SQLAlchemyError

from gateway.cli import context
from gateway.cli.output import CliError, print_json, print_table
from gateway.settings import ListenAddress, Settings, masked_settings

if TYPE_CHECKING:
    from gateway.app import Listener


def client_instructions(settings: Settings, listeners: Sequence[Listener]) -> str:
    """What to type into Thunderbird or Outlook, for the ports in use."""
    ports = {listener.label: listener.address for listener in listeners}
    submission = ports.get("submission (STARTTLS)", settings.submission_listen)
    implicit = ports.get("submission (implicit TLS)", settings.smtps_listen)
    lines = [
        "Configure your mail client (Thunderbird, Outlook) - outgoing server (SMTP):",
        f"  Server name:          {_server_name(settings, submission)}",
        f"  Port:                 {submission.port}",
        "  Connection security:  STARTTLS",
        "  Authentication:       Normal password",
        "  User name:            your cgw user name (or one of your addresses)",
    ]
    if implicit is not None:
        lines.append(f"  (or port {implicit.port} with SSL/TLS)")
    if settings.tls_cert is None:
        cert = settings.tls_dir / "dev-cert.pem"
        lines.append(f"  The certificate is self-signed ({cert}): accept it once in the client.")
    return "\n".join(lines)


def _server_name(settings: Settings, address: ListenAddress) -> str:
    if address.host in ("0.0.0.0", "::", ""):  # noqa: S104 (a wildcard listener)
        return settings.hostname
    return address.host


@click.command()
def init() -> None:
    """Create the data directory, database, keys and a development certificate."""
    from gateway.app import initialise  # the gateway's wiring loads only where it runs

    config = context.settings()
    try:
        report = initialise(config)
    except (OSError, SQLAlchemyError) as exc:
        raise CliError(f"initialisation failed: {exc}") from None
    for item in report.created:
        click.echo(f"created  {item}")
    for item in report.kept:
        click.echo(f"kept     {item}")
    click.echo(f"data directory: {config.data_dir}")
    click.echo(client_instructions(config, []))


@click.command()
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info")
def serve(log_level: str) -> None:
    """Run the gateway: submission, delivery and retries."""
    config = context.settings()
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(_serve(config))
    except OSError as exc:
        raise CliError(f"cannot start: {exc}") from None
    except SQLAlchemyError as exc:
        raise CliError(f"cannot start: database error: {exc}") from None
    except ValueError as exc:  # e.g. an S/MIME key file that does not load
        raise CliError(f"cannot start: {exc}") from None


async def _serve(config: Settings) -> None:
    from gateway.app import Gateway

    gateway = Gateway(config)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    click.echo("Consent Gateway is running.")
    for listener in gateway.listeners:
        click.echo(f"  listening on {listener.address}  {listener.label}")
    delivery = config.delivery.describe()
    if config.delivery.kind == "outbox":
        delivery += f" ({config.outbox_dir})"
    click.echo(f"  delivering to {delivery}")
    click.echo(f"  practice domains: {', '.join(sorted(config.practice_domains)) or '(none set)'}")
    click.echo(client_instructions(config, gateway.listeners))
    click.echo("Stop with Ctrl-C.", nl=True)
    await stop.wait()
    click.echo("stopping ...")
    await gateway.stop()


@click.group()
def config() -> None:
    """Inspect the effective configuration."""


@config.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(as_json: bool) -> None:
    """Print the effective settings, secrets masked."""
    shown = masked_settings(context.settings())
    if as_json:
        print_json(shown)
    else:
        print_table(["setting", "value"], sorted(shown.items()), empty="")
