"""The audit log: tamper-evident, filterable, and written by concurrent instances."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from consent_registry.db import make_engine, session_scope
from gateway.app import initialise
from gateway.audit import AuditAction, AuditEntry, audit_log
from gateway.settings import Settings
from tests.cli import Run
from tests.conftest import PASSWORD
from tests.gateway import test_policy_enforcement as enforcement
from tests.gateway.test_durability import _wait
from tests.gateway.test_policy_enforcement import _message, _rcpt
from tests.practice import Practice
from tests.runner import GatewayThread

DAY = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)


def _write(settings: Settings, count: int, start: datetime = DAY) -> None:
    log = audit_log(settings)
    engine = make_engine(settings.database_url)
    for n in range(count):
        with session_scope(engine) as session:
            log.record(
                session,
                AuditEntry(
                    AuditAction.CONSENT_GRANTED if n % 2 else AuditAction.MESSAGE_DENIED,
                    actor="drsmith" if n % 3 else "privacy-officer",
                    patient_id=1 + n % 2,
                    recipient=f"p{n}@example.org",
                    reason="NO_CONSENT",
                ),
                start + timedelta(hours=n),
            )
    engine.dispose()


@pytest.fixture
def logged(make_settings: Callable[..., Settings], cgw: Run, tmp_path: Path) -> Settings:
    settings = make_settings(data_dir=tmp_path / "data", timezone="Europe/Berlin")
    initialise(settings)
    _write(settings, 6)
    return settings


def _sql(settings: Settings, *statements: str) -> None:
    engine = make_engine(settings.database_url)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
    engine.dispose()


def _verify(cgw: Run) -> tuple[int, str]:
    result = cgw("audit", "verify")
    return result.returncode, (result.stdout + result.stderr).strip()


def test_an_intact_log_verifies(logged: Settings, cgw: Run) -> None:
    assert _verify(cgw) == (0, "audit log intact: 6 entries")


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (["UPDATE audit_event SET detail = 'harmless' WHERE seq = 3"], "audit entry 3 was changed"),
        (
            ["UPDATE audit_event SET actor = 'someone-else' WHERE seq = 5"],
            "audit entry 5 was changed",
        ),
        (
            ["DELETE FROM audit_event WHERE seq = 4"],
            "audit entry 4 is missing (it was deleted)",
        ),
        (
            ["DELETE FROM audit_event WHERE seq IN (2, 3)"],
            "audit entry 2 is missing (entries 2-3 were deleted)",
        ),
        (
            [
                "UPDATE audit_event SET seq = -1 WHERE seq = 3",
                "UPDATE audit_event SET seq = 3 WHERE seq = 4",
                "UPDATE audit_event SET seq = 4 WHERE seq = -1",
            ],
            "audit entry 3 does not follow entry 2",
        ),
        (
            ["DELETE FROM audit_event WHERE seq = 6"],
            "audit entry 6 is missing (it was deleted)",
        ),
    ],
    ids=["edited", "edited-actor", "deleted", "deleted-two", "swapped", "last-deleted"],
)
def test_tampering_is_caught_and_the_entry_named(
    logged: Settings, cgw: Run, tamper: list[str], message: str
) -> None:
    _sql(logged, *tamper)
    code, output = _verify(cgw)
    assert code == 1
    assert output.startswith(f"cgw: error: {message}"), output


@pytest.mark.parametrize(
    "tamper",
    [
        # Cut the newest entries off and move the head back to the new end.
        [
            "DELETE FROM audit_event WHERE seq > 4",
            "UPDATE audit_head SET seq = 4, hash = (SELECT hash FROM audit_event WHERE seq = 4)",
        ],
        ["DELETE FROM audit_head"],
    ],
    ids=["truncated-and-head-moved", "head-deleted"],
)
def test_cutting_off_the_tail_is_caught_even_with_the_head_moved(
    logged: Settings, cgw: Run, tamper: list[str]
) -> None:
    _sql(logged, *tamper)
    code, output = _verify(cgw)
    assert code == 1, output
    assert "head of the log" in output


def test_a_forged_hash_does_not_help_without_the_key(logged: Settings, cgw: Run) -> None:
    import hashlib

    # Re-hash entry 3 with plain SHA-256, as someone with only the database might.
    _sql(
        logged,
        "UPDATE audit_event SET detail = 'forged' WHERE seq = 3",
        f"UPDATE audit_event SET hash = '{hashlib.sha256(b'forged').hexdigest()}' WHERE seq = 3",
    )
    assert _verify(cgw)[1] == "cgw: error: audit entry 3 was changed"


def test_list_filters_and_exports(logged: Settings, cgw: Run) -> None:
    def listed(*args: str) -> list[int]:
        result = cgw("audit", "list", "--json", *args)
        assert result.returncode == 0, result.stderr
        return [e["seq"] for e in json.loads(result.stdout)]

    assert listed() == [1, 2, 3, 4, 5, 6]
    assert listed("--action", "consent.granted") == [2, 4, 6]
    assert listed("--action", "message.") == [1, 3, 5]
    assert listed("--user", "privacy-officer") == [1, 4]
    # Entries are an hour apart from 09:00 UTC, i.e. 10:00 in Berlin; --since/--until
    # take dates as whole days in CGW_TIMEZONE, or exact ISO times.
    assert listed("--since", "2026-03-10T12:30:00+01:00") == [4, 5, 6]
    assert listed("--until", "2026-03-10T11:00:00+00:00") == [1, 2]
    assert listed("--since", "2026-03-10", "--until", "2026-03-10") == [1, 2, 3, 4, 5, 6]
    assert listed("--until", "2026-03-09") == []
    bad = cgw("audit", "list", "--since", "yesterday")
    assert bad.returncode == 1 and "--since: 'yesterday'" in bad.stderr
    lines = cgw("audit", "export").stdout.splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert all(len(json.loads(line)["hash"]) == 64 for line in lines)
    rows = list(csv.DictReader(io.StringIO(cgw("audit", "export", "--format", "csv").stdout)))
    assert [r["seq"] for r in rows] == ["1", "2", "3", "4", "5", "6", "7"]  # + the first export
    assert rows[6]["action"] == "audit.exported"
    assert _verify(cgw) == (0, "audit log intact: 8 entries")


def _append_many(url: str, data_dir: str, count: int, who: str) -> None:
    settings = Settings(data_dir=Path(data_dir), database_url=url, hostname="t", instance_name=who)
    _write(settings, count, start=DAY)


def test_concurrent_writers_leave_one_linear_chain(
    make_settings: Callable[..., Settings], cgw: Run, database_url: str, tmp_path: Path
) -> None:
    settings = make_settings(data_dir=tmp_path / "data")
    initialise(settings)
    each = 1000 if database_url.startswith("postgresql") else 300
    context = multiprocessing.get_context("spawn")
    writers = [
        context.Process(target=_append_many, args=(database_url, str(settings.data_dir), each, w))
        for w in ("one", "two")
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(300)
        assert writer.exitcode == 0
    assert _verify(cgw) == (0, f"audit log intact: {2 * each} entries")


def test_the_story_of_a_patient_reads_back_in_order(
    practice_gateway: Callable[..., tuple[GatewayThread, Practice]],
    cgw: Run,
) -> None:
    running, practice = practice_gateway()

    def ok(*args: str) -> str:
        result = cgw(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    ok("patient", "add", "--name", "Pia Probe", "--email", "pia@example.org", "--mrn", "P-9")
    ok("relationship", "add", "--patient", "P-9", "--clinician", "drsmith")
    consent = ok(
        "consent", "grant", "--patient", "P-9", "--email", "pia@example.org", "--delivery", "tls"
    )
    client = running.logged_in("drsmith", PASSWORD)
    client.sendmail(enforcement.SENDER, ["pia@example.org"], _message("pia@example.org"))
    client.quit()
    _wait(lambda: any(r.state == "delivered" for r in practice.queue()), "the delivery")
    ok("consent", "revoke", consent, "--reason", "patient asked")
    code, _ = _rcpt(running, "pia@example.org")
    assert code == 550
    story = [
        (e["action"], e["reason"], e["actor"])
        for e in json.loads(ok("audit", "list", "--patient", "pia@example.org", "--json"))
    ]
    assert [(action, reason) for action, reason, _ in story] == [
        ("patient.added", None),
        ("relationship.added", None),
        ("consent.granted", None),
        ("message.accepted", "PATIENT_CONSENTED"),
        ("message.delivered", None),
        ("consent.revoked", None),
        ("message.denied", "CONSENT_REVOKED"),
    ]
    assert {actor for action, _, actor in story if action == "message.accepted"} == {"drsmith"}
    assert ok("audit", "verify").startswith("audit log intact")
