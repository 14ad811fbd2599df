"""The ``cgw`` command line with an admin's arguments, on a real database."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import uvloop
from sqlmodel import Session, select

from consent_registry.db import make_engine
from consent_registry.models import AuditEvent
from gateway.cli import serve
from tests.cli import Run

PASSWORD = "a long enough password"


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _actions(database_url: str) -> list[tuple[str, str, str | None]]:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            rows = session.exec(select(AuditEvent).order_by(AuditEvent.seq)).all()
            return [(r.action, r.actor, r.username) for r in rows]
    finally:
        engine.dispose()


def test_help_lists_the_commands(cgw_process: Run) -> None:
    result = cgw_process("--help")
    assert result.returncode == 0
    for command in ("init", "serve", "config", "user"):
        assert command in result.stdout


def test_init_prepares_everything_once_and_never_overwrites(
    cgw_process: Run, tmp_path: Path
) -> None:
    first = cgw_process("init")
    assert first.returncode == 0, first.stderr
    assert "created  storage key" in first.stdout
    assert "created  self-signed TLS certificate" in first.stdout
    assert "Connection security:  STARTTLS" in first.stdout
    key = tmp_path / "data" / "keys" / "storage.key"
    cert = tmp_path / "data" / "tls" / "dev-cert.pem"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    before = key.read_bytes(), cert.read_bytes()
    second = cgw_process("init")
    assert second.returncode == 0, second.stderr
    assert "created" not in second.stdout
    assert (key.read_bytes(), cert.read_bytes()) == before


@pytest.mark.usefixtures("blank_database")
def test_commands_before_init_say_what_to_do(cgw: Run) -> None:
    result = cgw("user", "list")
    assert result.returncode == 1
    assert "run 'cgw init'" in _error_line(result)


def test_config_show_masks_secrets(cgw: Run) -> None:
    result = cgw(
        "config",
        "show",
        "--json",
        extra={
            "CGW_DELIVERY": "smtp://relay:hunter2secret@smtp.example:587",
            "CGW_STORAGE_KEY": "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY=",
        },
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["CGW_DELIVERY"] == "smtp://relay:****@smtp.example:587?tls=starttls"
    assert shown["CGW_STORAGE_KEY"] == "****"
    assert "hunter2secret" not in result.stdout
    table = cgw("config", "show")
    assert "CGW_MAX_MESSAGE_SIZE" in table.stdout and "26214400" in table.stdout


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CGW_MAX_RECIPIENTS", "0", "invalid setting CGW_MAX_RECIPIENTS:"),
        ("CGW_DELIVERY", "smtp://relay:25?tls=none", "invalid setting CGW_DELIVERY:"),
        ("CGW_PRACTISE_DOMAINS", "typo.example", "invalid setting CGW_PRACTISE_DOMAINS: unknown"),
    ],
)
def test_bad_settings_stop_with_one_line(cgw: Run, name: str, value: str, message: str) -> None:
    for command in (("config", "show"), ("serve",)):
        result = cgw(*command, extra={name: value})
        assert result.returncode == 1
        assert _error_line(result).startswith(f"cgw: error: {message}")


def test_user_lifecycle_is_recorded_in_the_audit_log(initialised: Run, database_url: str) -> None:
    cgw = initialised
    added = cgw(
        "user",
        "add",
        "drsmith",
        "--address",
        "Dr.Smith@Praxis.Example",
        "--address",
        "smith@praxis.example",
        "--password-stdin",
        "--actor",
        "it-admin",
        stdin=PASSWORD,
    )
    assert added.returncode == 0, added.stderr
    assert "added user drsmith (clinician)" in added.stdout
    listed = cgw("user", "list", "--json")
    (user,) = json.loads(listed.stdout)
    assert user["addresses"] == ["Dr.Smith@Praxis.Example", "smith@praxis.example"]
    assert (user["role"], user["disabled"]) == ("clinician", False)
    table = cgw("user", "list").stdout
    assert table.splitlines()[0].split() == ["USERNAME", "ROLE", "ADDRESSES", "DISABLED", "CREATED"]
    assert (
        cgw(
            "user", "passwd", "drsmith", "--password-stdin", stdin="another long password"
        ).returncode
        == 0
    )
    assert cgw("user", "disable", "drsmith").returncode == 0
    assert json.loads(cgw("user", "list", "--json").stdout)[0]["disabled"] is True
    actions = _actions(database_url)
    assert [a for a, _, _ in actions] == ["user.added", "user.password_changed", "user.disabled"]
    assert actions[0][1] == "it-admin"
    assert all(username == "drsmith" for _, _, username in actions)


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (
            ["user", "add", "bad name", "--address", "a@praxis.example"],
            PASSWORD,
            "user name 'bad name'",
        ),
        (
            ["user", "add", "x", "--address", "not-an-address"],
            PASSWORD,
            "the address must have the form",
        ),
        (["user", "add", "x", "--address", "a@praxis.example"], "short", "at least 10 characters"),
        (
            ["user", "add", "x", "--address", "a@praxis.example"],
            "",
            "no password on standard input",
        ),
        (
            ["user", "add", "x", "--address", "a@praxis.example", "--address", "A@praxis.example"],
            PASSWORD,
            "the same address is given twice",
        ),
        (["user", "disable", "nobody"], "", "no user 'nobody'"),
        (["user", "passwd", "nobody"], PASSWORD, "no user 'nobody'"),
    ],
)
def test_bad_user_input_is_one_line_and_exit_1(
    initialised: Run, database_url: str, args: list[str], stdin: str, message: str
) -> None:
    if "--password-stdin" not in args and args[:2] != ["user", "disable"]:
        args = [*args, "--password-stdin"]
    result = initialised(*args, stdin=stdin)
    assert result.returncode == 1, result.stdout
    assert message in _error_line(result)
    assert _actions(database_url) == []  # nothing written


def test_duplicates_and_double_disable_are_refused(initialised: Run) -> None:
    cgw = initialised
    assert (
        cgw(
            "user", "add", "a", "--address", "a@praxis.example", "--password-stdin", stdin=PASSWORD
        ).returncode
        == 0
    )
    again = cgw(
        "user", "add", "a", "--address", "b@praxis.example", "--password-stdin", stdin=PASSWORD
    )
    assert "user 'a' already exists" in _error_line(again)
    taken = cgw(
        "user", "add", "b", "--address", "A@Praxis.Example", "--password-stdin", stdin=PASSWORD
    )
    assert "is a staff address of user 'a'" in _error_line(taken)
    assert cgw("user", "disable", "a").returncode == 0
    twice = cgw("user", "disable", "a")
    assert twice.returncode == 1
    assert "already disabled" in _error_line(twice)


def test_usage_errors_exit_2(initialised: Run, cgw_process: Run) -> None:
    result = cgw_process("user", "add", "x")
    assert result.returncode == 2
    assert "--address" in result.stderr


def test_serve_runs_on_uvloop_where_it_is_installed() -> None:
    """``cgw serve``'s loop: uvloop's (a sixth less CPU a message), asyncio's without it."""
    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        loops.append(asyncio.get_running_loop())

    serve._run(main())
    assert isinstance(loops[0], uvloop.Loop)
    sys.modules["uvloop"] = None  # type: ignore[assignment]  # as where it is not installed
    try:
        serve._run(main())
    finally:
        sys.modules["uvloop"] = uvloop
    assert not isinstance(loops[1], uvloop.Loop)
