"""The pieces of the benchmark: next hop, bare relay, ``cgw serve`` and load generator.

``bench/run.py`` puts them together. Everything listens on 127.0.0.1 and
shares the machine's cores with the load generator, so the bare relay and
cgw pay the same costs around them: the same TLS settings and certificate
code as cgw (``gateway.tls``), the same AUTH exchange, the same next hop.

Every process started here is stopped by the context manager that started
it, also after an error or Ctrl-C: the child processes ignore SIGINT (the
terminal sends it to the whole process group) and are stopped by this
process instead, so none outlives the run and none prints a traceback.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import aiosmtplib

PASSWORD = "bench password 1"
PRACTICE_DOMAIN = "praxis.example"
CLINICIAN, CLINICIAN_ADDRESS = "drsmith", f"dr.smith@{PRACTICE_DOMAIN}"
RECEPTION, RECEPTION_ADDRESS = "reception", f"reception@{PRACTICE_DOMAIN}"
COLLEAGUE_ADDRESS = f"dr.jones@{PRACTICE_DOMAIN}"
PATIENT_ADDRESS, PATIENT_MRN = "anna@example.org", "A-1"
ACCOUNTS = {CLINICIAN: PASSWORD, RECEPTION: PASSWORD}

STARTUP_SECONDS = 60.0  # for a child process or cgw serve to say where it listens
STOP_SECONDS = 30.0  # for one to exit after SIGTERM before it is killed
SINK_SIZE_LIMIT = 64 * 1024 * 1024  # an S/MIME copy of a 25 MB message is about 34 MB


@dataclass(frozen=True)
class MailKind:
    """Who sends what to whom in one column of the matrix."""

    key: str
    label: str
    username: str
    sender: str
    recipient: str
    encrypted: bool  # whether the next hop must receive S/MIME


BARE = MailKind("bare", "bare relay", RECEPTION, RECEPTION_ADDRESS, COLLEAGUE_ADDRESS, False)
# Internal mail: a practice-domain address that is no patient's is allowed by
# the "internal-recipient" rule and relayed to CGW_DELIVERY like any other.
INTERNAL = MailKind(
    "internal", "cgw internal", RECEPTION, RECEPTION_ADDRESS, COLLEAGUE_ADDRESS, False
)
SMIME = MailKind("smime", "cgw S/MIME", CLINICIAN, CLINICIAN_ADDRESS, PATIENT_ADDRESS, True)
KINDS = (BARE, INTERNAL, SMIME)
KIND_BY_KEY = {kind.key: kind for kind in KINDS}

_FILLER = b"Lab results attached; nothing abnormal was found in any of the values above."


def message(kind: MailKind, size: int) -> bytes:
    """A plain-text message of exactly ``size`` bytes, lines of at most 78 bytes."""
    header = (
        f"From: {kind.sender}\r\nTo: {kind.recipient}\r\nSubject: results\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = _FILLER + b"\r\n"
    room = size - len(header)
    if room < 2:
        raise ValueError(f"a message needs at least {len(header) + 2} bytes")
    full_lines = (room - 2) // len(line)
    first = room - full_lines * len(line)  # 2..len(line): a short first line takes the rest
    return header + _FILLER[: first - 2] + b"\r\n" + line * full_lines


# --- child processes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SinkCounters:
    """What the next hop has received, shared with its process."""

    received: Synchronized[int]
    encrypted: Synchronized[int]  # of those, S/MIME (application/pkcs7-mime)


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _serve_smtp(cert: Path, key: Path, handler: Any, report: Any, **options: Any) -> None:
    """Run aiosmtpd with cgw's TLS settings in this (child) process; report its port."""
    from aiosmtpd.smtp import SMTP

    from gateway.tls import server_context

    context = server_context(cert, key)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, tls_context=context, loop=loop, **options), "127.0.0.1", 0
        )
        report.send(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def run_sink(cert: Path, key: Path, counters: SinkCounters, report: Any) -> None:
    """The next hop: STARTTLS required (cgw's relay demands verified TLS), counts messages.

    It offers PIPELINING, as Postfix, Exim, Exchange and smtp-sink do
    (aiosmtpd reads pipelined commands but does not say so by itself).
    The bare relay's aiosmtplib does not use it; cgw's client does.
    """
    _ignore_interrupts()
    from aiosmtpd.smtp import SMTP, Envelope, Session

    class Handler:
        async def handle_EHLO(
            self,
            server: SMTP,
            session: Session,
            envelope: Envelope,
            hostname: str,
            lines: list[str],
        ) -> list[str]:
            session.host_name = hostname
            return [*lines[:-1], "250-PIPELINING", lines[-1]]

        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            content = envelope.original_content or b""
            header = content[: content.find(b"\r\n\r\n")]
            with counters.received.get_lock():
                counters.received.value += 1
            if b"application/pkcs7-mime" in header.lower():
                with counters.encrypted.get_lock():
                    counters.encrypted.value += 1
            return "250 2.0.0 OK"

    _serve_smtp(
        cert, key, Handler(), report, require_starttls=True, data_size_limit=SINK_SIZE_LIMIT
    )


def run_bare_relay(cert: Path, key: Path, hop_port: int, report: Any) -> None:
    """aiosmtpd with cgw's STARTTLS + AUTH in front, 8 pooled aiosmtplib connections behind.

    It answers 250 only once the next hop has accepted the message: the least
    any relay must do, and the yardstick for what cgw's durability and policy cost.
    """
    _ignore_interrupts()
    import logging

    from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

    from gateway.tls import client_context

    # aiosmtpd logs a deprecation warning on every AUTH; cgw silences the same logger.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    next_hop = NextHopPool(hop_port, client_context(cert))

    class Handler:
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            try:
                await next_hop.send(
                    envelope.mail_from or "", envelope.rcpt_tos, envelope.original_content or b""
                )
            except (aiosmtplib.SMTPException, OSError) as exc:
                return f"451 4.4.0 next hop failed: {exc}"
            return "250 2.0.0 OK relayed"

    def authenticate(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        valid = isinstance(data, LoginPassword) and ACCOUNTS.get(
            data.login.decode(errors="replace")
        ) == data.password.decode(errors="replace")
        return AuthResult(success=valid, auth_data=data)

    _serve_smtp(cert, key, Handler(), report, auth_required=True, authenticator=authenticate)


class NextHopPool:
    """At most ``size`` connections to the next hop, each reused for one message at a time.

    As cgw delivers (8 delivery tasks over a pool of 8 connections), so the two
    relays are compared with the same parallelism towards the next hop.
    """

    def __init__(self, port: int, context: ssl.SSLContext, size: int = 8) -> None:
        self.port = port
        self.context = context
        self._slots = asyncio.Semaphore(size)
        self._idle: list[aiosmtplib.SMTP] = []

    async def send(self, mail_from: str, recipients: Sequence[str], content: bytes) -> None:
        async with self._slots:
            client = self._idle.pop() if self._idle else await self._connect()
            try:
                await client.sendmail(mail_from, recipients, content)
            except BaseException:
                client.close()
                raise
            self._idle.append(client)

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=self.port, start_tls=True, tls_context=self.context
        )
        await client.connect()
        return client


@contextlib.contextmanager
def child_process(target: Callable[..., None], *args: Any) -> Iterator[int]:
    """Run ``target(*args, report)`` in a fresh process until the block ends; yields its port."""
    spawn = multiprocessing.get_context("spawn")
    receiver, report = spawn.Pipe(duplex=False)
    process = spawn.Process(target=target, args=(*args, report), daemon=True)
    process.start()
    try:
        ready = multiprocessing.connection.wait([receiver, process.sentinel], STARTUP_SECONDS)
        if receiver not in ready:
            if process.sentinel in ready:
                process.join()  # it has exited: collect its exit code
            raise RuntimeError(f"{target.__name__} did not start (exit code {process.exitcode})")
        yield int(receiver.recv())
    finally:
        process.terminate()
        process.join(STOP_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()


@contextlib.contextmanager
def sink_process(cert: Path, key: Path) -> Iterator[tuple[int, SinkCounters]]:
    """The next hop in its own process: its port and its counters."""
    spawn = multiprocessing.get_context("spawn")
    counters = SinkCounters(spawn.Value("q", 0), spawn.Value("q", 0))
    with child_process(run_sink, cert, key, counters) as port:
        yield port, counters


# --- cgw serve ----------------------------------------------------------------------------------


# Where cgw serve runs with other than its defaults, and why: no implicit-TLS
# listener (unused), no delay after a login (every worker logs in at once), 100
# connections per client address instead of 20 (the load generator opens 50
# from 127.0.0.1), a short shutdown grace (the bench waits for it), and one
# worker process per core, as docs/deployment.md advises for a busy gateway.
GATEWAY_OVERRIDES = {
    "smtps_listen": "",
    "auth_backoff": "0s",
    "max_connections_per_client": "100",
    "shutdown_grace": "5s",
    "workers": str(len(os.sched_getaffinity(0))),
}


def gateway_settings(data_dir: Path, hop_port: int, hop_ca: Path) -> dict[str, str]:
    """The settings ``cgw serve`` runs with: where it is, where it delivers, the overrides."""
    return {
        "data_dir": str(data_dir),
        "hostname": "localhost",
        "submission_listen": "127.0.0.1:0",
        "practice_domains": PRACTICE_DOMAIN,
        "delivery": f"smtp://127.0.0.1:{hop_port}",
        "delivery_ca_file": str(hop_ca),
        **GATEWAY_OVERRIDES,
    }


def seed_gateway(settings: dict[str, str]) -> None:
    """A data directory with the users, and a patient with relationship, consent and
    certificate, so that both kinds of cgw mail are allowed and delivered.

    Settings come from ``settings`` only (``DemoSettings``): the caller's
    ``CGW_*`` variables and ``./cgw.toml`` cannot point the seeding elsewhere.
    """
    from consent_registry import certificates, consents, patients, relationships
    from consent_registry.consents import ConsentTerms
    from consent_registry.db import make_engine, session_scope
    from consent_registry.users import add_user
    from gateway.app import initialise
    from gateway.demo import DemoSettings, patient_certificate

    config = DemoSettings(**settings)  # type: ignore[arg-type]
    initialise(config)
    engine = make_engine(config.database_url)
    now = datetime.now(UTC)
    try:
        with session_scope(engine) as session:
            add_user(session, CLINICIAN, [CLINICIAN_ADDRESS], "clinician", PASSWORD, "bench", now)
            add_user(session, RECEPTION, [RECEPTION_ADDRESS], "staff", PASSWORD, "bench", now)
            patients.add_patient(session, "Anna", [PATIENT_ADDRESS], PATIENT_MRN, "bench", now)
            patient = patients.resolve_patient(session, PATIENT_MRN)
            relationships.add_relationship(
                session, patient, CLINICIAN, now.date(), "primary", "bench", now, config.zone
            )
            consents.grant_many(
                session,
                [ConsentTerms(patient=PATIENT_MRN, email=PATIENT_ADDRESS)],
                "bench",
                now,
                config.zone,
            )
            certificate = patient_certificate(PATIENT_ADDRESS, "Anna").pem()
            certificates.import_certificate(session, PATIENT_ADDRESS, certificate, "bench", now)
    finally:
        engine.dispose()


@dataclass
class RunningGateway:
    """A ``cgw serve`` process and what it printed after start-up (warnings, errors)."""

    pid: int
    port: int
    log: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=20))


_LISTENING = re.compile(r"listening on (\S+):(\d+)\s+submission \(STARTTLS\)")
_STARTED = "Stop with Ctrl-C."


@contextlib.contextmanager
def gateway_process(
    template: Path, directory: Path, settings: dict[str, str]
) -> Iterator[RunningGateway]:
    """``cgw serve`` on a fresh copy of the seeded data directory ``template``.

    A fresh copy per run keeps one cell's queue and audit trail from slowing
    the next. The environment is this one's without any ``CGW_*`` variable,
    plus ``settings``. Stopped with SIGTERM (killed if it lingers) and its
    directory removed when the block ends.
    """
    data_dir = directory / "data"
    shutil.copytree(template, data_dir)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CGW_")}
    env.update({f"CGW_{k.upper()}": v for k, v in {**settings, "data_dir": str(data_dir)}.items()})
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("cgw")), "serve", "--log-level", "warning"],
        env=env,
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C reaches this process only, which stops cgw
    )
    try:
        yield _started(process)
    finally:
        process.terminate()
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def _started(process: subprocess.Popen[str]) -> RunningGateway:
    """Wait for the listening port; keep reading its output so that the pipe never fills."""
    printed: collections.deque[str] = collections.deque(maxlen=40)
    running = threading.Event()  # cgw said it serves
    settled = threading.Event()  # ... or its output ended (it exited)
    gateway = RunningGateway(process.pid, 0)

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if running.is_set():
                gateway.log.append(line.rstrip())
                continue
            printed.append(line.rstrip())
            match = _LISTENING.search(line)
            if match and not gateway.port:
                gateway.port = int(match.group(2))
            if line.strip() == _STARTED:
                running.set()
                settled.set()
        settled.set()

    threading.Thread(target=read, name=f"cgw-{process.pid}-output", daemon=True).start()
    settled.wait(STARTUP_SECONDS)
    if not running.is_set() or not gateway.port:  # also when it exited after "listening"
        output = "\n".join(printed)
        raise RuntimeError(f"cgw serve did not start (exit code {process.poll()}):\n{output}")
    return gateway


def gateway_pids(pid: int) -> list[int]:
    """``cgw serve`` and the worker processes it started (``CGW_WORKERS``)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        children = []
    return [pid, *map(int, children)]


def memory_kib(pid: int) -> dict[str, int]:
    """Memory of ``cgw serve`` and its workers, in KiB, from /proc.

    VmRSS and Pss summed over the processes (Pss counts a page shared by
    several, such as the interpreter's code, once in all: the memory the
    machine gives the gateway), VmHWM (peak RSS) as the highest of any one
    process and as their sum (an upper bound: the peaks need not coincide).
    """
    figures = {"VmRSS": 0, "Pss": 0, "VmHWM": 0, "VmHWM_max": 0}
    for process in gateway_pids(pid):
        try:
            status = Path(f"/proc/{process}/status").read_text()
            rollup = Path(f"/proc/{process}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError):  # a worker that exited meanwhile
            continue
        values = {}
        for line in (*status.splitlines(), *rollup.splitlines()):
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Pss"):
                values[name] = int(value.split()[0])
        figures["VmRSS"] += values["VmRSS"]
        figures["Pss"] += values["Pss"]
        figures["VmHWM"] += values["VmHWM"]
        figures["VmHWM_max"] = max(figures["VmHWM_max"], values["VmHWM"])
    return figures


# --- the load generator -------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What one timed (or warm-up) run of the workers achieved."""

    started: float  # perf_counter() when the first message went out
    accepted: int = 0
    refused: int = 0
    seconds: float = 0.0  # from the start to the last reply
    latencies: list[float] = field(default_factory=list)  # of client.data(), in seconds


class LoadGenerator:
    """``concurrency`` logged-in SMTP sessions (TLS + AUTH), reused for every message.

    The load generator does not verify the server's certificate: it tests
    the servers, not itself, and both servers' TLS costs are the same.
    """

    def __init__(self, port: int, kind: MailKind, concurrency: int) -> None:
        self.port = port
        self.kind = kind
        self.concurrency = concurrency
        self.context = ssl.create_default_context()
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE
        self.sessions: list[aiosmtplib.SMTP] = []

    async def __aenter__(self) -> LoadGenerator:
        """Open and log in every session, so that no login falls into a timed window."""
        try:
            await asyncio.gather(*(self._open() for _ in range(self.concurrency)))
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _open(self) -> None:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=self.port,
            start_tls=True,
            tls_context=self.context,
            timeout=300,
        )
        self.sessions.append(client)
        await client.connect()
        await client.login(self.kind.username, PASSWORD)

    async def __aexit__(self, *_: object) -> None:
        async def close(client: aiosmtplib.SMTP) -> None:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                if client.is_connected:
                    await client.quit()
            client.close()

        await asyncio.gather(*(close(c) for c in self.sessions))

    async def send(self, content: bytes, messages: int, seconds: float | None = None) -> LoadResult:
        """Send up to ``messages`` over all sessions, starting none after ``seconds``.

        A message the server refuses is counted and the session goes on; a
        broken connection ends the run with its error.
        """
        result = LoadResult(started=time.perf_counter())
        remaining = messages
        deadline = result.started + seconds if seconds is not None else float("inf")

        async def worker(client: aiosmtplib.SMTP) -> None:
            nonlocal remaining
            while remaining > 0 and time.perf_counter() < deadline:
                remaining -= 1
                try:
                    await client.mail(self.kind.sender)
                    await client.rcpt(self.kind.recipient)
                    sent = time.perf_counter()
                    await client.data(content)
                except aiosmtplib.SMTPResponseException:
                    result.refused += 1
                    await client.rset()
                    continue
                result.latencies.append(time.perf_counter() - sent)
                result.accepted += 1

        await asyncio.gather(*(worker(c) for c in self.sessions))
        result.seconds = time.perf_counter() - result.started
        return result


async def wait_for_count(counter: Synchronized[int], target: int, timeout: float) -> float | None:
    """When (perf_counter) ``counter`` reached ``target``, or None after ``timeout`` s.

    The next hop is another process with a shared counter: polled every 5 ms.
    """
    deadline = time.perf_counter() + timeout
    while counter.value < target:
        if time.perf_counter() > deadline:
            return None
        await asyncio.sleep(0.005)
    return time.perf_counter()
