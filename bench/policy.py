"""Policy decision cost with 1,000,000 consents in the registry.

    .venv/bin/python bench/policy.py [--consents 1000000] [--lookups 20000] [--database-url URL]

Builds a registry in a temporary SQLite file (or the given database, which
must be empty): 500,000 patients with two addresses each, one consent per
address (a mix of practice-wide and clinician-specific, some revoked or
expired), one relationship per patient. Then it times what the RCPT hook
does for one recipient: the registry lookup (``PolicyGate.decide``: four
indexed queries) plus the decision, for random recipients, and prints
decisions per second and latency percentiles. Writes the figures to
bench/results-policy.json. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from consent_registry.addresses import parse_address
from consent_registry.db import make_engine, migrate
from consent_registry.models import Consent, Patient, PatientAddress, Relationship, User
from gateway.policy_gate import PolicyGate
from policies.facts import PolicySettings, Role, SenderFacts

CHUNK = 20_000


def build(url: str, consents: int) -> int:
    engine = make_engine(url)
    migrate(engine)
    now = datetime.now(UTC)
    patients = consents // 2
    with engine.begin() as conn:
        conn.execute(
            insert(User),
            [
                {
                    "id": i,
                    "username": f"dr{i}",
                    "role": "clinician",
                    "password_hash": "x",
                    "disabled": False,
                    "created_at": now,
                    "created_by": "bench",
                }
                for i in range(1, 51)
            ],
        )
        for start in range(0, patients, CHUNK):
            ids = range(start + 1, min(start + CHUNK, patients) + 1)
            conn.execute(
                insert(Patient),
                [
                    {
                        "id": p,
                        "name": f"Patient {p}",
                        "mrn": f"M{p}",
                        "created_at": now,
                        "created_by": "bench",
                    }
                    for p in ids
                ],
            )
            conn.execute(
                insert(PatientAddress),
                [
                    {
                        "patient_id": p,
                        "address": f"p{p}.{n}@example.org",
                        "address_key": f"p{p}.{n}@example.org",
                        "added_at": now,
                        "added_by": "bench",
                    }
                    for p in ids
                    for n in (1, 2)
                ],
            )
            conn.execute(
                insert(Relationship),
                [
                    {
                        "patient_id": p,
                        "clinician_id": 1 + p % 50,
                        "kind": "primary",
                        "since": date(2020, 1, 1),
                        "recorded_at": now,
                        "recorded_by": "bench",
                    }
                    for p in ids
                ],
            )
            conn.execute(
                insert(Consent),
                [
                    {
                        "patient_id": p,
                        "address": f"p{p}.{n}@example.org",
                        "address_key": f"p{p}.{n}@example.org",
                        "clinician_id": None if p % 3 else 1 + p % 50,
                        "method": "written",
                        "valid_from": date(2021, 1, 1),
                        "expires": date(2024, 1, 1) if p % 17 == 0 else None,
                        "delivery": "tls",
                        "risk_acknowledged": False,
                        "recorded_at": now,
                        "recorded_by": "bench",
                        "revoked_at": now if p % 29 == 0 else None,
                        "revoked_by": "bench" if p % 29 == 0 else None,
                    }
                    for p in ids
                    for n in (1, 2)
                ],
            )
    engine.dispose()
    return patients


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of the (sorted, non-empty) values fall."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def measure(url: str, patients: int, lookups: int) -> dict[str, Any]:
    engine = make_engine(url)
    gate = PolicyGate(engine, PolicySettings(practice_domains=frozenset({"praxis.example"})))
    rng = random.Random(7)
    latencies = []
    outcomes: dict[str, int] = {}
    # A different patient each time: every lookup misses the gateway's facts
    # cache, so the figure is the registry's cost, not memory's.
    for p in rng.sample(range(1, patients + 1), min(lookups, patients)):
        sender = SenderFacts(f"dr{1 + p % 50}", Role.CLINICIAN, frozenset())
        address = parse_address(f"P{p}.{rng.choice((1, 2))}+x@EXAMPLE.org")
        started = time.perf_counter()
        (decision,) = gate.decide(sender, [address])
        latencies.append(time.perf_counter() - started)
        outcomes[decision.reason.value] = outcomes.get(decision.reason.value, 0) + 1
    engine.dispose()
    latencies.sort()
    return {
        "decisions_per_second": len(latencies) / sum(latencies),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": latencies[-1] * 1000,
        "outcomes": outcomes,
    }


def run(consents: int, lookups: int, database_url: str | None = None) -> dict[str, Any]:
    """Build a registry of ``consents`` consents and time ``lookups`` decisions in it.

    The registry goes to ``database_url`` (which must be empty) or to a
    temporary SQLite file that is removed afterwards. ``bench/run.py`` calls
    this too, so both report the same figures the same way.
    """
    with tempfile.TemporaryDirectory() as tmp:
        url = database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        started = time.monotonic()
        patients = build(url, consents)
        built = time.monotonic() - started
        figures = measure(url, patients, lookups)
    return {
        "backend": url.split(":", 1)[0],
        "consents": consents,
        "lookups": lookups,
        "build_seconds": round(built, 1),
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consents", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=20_000)
    parser.add_argument("--database-url", help="an empty database; default a temporary SQLite file")
    args = parser.parse_args()
    figures = run(args.consents, args.lookups, args.database_url)
    result = {
        "machine": f"{platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}",
        **figures,
    }
    print(
        f"registry: {args.consents:,} consents ({figures['backend']}), "
        f"built in {figures['build_seconds']:.0f} s"
    )
    print(
        f"registry lookup + decision, one recipient: {figures['decisions_per_second']:,.0f}/s, "
        f"p50 {figures['p50_ms']:.3f} ms, p99 {figures['p99_ms']:.3f} ms"
    )
    Path(__file__).with_name("results-policy.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
