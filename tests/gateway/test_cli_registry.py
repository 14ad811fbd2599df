"""``cgw patient``, ``relationship`` and ``consent``, with an admin's arguments and input.

Every command and every refusal from the registry issue: exit codes, the one
line on stderr, and that a refused change writes nothing (not even an audit
entry).
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlmodel import Session, select

from consent_registry.db import make_engine, migrate, session_scope
from consent_registry.models import AuditEvent, Consent
from consent_registry.users import add_user
from gateway.audit import audit_key
from gateway.settings import Settings
from tests.cli import Run, cgw_env, in_process

PASSWORD = "a long enough password"


def _runner(tmp_path: Path, database_url: str, data: str = "data") -> Run:
    # The audit key, as 'cgw init' makes it: admin commands never make keys.
    audit_key(Settings(data_dir=tmp_path / data, database_url=database_url))
    env = cgw_env(
        CGW_DATA_DIR=str(tmp_path / data),
        CGW_DATABASE_URL=database_url,
        CGW_HOSTNAME="gateway.test",
        CGW_TIMEZONE="Europe/Berlin",
    )
    return in_process(env, tmp_path)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def _refused(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cgw: error: "), result.stderr
    assert message in lines[0], lines[0]


def _practice(run: Run, database_url: str) -> Run:
    """Schema and staff, set up directly: ``cgw init`` and ``cgw user`` have their own tests."""
    engine = make_engine(database_url)
    migrate(engine)
    with session_scope(engine) as session:
        for name, role in (("drsmith", "clinician"), ("drjones", "clinician"), ("nurse", "staff")):
            add_user(
                session, name, [f"{name}@praxis.example"], role, PASSWORD, "test", datetime.now(UTC)
            )
    engine.dispose()
    return run


@pytest.fixture
def cgw(tmp_path: Path, database_url: str) -> Run:
    return _practice(_runner(tmp_path, database_url), database_url)


def _audit(database_url: str) -> list[AuditEvent]:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            return list(session.exec(select(AuditEvent).order_by(AuditEvent.seq)).all())
    finally:
        engine.dispose()


def _count(database_url: str, action: str) -> int:
    return sum(1 for event in _audit(database_url) if event.action == action)


def _anna(cgw: Run) -> str:
    return _ok(
        cgw(
            "patient",
            "add",
            "--name",
            "Anna Muster",
            "--email",
            "anna@example.org",
            "--email",
            "anna.work@example.net",
            "--mrn",
            "A-100",
        )
    ).strip()


# --- patients ----------------------------------------------------------------------------------


def test_patient_add_prints_the_id_and_is_found_by_id_mrn_or_address(
    cgw: Run, database_url: str
) -> None:
    patient_id = _anna(cgw)
    assert patient_id.isdigit()
    for ref in (
        patient_id,
        "A-100",
        "mrn:A-100",
        f"id:{patient_id}",
        "ANNA+clinic@Example.org",
        "anna.work@example.net",
    ):
        shown = json.loads(_ok(cgw("patient", "show", ref, "--json")))
        assert shown["id"] == int(patient_id), ref
    assert shown["addresses"] == ["anna@example.org", "anna.work@example.net"]
    listed = json.loads(_ok(cgw("patient", "list", "--json")))
    assert [p["name"] for p in listed] == ["Anna Muster"]
    assert _count(database_url, "patient.added") == 1


def test_an_mrn_that_is_another_patients_id_must_be_disambiguated(cgw: Run) -> None:
    first = _anna(cgw)
    _ok(cgw("patient", "add", "--name", "Bob", "--email", "bob@example.org", "--mrn", first + "0"))
    second = _ok(
        cgw("patient", "add", "--name", "Carl", "--email", "carl@example.org", "--mrn", first)
    ).strip()
    _refused(cgw("patient", "show", first), f"say id:{first} or mrn:{first}")
    assert json.loads(_ok(cgw("patient", "show", f"mrn:{first}", "--json")))["id"] == int(second)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "X", "--email", "anna@example.org"], "already belongs to patient"),
        (["--name", "X", "--email", "Anna+Home@EXAMPLE.org"], "already belongs to patient"),
        (["--name", "X", "--email", "drsmith@praxis.example"], "staff address of user 'drsmith'"),
        (["--name", "X", "--email", "x@example.org", "--mrn", "A-100"], "MRN 'A-100' already"),
        (["--name", "X", "--email", "x@example.org", "--mrn", "bad mrn"], "MRN 'bad mrn' must"),
        (["--name", " ", "--email", "x@example.org"], "name must not be empty"),
        (["--name", "X", "--email", "x@@example.org"], "more than one '@'"),
    ],
)
def test_bad_patients_are_refused(
    cgw: Run, database_url: str, args: list[str], message: str
) -> None:
    _anna(cgw)
    _refused(cgw("patient", "add", *args), message)
    assert len(json.loads(_ok(cgw("patient", "list", "--json")))) == 1
    assert _count(database_url, "patient.added") == 1


def test_patient_add_email_and_unknown_patients(cgw: Run, database_url: str) -> None:
    patient_id = _anna(cgw)
    _ok(cgw("patient", "add-email", "A-100", "anna.mobile@example.com"))
    shown = json.loads(_ok(cgw("patient", "show", "anna.mobile@example.com", "--json")))
    assert shown["id"] == int(patient_id)
    _refused(cgw("patient", "add-email", "A-100", "nurse@praxis.example"), "staff address")
    _refused(cgw("patient", "show", "nobody@example.org"), "no patient 'nobody@example.org'")
    _refused(cgw("patient", "show", "999"), "no patient '999'")
    assert _count(database_url, "patient.email_added") == 1


# --- relationships -----------------------------------------------------------------------------


def test_relationship_lifecycle(cgw: Run, database_url: str) -> None:
    _anna(cgw)
    rel = _ok(
        cgw(
            "relationship",
            "add",
            "--patient",
            "A-100",
            "--clinician",
            "drsmith",
            "--since",
            "2025-02-01",
            "--kind",
            "specialist",
        )
    ).strip()
    (listed,) = json.loads(_ok(cgw("relationship", "list", "--patient", "A-100", "--json")))
    assert (listed["clinician"], listed["kind"], listed["since"], listed["status"]) == (
        "drsmith",
        "specialist",
        "2025-02-01",
        "active",
    )
    _refused(
        cgw("relationship", "add", "--patient", "A-100", "--clinician", "drsmith"),
        f"already has relationship {rel} with 'drsmith'; end it first",
    )
    _refused(
        cgw("relationship", "end", rel, "--on", "2025-01-31"),
        "cannot end on 2025-01-31, before it began on 2025-02-01",
    )
    _ok(cgw("relationship", "end", rel, "--on", "2025-06-30"))
    (ended,) = json.loads(_ok(cgw("relationship", "list", "--json")))
    assert (ended["ended_on"], ended["status"]) == ("2025-06-30", "ended")
    _refused(cgw("relationship", "end", rel), "already ended on 2025-06-30")
    _ok(cgw("relationship", "add", "--patient", "A-100", "--clinician", "drsmith"))  # anew
    assert [e.action for e in _audit(database_url) if e.action.startswith("relationship")] == [
        "relationship.added",
        "relationship.ended",
        "relationship.added",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--clinician", "nurse"], "user 'nurse' is staff, not a clinician"),
        (["--clinician", "nobody"], "no user 'nobody'"),
        (
            ["--clinician", "drsmith", "--since", "2025-13-01"],
            "--since: '2025-13-01' is not a date",
        ),
    ],
)
def test_bad_relationships_are_refused(
    cgw: Run, database_url: str, args: list[str], message: str
) -> None:
    _anna(cgw)
    _refused(cgw("relationship", "add", "--patient", "A-100", *args), message)
    assert json.loads(_ok(cgw("relationship", "list", "--json"))) == []
    assert _count(database_url, "relationship.added") == 0


def test_ending_an_unknown_relationship(cgw: Run) -> None:
    _refused(cgw("relationship", "end", "42"), "no relationship 42")


# --- consents ----------------------------------------------------------------------------------


def test_consent_grant_list_and_revoke(cgw: Run, database_url: str) -> None:
    _anna(cgw)
    practice = _ok(
        cgw(
            "consent",
            "grant",
            "--patient",
            "A-100",
            "--email",
            "Anna@Example.org",
            "--method",
            "electronic",
            "--evidence",
            "EHR form 17",
        )
    ).strip()
    mine = _ok(
        cgw(
            "consent",
            "grant",
            "--patient",
            "A-100",
            "--email",
            "anna.work@example.net",
            "--clinician",
            "drsmith",
            "--delivery",
            "plain",
            "--risk-acknowledged",
            "--from",
            "2020-01-01",
            "--expires",
            "2021-01-01",
        )
    ).strip()
    future = _ok(
        cgw(
            "consent",
            "grant",
            "--patient",
            "A-100",
            "--email",
            "anna.work@example.net",
            "--clinician",
            "drjones",
            "--delivery",
            "tls",
            "--from",
            "2099-01-01",
        )
    ).strip()
    views = {v["id"]: v for v in json.loads(_ok(cgw("consent", "list", "--json")))}
    assert views[int(practice)]["status"] == "active"
    assert views[int(practice)]["clinician"] is None
    assert views[int(practice)]["email"] == "Anna@Example.org"  # kept as written
    assert views[int(mine)]["status"] == "expired"
    assert views[int(future)]["status"] == "not-yet-valid"
    assert [
        v["id"] for v in json.loads(_ok(cgw("consent", "list", "--status", "expired", "--json")))
    ] == [int(mine)]
    _ok(cgw("consent", "revoke", practice, "--reason", "patient asked by phone", "--actor", "po"))
    (revoked,) = json.loads(_ok(cgw("consent", "list", "--status", "revoked", "--json")))
    assert (revoked["revoked_by"], revoked["revoke_reason"]) == ("po", "patient asked by phone")
    _refused(cgw("consent", "revoke", practice), f"consent {practice} was already revoked")
    _refused(cgw("consent", "revoke", "999"), "no consent 999")
    events = _audit(database_url)
    assert [e.action for e in events if e.action.startswith("consent")] == [
        "consent.granted"
    ] * 3 + ["consent.revoked"]
    assert events[-1].consent_id == int(practice) and events[-1].actor == "po"
    table = _ok(cgw("consent", "list", "--patient", "anna@example.org"))
    assert table.splitlines()[0].split()[:3] == ["ID", "PATIENT", "EMAIL"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "consent 1 already covers anna@example.org for the same grantee"),
        (["--email", "ANNA+x@example.org"], "consent 1 already covers"),
        (["--email", "other@example.org"], "not a registered address of patient"),
        (["--clinician", "nurse"], "user 'nurse' is staff, not a clinician"),
        (["--delivery", "plain"], "needs the patient's acknowledgement of the risk"),
        (["--risk-acknowledged"], "only goes with plain delivery"),
        (["--from", "2026-05-01", "--expires", "2026-05-01"], "must be after from"),
        (["--expires", "tomorrow"], "--expires: 'tomorrow' is not a date"),
        (["--patient", "nobody@example.org"], "no patient 'nobody@example.org'"),
    ],
)
def test_bad_consents_are_refused_and_nothing_is_written(
    cgw: Run, database_url: str, args: list[str], message: str
) -> None:
    _anna(cgw)
    _ok(cgw("consent", "grant", "--patient", "A-100", "--email", "anna@example.org"))
    base = {"--patient": "A-100", "--email": "anna@example.org"}
    for flag in ("--patient", "--email"):
        if flag in args:
            base[flag] = args[args.index(flag) + 1]
    rest = [a for i, a in enumerate(args) if a not in base and (i == 0 or args[i - 1] not in base)]
    _refused(cgw("consent", "grant", *[x for kv in base.items() for x in kv], *rest), message)
    assert len(json.loads(_ok(cgw("consent", "list", "--json")))) == 1
    assert _count(database_url, "consent.granted") == 1


def test_clinician_specific_consent_does_not_duplicate_a_practice_wide_one(cgw: Run) -> None:
    _anna(cgw)
    _ok(cgw("consent", "grant", "--patient", "A-100", "--email", "anna@example.org"))
    _ok(
        cgw(
            "consent",
            "grant",
            "--patient",
            "A-100",
            "--email",
            "anna@example.org",
            "--clinician",
            "drsmith",
        )
    )
    revoked = _ok(
        cgw("consent", "grant", "--patient", "A-100", "--email", "anna.work@example.net")
    ).strip()
    _ok(cgw("consent", "revoke", revoked))
    _ok(cgw("consent", "grant", "--patient", "A-100", "--email", "anna.work@example.net"))


# --- import and export -------------------------------------------------------------------------

HEADER = "patient,patient_name,email,clinician,valid_from,expires,delivery,risk_acknowledged\n"


def _big_csv(rows: int, bad_line: int | None = None) -> str:
    lines = [HEADER]
    for n in range(rows):
        line = n + 2
        day = "2026-02-30" if line == bad_line else "2026-01-15"
        clinician = "drsmith" if n % 3 == 0 else ""
        lines.append(f"M{n:06d},Patient {n},p{n}@example.org,{clinician},{day},,encrypted,false\n")
    return "".join(lines)


def test_import_of_10000_rows_and_a_bad_row_in_the_middle(
    cgw: Run, database_url: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(_big_csv(10_000, bad_line=5_001))
    _refused(
        cgw("consent", "import", str(bad)),
        "line 5001, field valid_from: '2026-02-30' is not YYYY-MM-DD",
    )
    assert json.loads(_ok(cgw("patient", "list", "--json"))) == []
    good = tmp_path / "good.csv"
    good.write_text(_big_csv(10_000))
    started = time.monotonic()
    out = _ok(cgw("consent", "import", str(good)))
    print(
        f"\n10,000-row CSV import on {database_url.split(':')[0]}: "
        f"{time.monotonic() - started:.1f} s"
    )  # a figure, not an assertion
    assert out.strip() == f"imported 10000 consents from {good}"
    engine = make_engine(database_url)
    with Session(engine) as session:
        assert len(session.exec(select(Consent.id)).all()) == 10_000
    engine.dispose()
    assert _count(database_url, "consent.granted") == 10_000


def test_a_bad_value_deep_in_a_row_names_line_and_field(cgw: Run, tmp_path: Path) -> None:
    _anna(cgw)
    sheet = tmp_path / "c.csv"
    sheet.write_text(
        HEADER + "A-100,,anna@example.org,,2026-01-01,,encrypted,false\n"
        "A-100,,anna.work@example.net,nurse,2026-01-01,,encrypted,false\n"
    )
    _refused(
        cgw("consent", "import", str(sheet)),
        "line 3, field clinician: user 'nurse' is staff, not a clinician; nothing imported",
    )
    sheet.write_text(HEADER + "A-100,,anna@example.org,,2026-01-01,,encrypted,maybe\n")
    _refused(cgw("consent", "import", str(sheet)), "line 2, field risk_acknowledged")
    sheet.write_text("patient,colour\nA-100,blue\n")
    _refused(cgw("consent", "import", str(sheet)), "line 1: unknown column 'colour'")
    sheet.write_text(
        HEADER + "A-100,,anna@example.org,,2026-01-01,,encrypted,false\n"
        "A-100,,anna@example.org,,2026-03-01,,encrypted,false\n"
    )
    _refused(
        cgw("consent", "import", str(sheet)),
        "line 3, field email: another row of this import already covers",
    )
    assert json.loads(_ok(cgw("consent", "list", "--json"))) == []


@pytest.mark.parametrize("fmt", ["csv", "fhir"])
def test_export_then_import_round_trips_losslessly(
    cgw: Run, tmp_path: Path, database_url: str, second_database_url: str, fmt: str
) -> None:
    _anna(cgw)
    _ok(
        cgw(
            "patient",
            "add",
            "--name",
            "Bob Beispiel",
            "--email",
            "bob@example.org",
            "--mrn",
            "B-200",
        )
    )
    first = _ok(
        cgw(
            "consent",
            "grant",
            "--patient",
            "A-100",
            "--email",
            "anna@example.org",
            "--evidence",
            'form, signed "in person"',
            "--expires",
            "2030-01-01",
        )
    ).strip()
    _ok(
        cgw(
            "consent",
            "grant",
            "--patient",
            "A-100",
            "--email",
            "anna.work@example.net",
            "--clinician",
            "drsmith",
            "--delivery",
            "plain",
            "--risk-acknowledged",
            "--method",
            "verbal",
            "--from",
            "2024-03-01",
        )
    )
    _ok(
        cgw(
            "consent",
            "grant",
            "--patient",
            "B-200",
            "--email",
            "bob@example.org",
            "--delivery",
            "tls",
            "--actor",
            "privacy-officer",
        )
    )
    _ok(cgw("consent", "revoke", first, "--reason", "moved away"))
    exported = _ok(cgw("consent", "export", "--format", fmt))
    dump = tmp_path / ("consents.json" if fmt == "fhir" else "consents.csv")
    dump.write_text(exported)

    other = _practice(_runner(tmp_path, second_database_url, data="other"), second_database_url)
    _ok(other("consent", "import", str(dump), "--format", fmt))
    assert _ok(other("consent", "export", "--format", fmt)) == exported
    before = json.loads(_ok(cgw("consent", "list", "--json")))
    after = json.loads(_ok(other("consent", "list", "--json")))
    drop = {"id", "patient_id"}
    assert [{k: v for k, v in c.items() if k not in drop} for c in after] == [
        {k: v for k, v in c.items() if k not in drop} for c in before
    ]
    assert _count(database_url, "consent.exported") == 1


def test_fhir_import_refusals_name_the_entry(cgw: Run, tmp_path: Path) -> None:
    bundle = tmp_path / "b.json"
    bundle.write_text(
        json.dumps(
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": {"resourceType": "Patient"}}],
            }
        )
    )
    _refused(cgw("consent", "import", str(bundle)), "entry 1, field resourceType: not a Consent")
    bundle.write_text("{not json")
    _refused(cgw("consent", "import", str(bundle)), "not JSON")
