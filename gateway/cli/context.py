"""What every command needs: settings, the database, the acting person."""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime

import click
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlmodel import Session

from consent_registry.db import driver_error, make_engine, schema_is_current, session_scope
from consent_registry.errors import RegistryError
from gateway.audit import AuditLog, audit_log
from gateway.cli.output import CliError
from gateway.crypto_at_rest import SealError, StorageKey, storage_key
from gateway.settings import Settings, SettingsError, load_settings
from policies.status import practice_day


def settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise CliError(str(exc)) from None


def default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def audit(config: Settings) -> AuditLog:
    """The audit log, keyed for this installation (never a new key: see ``cgw init``)."""
    try:
        return audit_log(config, create=False)
    except (SealError, OSError) as exc:
        raise CliError(f"audit key: {exc}") from None


def storage(config: Settings) -> StorageKey:
    """The key that opens the spool (never a new one)."""
    try:
        return storage_key(config, create=False)[0]
    except (SealError, OSError) as exc:
        raise CliError(f"storage key: {exc}") from None


def now() -> datetime:
    return datetime.now(UTC)


actor_option = click.option(
    "--actor", default=default_actor, show_default="the OS user", help="Who makes the change."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def parse_day(value: str | None, option: str, config: Settings) -> date:
    """An ISO date from the command line; today at the practice when omitted."""
    if value is None:
        return practice_day(now(), config.zone)
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise CliError(f"{option}: {value!r} is not a date (YYYY-MM-DD)") from None


@contextmanager
def registry(config: Settings) -> Iterator[Engine]:
    """An engine on an initialised database, or a clear error."""
    engine = make_engine(config.database_url)
    try:
        try:
            current = schema_is_current(engine)
        except OperationalError as exc:
            raise CliError(f"database unreachable: {exc.orig}") from None
        if not current:
            raise CliError("the database is not initialised or not up to date; run 'cgw init'")
        yield engine
    finally:
        engine.dispose()


@contextmanager
def transaction(config: Settings) -> Iterator[Session]:
    """One all-or-nothing change: registry errors become CLI errors."""
    with registry(config) as engine:
        try:
            with session_scope(engine) as session:
                yield session
        except RegistryError as exc:
            raise CliError(str(exc)) from None
        except IntegrityError:
            raise CliError("the record changed meanwhile (another change won); try again") from None
        except SQLAlchemyError as exc:
            kind, first_line = driver_error(exc)
            raise CliError(f"database error: {kind}: {first_line}") from None
