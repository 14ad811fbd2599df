"""What every command needs: settings, the database, the acting person."""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import Session

from consent_registry.db import make_engine, schema_is_current, session_scope
from consent_registry.errors import RegistryError
from gateway.cli.output import CliError
from gateway.settings import Settings, SettingsError, load_settings


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


def now() -> datetime:
    return datetime.now(UTC)


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
        except SQLAlchemyError as exc:
            raise CliError(f"database error: {type(exc).__name__}: {exc}") from None
