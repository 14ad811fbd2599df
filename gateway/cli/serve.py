"""``cgw init``, ``cgw serve`` and ``cgw config show``."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy.exc import SQLAlchemyError

from gateway import logs
from gateway.budget import return_large_buffers_to_the_system
from gateway.cli import context
from gateway.cli.output import CliError, print_json, print_table
from gateway.logs import LogFormat
from gateway.settings import ListenAddress, Settings, masked_settings
from gateway.workers import WorkerFailed, Workers, WriterProcess, announce_ready

log = logging.getLogger("gateway")

if TYPE_CHECKING:
    from gateway.app import Gateway, Listener


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
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per line on stdout (for Docker and log shippers).",
)
# How the first process starts the others (``gateway.workers``); not for people.
@click.option("--worker", type=click.IntRange(min=2), hidden=True)
@click.option("--connections-fd", type=int, hidden=True)
@click.option("--lifeline-fd", type=int, hidden=True)
@click.option("--writes-fd", type=int, hidden=True)
@click.option("--writes-fds", default="", hidden=True)
def serve(
    log_level: str,
    log_format: LogFormat,
    worker: int | None,
    connections_fd: int | None,
    lifeline_fd: int | None,
    writes_fd: int | None,
    writes_fds: str,
) -> None:
    """Run the gateway: submission, delivery and retries."""
    config = context.settings()
    logs.configure(log_level, log_format)
    return_large_buffers_to_the_system()
    try:
        if writes_fds:
            _serve_writes(config, [int(fd) for fd in writes_fds.split(",")])
        elif worker is None:
            options = ["--log-level", log_level, "--log-format", log_format]
            _run(_serve(config, log_format, options))
        else:
            if lifeline_fd is None or connections_fd is None:
                raise CliError("--worker needs --connections-fd and --lifeline-fd")
            named = config.model_copy(update={"instance_name": f"{config.instance_name}.{worker}"})
            _run(_serve_as_worker(named, connections_fd, lifeline_fd, writes_fd))
    except WorkerFailed as exc:
        raise CliError(f"stopped: {exc}") from None
    except OSError as exc:
        raise CliError(f"cannot start: {exc}") from None
    except SQLAlchemyError as exc:
        raise CliError(f"cannot start: database error: {exc}") from None
    except ValueError as exc:  # e.g. an S/MIME key file that does not load
        raise CliError(f"cannot start: {exc}") from None


def _run(main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """``cgw serve``'s event loop: uvloop's where it is installed (not on Windows).

    Its event loop and transports in C cut the workers' CPU per message by
    about a sixth (bench, 4 KB S/MIME mail at concurrency 10): the loop's own
    bookkeeping, socket writes and outbound TLS were a third of a worker's
    time on asyncio's loop. The program is the same on either loop; the
    tests run the gateway on this one too, so that it is the loop tested.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)


def _serve_writes(config: Settings, fds: Sequence[int]) -> None:
    """The writer process of several workers (``WriterProcess``): commit what
    they send until the last of them closes its connection."""
    from consent_registry.db import make_engine
    from consent_registry.writes import serve_writes

    for signum in (signal.SIGINT, signal.SIGTERM):  # it ends after the workers
        signal.signal(signum, signal.SIG_IGN)
    engine = make_engine(config.database_url)
    try:
        serve_writes(engine, [socket.socket(fileno=fd) for fd in fds])
    finally:
        engine.dispose()


def _one_writer_process(config: Settings) -> bool:
    """Whether the workers share a writer process: several of them on SQLite,
    whose one write turn their writer threads passed around (PostgreSQL
    takes concurrent writers as they are)."""
    return config.workers > 1 and config.database_url.startswith("sqlite")


async def _serve(config: Settings, log_format: LogFormat, options: Sequence[str]) -> None:
    from gateway.app import STAGE_STOP_SECONDS, Gateway

    writer = (
        await WriterProcess.start(config.workers, options) if _one_writer_process(config) else None
    )
    try:
        gateway = Gateway(config, writes=writer.connections[0] if writer else None)
        await gateway.start()
    except BaseException:
        if writer is not None:
            await writer.stop(STAGE_STOP_SECONDS)
        raise
    stop = asyncio.Event()
    _stop_on_signals(stop)
    # A worker's own stop: the grace, its stages, a delivery in flight.
    stop_seconds = (
        config.shutdown_grace.total_seconds()
        + STAGE_STOP_SECONDS
        + config.delivery_timeout.total_seconds()
        + 10
    )
    writes = writer.connections[1:] if writer else []
    assert gateway.spread is not None, "the first process listens"
    workers = Workers(config.workers, gateway.spread, options, stop_seconds, writes)
    try:
        await workers.start()
    except BaseException:
        await gateway.stop()
        if writer is not None:
            await writer.stop(STAGE_STOP_SECONDS)
        raise
    _announce(config, gateway, log_format)
    stopped = asyncio.ensure_future(stop.wait())
    exits = [asyncio.ensure_future(workers.exited())]
    if writer is not None:
        exits.append(asyncio.ensure_future(writer.exited()))
    await asyncio.wait((stopped, *exits), return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    for waiting in exits:
        waiting.cancel()
    # A worker (or the writer) that exits unasked is a failure, unless a stop
    # was asked of all (Ctrl-C in a terminal reaches every process at once).
    failures = [e.result() for e in exits if e.done() and not e.cancelled()]
    failure = failures[0] if failures and not stop.is_set() else None
    if failure is not None:
        log.error("%s: stopping the gateway", failure)
    log.info("stopping: finishing SMTP transactions and deliveries in flight")
    await asyncio.gather(gateway.stop(), workers.stop())
    if writer is not None:
        await writer.stop(STAGE_STOP_SECONDS)
    log.info("stopped", extra={"event": "stopped"})
    if failure is not None:
        raise WorkerFailed(failure)


async def _serve_as_worker(
    config: Settings, connections_fd: int, lifeline: int, writes_fd: int | None
) -> None:
    """One of the other workers: serve the connections the first process hands
    over until told to stop, or until the first process is gone."""
    from gateway.app import Gateway

    writes = socket.socket(fileno=writes_fd) if writes_fd is not None else None
    gateway = Gateway(config, writes, socket.socket(fileno=connections_fd))
    await gateway.start()
    try:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        reader, _writer = await announce_ready(lifeline)
        stopped = asyncio.ensure_future(stop.wait())
        orphaned = asyncio.ensure_future(reader.read())
        await asyncio.wait((stopped, orphaned), return_when=asyncio.FIRST_COMPLETED)
        if orphaned.done():
            log.warning("the first cgw serve process is gone: stopping")
        stopped.cancel()
        orphaned.cancel()
    finally:
        await gateway.stop()


def _announce(config: Settings, gateway: Gateway, log_format: LogFormat) -> None:
    delivery = config.delivery.describe()
    if config.delivery.kind == "outbox":
        delivery += f" ({config.outbox_dir})"
    if log_format == "json":
        log.info(
            "Consent Gateway is running.",
            extra={
                "event": "started",
                "listening": {str(li.address): li.label for li in gateway.listeners},
                "delivery": delivery,
                "instance": config.instance_name,
                "workers": config.workers,
            },
        )
        return
    click.echo("Consent Gateway is running.")
    for listener in gateway.listeners:
        click.echo(f"  listening on {listener.address}  {listener.label}")
    if config.workers > 1:
        click.echo(f"  {config.workers} worker processes")
    click.echo(f"  delivering to {delivery}")
    domains = ", ".join(sorted(config.practice_domains)) or "(none set)"
    click.echo(f"  practice domains: {domains}")
    click.echo(client_instructions(config, gateway.listeners))
    click.echo("Stop with Ctrl-C.", nl=True)


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
