"""The benchmark: a bare relay against ``cgw serve``, memory at 25 MB, policy at 1M consents.

    .venv/bin/python bench/run.py [--quick] [--only bare,internal,smime]
                                  [--concurrency 1,10,50] [--skip-rss] [--skip-policy]

One run measures, with one load generator (asyncio + aiosmtplib, STARTTLS +
AUTH, connections reused, every session logged in before the timed window):

- bare relay: aiosmtpd with cgw's TLS settings and AUTH, relaying through 8
  pooled aiosmtplib connections and answering 250 only once the next hop did;
- cgw internal: ``cgw serve`` (its own process, SQLite, fsync'ed file spool,
  default settings but the few ``harness.gateway_settings`` names) with mail
  from the practice's reception to a colleague in the practice domain;
- cgw S/MIME: the same with a clinician's mail to a patient with a
  relationship, a consent and a certificate, encrypted before it leaves;

at each concurrency with 4 KB (4,096 byte) and 1 MB (1,048,576 byte)
messages; each cell sends until its message count or its time is reached,
after a short warm-up, against a fresh copy of cgw's seeded data directory.
All relay to one aiosmtpd next hop with STARTTLS in its own process, which
counts what arrives. Then the peak memory of ``cgw serve`` receiving 25 MB
messages, and registry lookup + decision with 1,000,000 consents
(``bench/policy.py``).

Figures per cell: messages accepted per second (the last 250 of the timed
window), delivered per second (the next hop's count reaching the accepted
number, from the same start), and the latency of ``client.data()``: from
sending the message data to the server's reply. For 4 KB that is about the
time from the end of DATA to 250; for 1 MB it includes sending the megabyte
over TLS. Ratios divide cgw's delivered rate by the bare relay's.

Prints a table and writes bench/results.json (--quick: results-quick.json).
Everything runs on this machine's cores, load generator included: compare
figures from the same run, on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import harness
import policy
from harness import KINDS, MailKind, SinkCounters

from gateway.cli.output import table_lines
from gateway.tls import create_dev_certificate

KIB, MIB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """How much one cell sends: a warm-up, then up to ``messages`` or ``seconds``."""

    messages: int
    seconds: float
    warmup: int


@dataclass(frozen=True)
class Plan:
    """Everything a run measures; printed into the results as its parameters."""

    kinds: tuple[str, ...]
    concurrencies: tuple[int, ...]
    sizes: dict[int, Limits]
    drain_seconds: float  # how long the next hop may take to receive what was accepted
    rss_messages: int | None  # None: no memory measurement
    rss_size: int
    rss_concurrency: int
    rss_kind: str
    policy_consents: int | None  # None: no policy measurement
    policy_lookups: int


FULL = Plan(
    kinds=tuple(k.key for k in KINDS),
    concurrencies=(1, 10, 50),
    sizes={4 * KIB: Limits(2000, 15.0, 50), MIB: Limits(100, 20.0, 10)},
    drain_seconds=120.0,
    rss_messages=30,
    rss_size=25_000_000,
    rss_concurrency=10,
    rss_kind=harness.SMIME.key,  # the heaviest path: each message also encrypted in memory
    policy_consents=1_000_000,
    policy_lookups=20_000,
)
QUICK = replace(
    FULL,
    sizes={4 * KIB: Limits(60, 5.0, 10), MIB: Limits(10, 5.0, 2)},
    drain_seconds=60.0,
    rss_messages=3,
    policy_consents=20_000,
    policy_lookups=2_000,
)


@dataclass
class Cell:
    """The figures of one kind of mail at one concurrency and message size."""

    kind: str
    concurrency: int
    size: int
    accepted: int
    refused: int
    delivered: int
    accepted_seconds: float
    delivered_seconds: float
    complete: bool  # whether the next hop received all accepted messages in time
    accepted_per_s: float
    delivered_per_s: float
    p50_ms: float
    p99_ms: float
    delivered_vs_bare: float | None = None
    gateway_log: list[str] = field(default_factory=list)


async def measure_cell(
    port: int,
    kind: MailKind,
    concurrency: int,
    size: int,
    limits: Limits,
    counters: SinkCounters,
    drain_seconds: float,
) -> Cell:
    """One cell: log in, warm up until the next hop has it all, then the timed window.

    The timed window starts with the first message and ends, for "accepted",
    with the last 250 and, for "delivered", when the next hop has counted as
    many messages as were accepted. A cell whose mail does not arrive as it
    should (encrypted or not) fails the run: it would measure something else.
    """
    content = harness.message(kind, size)
    async with harness.LoadGenerator(port, kind, concurrency) as load:
        before_warmup = counters.received.value
        warmup = await load.send(content, limits.warmup)
        if warmup.refused or not warmup.accepted:
            raise RuntimeError(f"{kind.label}: the server refused the warm-up messages")
        target = before_warmup + warmup.accepted
        if await harness.wait_for_count(counters.received, target, drain_seconds) is None:
            raise RuntimeError(f"{kind.label}: the warm-up messages were not delivered")
        received, encrypted = counters.received.value, counters.encrypted.value
        timed = await load.send(content, limits.messages, limits.seconds)
        if not timed.accepted:
            raise RuntimeError(f"{kind.label}: the server accepted no message")
        delivered_at = await harness.wait_for_count(
            counters.received, received + timed.accepted, drain_seconds
        )
        delivered_seconds = (delivered_at or time.perf_counter()) - timed.started
    delivered = counters.received.value - received
    delivered_encrypted = counters.encrypted.value - encrypted
    if delivered_encrypted != (delivered if kind.encrypted else 0):
        raise RuntimeError(
            f"{kind.label}: {delivered_encrypted} of {delivered} messages arrived S/MIME-encrypted"
        )
    latencies = sorted(timed.latencies)
    return Cell(
        kind=kind.key,
        concurrency=concurrency,
        size=size,
        accepted=timed.accepted,
        refused=timed.refused,
        delivered=delivered,
        accepted_seconds=timed.seconds,
        delivered_seconds=delivered_seconds,
        complete=delivered_at is not None,
        accepted_per_s=timed.accepted / timed.seconds,
        delivered_per_s=min(delivered, timed.accepted) / delivered_seconds,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=policy.percentile(latencies, 0.99) * 1000,
    )


class RssSampler:
    """The highest summed VmRSS and Pss of ``cgw serve`` and its workers, read
    from /proc every 50 ms in a thread (so that a busy event loop in this
    process does not skip samples)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.highest_kib = {"VmRSS": 0, "Pss": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            figures = harness.memory_kib(self.pid)
            for name, highest in self.highest_kib.items():
                self.highest_kib[name] = max(highest, figures[name])
            if self._stop.wait(0.05):
                return


async def measure_rss(
    gateway: harness.RunningGateway, plan: Plan, counters: SinkCounters
) -> dict[str, Any]:
    """cgw serve's memory while it receives and delivers ``plan.rss_messages`` large messages."""
    assert plan.rss_messages is not None
    kind = harness.KIND_BY_KEY[plan.rss_kind]
    content = harness.message(kind, plan.rss_size)
    async with harness.LoadGenerator(gateway.port, kind, plan.rss_concurrency) as load:
        at_start = harness.memory_kib(gateway.pid)
        with RssSampler(gateway.pid) as sampler:
            received = counters.received.value
            sent = await load.send(content, plan.rss_messages)
            delivered_at = await harness.wait_for_count(
                counters.received, received + sent.accepted, plan.drain_seconds * 2
            )
            after = harness.memory_kib(gateway.pid)
    if delivered_at is None or sent.refused:
        raise RuntimeError(f"memory: {sent.accepted} of {plan.rss_messages} accepted, not all sent")
    return {
        "kind": kind.key,
        "messages": sent.accepted,
        "size": plan.rss_size,
        "concurrency": plan.rss_concurrency,
        "processes": len(harness.gateway_pids(gateway.pid)),
        "seconds": round(delivered_at - sent.started, 1),
        "rss_before_mib": round(at_start["VmRSS"] / KIB, 1),
        "rss_highest_sampled_mib": round(sampler.highest_kib["VmRSS"] / KIB, 1),
        "pss_highest_sampled_mib": round(sampler.highest_kib["Pss"] / KIB, 1),
        "rss_after_mib": round(after["VmRSS"] / KIB, 1),
        "vmhwm_mib": round(after["VmHWM_max"] / KIB, 1),
        "vmhwm_sum_mib": round(after["VmHWM"] / KIB, 1),
    }


def machine() -> dict[str, Any]:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def size_label(size: int) -> str:
    return f"{size // MIB} MB" if size >= MIB else f"{size // KIB} KB"


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Rig:
    """What every measurement of one run shares: the next hop, and cgw's seeded data."""

    tmp: Path
    hop_cert: Path
    hop_key: Path
    hop_port: int
    counters: SinkCounters
    template: Path  # cgw's data directory, seeded once and copied for every cgw process
    settings: dict[str, str]


def run_cells(plan: Plan, rig: Rig) -> list[Cell]:
    """Every cell of the matrix, each cgw cell in a fresh process on a fresh data directory."""
    kinds = [k for k in KINDS if k.key in plan.kinds]
    cells: list[Cell] = []
    with contextlib.ExitStack() as stack:
        bare_port = None
        if harness.BARE in kinds:
            bare_port = stack.enter_context(
                harness.child_process(
                    harness.run_bare_relay, rig.hop_cert, rig.hop_key, rig.hop_port
                )
            )
        total = len(plan.sizes) * len(plan.concurrencies) * len(kinds)
        for size, limits in plan.sizes.items():
            for concurrency in plan.concurrencies:
                for kind in kinds:
                    progress(
                        f"[{len(cells) + 1}/{total}] {kind.label}, {size_label(size)}, "
                        f"concurrency {concurrency}"
                    )
                    with contextlib.ExitStack() as cell_stack:
                        if kind is harness.BARE:
                            assert bare_port is not None
                            port, gateway = bare_port, None
                        else:
                            gateway = cell_stack.enter_context(
                                harness.gateway_process(rig.template, rig.tmp / "cgw", rig.settings)
                            )
                            port = gateway.port
                        cell = asyncio.run(
                            measure_cell(
                                port,
                                kind,
                                concurrency,
                                size,
                                limits,
                                rig.counters,
                                plan.drain_seconds,
                            )
                        )
                    if gateway is not None:  # read after it stopped: all it logged
                        cell.gateway_log = list(gateway.log)
                    cells.append(cell)
                    progress(
                        f"    {cell.accepted} accepted, {cell.accepted_per_s:.1f}/s; "
                        f"{cell.delivered_per_s:.1f}/s delivered"
                    )
    bare = {(c.size, c.concurrency): c for c in cells if c.kind == harness.BARE.key}
    for cell in cells:
        yardstick = bare.get((cell.size, cell.concurrency))
        if yardstick is not None and cell is not yardstick:
            cell.delivered_vs_bare = cell.delivered_per_s / yardstick.delivered_per_s
    return cells


def run_rss(plan: Plan, rig: Rig) -> list[dict[str, Any]]:
    """Memory on a fresh ``cgw serve`` (its VmHWM counts from its own start): with
    one process (the default) and, where it differs, with the throughput cells'
    worker processes."""
    measured = []
    for workers in sorted({"1", rig.settings["workers"]}, key=int):
        progress(
            f"memory: {plan.rss_messages} messages of {plan.rss_size:,} bytes at concurrency "
            f"{plan.rss_concurrency} ({harness.KIND_BY_KEY[plan.rss_kind].label}), "
            f"{workers} worker process(es)"
        )
        settings = {**rig.settings, "workers": workers}
        with harness.gateway_process(rig.template, rig.tmp / "cgw", settings) as gateway:
            measured.append(asyncio.run(measure_rss(gateway, plan, rig.counters)))
    return measured


def cell_rows(cells: Sequence[Cell]) -> list[list[str]]:
    rows = []
    for c in cells:
        notes = []
        if c.refused:
            notes.append(f"{c.refused} refused")
        if not c.complete:
            notes.append(f"only {c.delivered} delivered")
        elif c.delivered > c.accepted:
            notes.append(f"{c.delivered - c.accepted} delivered twice")
        if c.gateway_log:
            notes.append(f"cgw logged {len(c.gateway_log)} lines")
        ratio = c.delivered_vs_bare
        rows.append(
            [
                size_label(c.size),
                str(c.concurrency),
                harness.KIND_BY_KEY[c.kind].label,
                f"{c.accepted:6d}",
                f"{c.accepted_per_s:8.1f}",
                f"{c.delivered_per_s:8.1f}",
                f"{c.p50_ms:8.1f}",
                f"{c.p99_ms:8.1f}",
                f"{ratio:5.3f}" if ratio is not None else "    -",
                "; ".join(notes),
            ]
        )
    return rows


def report(
    cells: Sequence[Cell], rss: list[dict[str, Any]] | None, policy_figures: Any
) -> list[str]:
    lines = table_lines(
        [
            "size",
            "conc",
            "relay",
            "msgs",
            "accept/s",
            "deliv/s",
            "p50 ms",
            "p99 ms",
            "÷bare",
            "notes",
        ],
        cell_rows(cells),
        "(no throughput cells)",
    )
    for cell in cells:
        for line in cell.gateway_log:
            lines.append(f"cgw ({cell.kind}, {size_label(cell.size)}, c{cell.concurrency}): {line}")
    for figures in rss or []:
        processes = figures["processes"]
        summed = (
            f"; all {processes} together: highest sampled VmRSS "
            f"{figures['rss_highest_sampled_mib']:.0f} MiB, Pss "
            f"{figures['pss_highest_sampled_mib']:.0f} MiB"
            if processes > 1
            else f", highest sampled VmRSS {figures['rss_highest_sampled_mib']:.0f} MiB"
        )
        lines.append(
            f"cgw serve memory, {processes} process(es), {figures['messages']} x "
            f"{figures['size']:,} bytes ({figures['kind']}) at concurrency "
            f"{figures['concurrency']}: peak RSS (VmHWM) {figures['vmhwm_mib']:.0f} MiB"
            f"{' per process' if processes > 1 else ''}{summed}; "
            f"{figures['rss_before_mib']:.0f} MiB before, {figures['rss_after_mib']:.0f} MiB after"
        )
    if policy_figures is not None:
        lines.append(
            f"policy, {policy_figures['consents']:,} consents ({policy_figures['backend']}): "
            f"{policy_figures['decisions_per_second']:,.0f} decisions/s, "
            f"p50 {policy_figures['p50_ms']:.3f} ms, p99 {policy_figures['p99_ms']:.3f} ms"
        )
    return lines


def parse_plan(argv: Sequence[str] | None) -> tuple[Plan, Path]:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke check")
    parser.add_argument(
        "--only",
        default=",".join(FULL.kinds),
        help=f"kinds of mail, comma-separated (default {','.join(FULL.kinds)})",
    )
    parser.add_argument(
        "--concurrency",
        default=",".join(map(str, FULL.concurrencies)),
        help="concurrencies, comma-separated (default 1,10,50)",
    )
    parser.add_argument("--skip-rss", action="store_true", help="no 25 MB memory measurement")
    parser.add_argument(
        "--rss-kind",
        choices=(harness.INTERNAL.key, harness.SMIME.key),
        default=FULL.rss_kind,
        help=f"the mail cgw receives for the memory measurement (default {FULL.rss_kind})",
    )
    parser.add_argument("--skip-policy", action="store_true", help="no 1M-consent policy bench")
    parser.add_argument("--output", type=Path, help="default bench/results.json")
    args = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in args.only.split(",") if k.strip())
    unknown = set(kinds) - set(FULL.kinds)
    if unknown:
        parser.error(f"--only: unknown kind {sorted(unknown)[0]!r}")
    try:
        concurrencies = tuple(int(c) for c in args.concurrency.split(","))
    except ValueError:
        parser.error("--concurrency takes whole numbers, e.g. 1,10,50")
    if any(c < 1 or c > 90 for c in concurrencies):
        parser.error("--concurrency: 1 to 90 (cgw runs with 100 connections per client)")
    plan = replace(
        QUICK if args.quick else FULL,
        kinds=tuple(k for k in FULL.kinds if k in kinds),
        concurrencies=concurrencies,
        rss_kind=args.rss_kind,
    )
    if args.skip_rss:
        plan = replace(plan, rss_messages=None)
    if args.skip_policy:
        plan = replace(plan, policy_consents=None)
    name = "results-quick.json" if args.quick else "results.json"
    return plan, args.output or Path(__file__).with_name(name)


@contextlib.contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM ends the run as Ctrl-C does, through every cleanup on the way out."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> None:
    plan, output = parse_plan(argv)
    started = datetime.now(UTC)
    about = machine()
    cells: list[Cell] = []
    rss = policy_figures = None
    with stopped_by_sigterm(), tempfile.TemporaryDirectory(prefix="cgw-bench-") as tmp_name:
        tmp = Path(tmp_name)
        hop_cert, hop_key = create_dev_certificate(tmp / "next-hop", "localhost")
        if plan.kinds or plan.rss_messages is not None:
            with harness.sink_process(hop_cert, hop_key) as (hop_port, counters):
                template = tmp / "cgw-template"
                settings = harness.gateway_settings(template, hop_port, hop_cert)
                harness.seed_gateway(settings)
                rig = Rig(tmp, hop_cert, hop_key, hop_port, counters, template, settings)
                if plan.kinds:
                    cells = run_cells(plan, rig)
                if plan.rss_messages is not None:
                    rss = run_rss(plan, rig)
        if plan.policy_consents is not None:
            progress(f"policy: building a registry of {plan.policy_consents:,} consents")
            policy_figures = policy.run(plan.policy_consents, plan.policy_lookups)
    about["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    lines = report(cells, rss, policy_figures)
    print(
        f"{about['cores']} cores ({about['cpu_model']}), {about['python']}, "
        f"{started:%Y-%m-%d %H:%M} UTC"
    )
    print("\n".join(lines))
    results = {
        "date": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.now(UTC) - started).total_seconds()),
        "machine": about,
        "parameters": {
            **asdict(plan),
            "sizes": {str(size): asdict(limits) for size, limits in plan.sizes.items()},
            "cgw_overrides": harness.GATEWAY_OVERRIDES,
        },
        "cells": [
            {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(c).items()}
            for c in cells
        ],
        "rss": rss,
        "policy": policy_figures,
    }
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"figures written to {output}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        progress("interrupted: every process it started is stopped, its files removed")
        sys.exit(130)
