"""Fixtures: a database per test (SQLite and PostgreSQL), settings, a running gateway."""

from __future__ import annotations

import os
import secrets
import ssl
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from consent_registry.db import make_engine, migrate, session_scope
from consent_registry.users import add_user
from gateway.app import initialise
from gateway.settings import Settings
from tests.cli import Run, as_process, cgw_env, in_process
from tests.pki import TestCA
from tests.runner import GatewayThread
from tests.sink import Sink

POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
PASSWORD = "correct horse battery staple"
DOMAIN = "praxis.example"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CGW_* from the caller's shell, no cgw.toml from the working directory."""
    for name in list(os.environ):
        if name.startswith("CGW_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


class PostgresDatabases:
    """Per-test databases cloned from one migrated template."""

    def __init__(self, admin_url: str) -> None:
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.template = f"cgw_tmpl_{secrets.token_hex(4)}"
        self.created: list[str] = []
        self._dropper = ThreadPoolExecutor(1, thread_name_prefix="drop-test-database")
        self._dropping: list[Future[None]] = []
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.template}"'))
        engine = make_engine(self.url(self.template))
        migrate(engine)
        engine.dispose()

    def url(self, name: str) -> str:
        return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)

    def new(self, migrated: bool = True) -> str:
        name = f"cgw_t_{secrets.token_hex(5)}"
        template = self.template if migrated else "template0"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
        self.created.append(name)
        return self.url(name)

    def discard(self, url: str) -> None:
        """Drop a test's database in the background while the next tests run:
        a drop waits for a checkpoint, and all of them at the end of the
        session took 15 s on one worker."""
        name = make_url(url).database
        assert name in self.created
        self.created.remove(name)
        self._dropping.append(self._dropper.submit(self.drop, name))

    def drop(self, name: str) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def close(self) -> None:
        for name in [*self.created, self.template]:
            self._dropping.append(self._dropper.submit(self.drop, name))
        self._dropper.shutdown(wait=True)
        for dropped in self._dropping:
            dropped.result()  # a drop that failed says so
        self.admin.dispose()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresDatabases | str]:
    """The per-test database maker, or why PostgreSQL cannot be used here."""
    try:
        engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 5})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # any failure to reach it means: skip, and say why
        yield f"PostgreSQL not reachable at {make_url(POSTGRES_URL).host}: {type(exc).__name__}"
        return
    databases = PostgresDatabases(POSTGRES_URL)
    yield databases
    databases.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres: PostgresDatabases | str
) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'cgw.db'}"
        return
    if isinstance(postgres, str):
        pytest.skip(postgres)
    url = postgres.new(migrated="blank_database" not in request.fixturenames)
    yield url
    postgres.discard(url)


@pytest.fixture
def second_database_url(
    database_url: str, tmp_path: Path, postgres: PostgresDatabases | str
) -> Iterator[str]:
    """Another empty, migrated database on the same backend as ``database_url``."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'second' / 'cgw.db'}"
        return
    assert not isinstance(postgres, str)
    url = postgres.new()
    yield url
    postgres.discard(url)


@pytest.fixture
def blank_database() -> None:
    """Ask for this beside ``database_url`` to get a database with no schema yet."""


@pytest.fixture(scope="session")
def test_ca() -> TestCA:
    return TestCA("cgw test CA")


@pytest.fixture(scope="session")
def ca_file(test_ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    path.write_bytes(test_ca.cert_pem)
    return path


@pytest.fixture(scope="session")
def sink_tls(test_ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    cert, key = test_ca.server(["127.0.0.1", "localhost"]).write(
        tmp_path_factory.mktemp("sink"), "sink"
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture
def make_settings(tmp_path: Path, database_url: str) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "database_url": database_url,
            "hostname": "gateway.test",
            "instance_name": "test-instance",
            "submission_listen": "127.0.0.1:0",
            "smtps_listen": "127.0.0.1:0",
            "practice_domains": DOMAIN,
            "auth_backoff": "0s",
            "delivery_timeout": "10s",
        }
        values.update(overrides)
        return Settings(**values)

    return build


def create_user(
    settings: Settings, username: str, addresses: list[str], role: str = "clinician"
) -> None:
    engine = make_engine(settings.database_url)
    try:
        with session_scope(engine) as session:
            add_user(session, username, addresses, role, PASSWORD, "test", datetime.now(UTC))
    finally:
        engine.dispose()


@pytest.fixture
def sink(sink_tls: ssl.SSLContext) -> Iterator[Sink]:
    running = Sink(sink_tls).start()
    yield running
    running.stop()


@pytest.fixture
def start_gateway() -> Iterator[Callable[[Settings], GatewayThread]]:
    started: list[GatewayThread] = []

    def start(settings: Settings) -> GatewayThread:
        initialise(settings)
        create_user(settings, "drsmith", [f"dr.smith@{DOMAIN}"])
        running = GatewayThread(settings).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def gateway(
    sink: Sink,
    ca_file: Path,
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
) -> GatewayThread:
    """A gateway relaying over verified STARTTLS to the test sink."""
    return start_gateway(
        make_settings(delivery=f"smtp://127.0.0.1:{sink.port}", delivery_ca_file=ca_file)
    )


@pytest.fixture
def serve_env(
    make_settings: Callable[..., Settings], ca_file: Path
) -> Iterator[Callable[..., dict[str, str]]]:
    def build(settings: Settings, delivery: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CGW_")}
        env.update(
            CGW_DATA_DIR=str(settings.data_dir),
            CGW_DATABASE_URL=settings.database_url,
            CGW_HOSTNAME="gateway.test",
            CGW_INSTANCE_NAME="crash-test",
            CGW_SUBMISSION_LISTEN="127.0.0.1:0",
            CGW_SMTPS_LISTEN="",
            CGW_PRACTICE_DOMAINS=DOMAIN,
            CGW_DELIVERY=delivery,
            CGW_DELIVERY_CA_FILE=str(ca_file),
            CGW_DELIVERY_TIMEOUT="10s",
        )
        return env

    yield build


def _cgw_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return cgw_env(
        CGW_DATA_DIR=str(tmp_path / "data"),
        CGW_DATABASE_URL=database_url,
        CGW_HOSTNAME="gateway.test",
    )


@pytest.fixture
def cgw(tmp_path: Path, database_url: str) -> Run:
    """``cgw`` on this test's database, run in the test process (tests/cli.py says why)."""
    return in_process(_cgw_env(tmp_path, database_url), tmp_path)


@pytest.fixture
def cgw_process(tmp_path: Path, database_url: str) -> Run:
    """``cgw`` as a subprocess, the way an admin runs it, on this test's database."""
    return as_process(_cgw_env(tmp_path, database_url), tmp_path)


@pytest.fixture
def initialised(cgw: Run) -> Run:
    result = cgw("init")
    assert result.returncode == 0, result.stderr
    return cgw
