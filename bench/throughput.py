"""Messages per second through ``cgw serve`` against a bare relay, in one run.

    .venv/bin/python bench/throughput.py [--messages 1000] [--concurrency 10] [--size 4096]

(a) a bare relay: aiosmtpd with STARTTLS + AUTH, answering 250 only after
    the next hop did, via a pool of 8 aiosmtplib connections;
(b) ``cgw serve`` (real process, SQLite, fsync'ed spool) with 4 KB patient
    mail that policy allows and S/MIME-encrypts, delivered end to end.
Both relay to the same aiosmtpd sink over verified TLS; the load generator
(asyncio, TLS + AUTH, connections reused) runs here. All on 127.0.0.1, on
the same cores. Prints a table and writes bench/results-throughput.json.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

USER, PASSWORD, SENDER, PATIENT = (
    "drsmith",
    "bench password 1",
    "dr.smith@praxis.example",
    "anna@example.org",
)


def _cert(
    name: str,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Name, rsa.RSAPrivateKey] | None,
    san: x509.GeneralName,
    ca: bool = False,
    email: bool = False,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if email:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj: Any) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_pki(tmp: Path) -> dict[str, Path]:
    import ipaddress

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = _cert("bench CA", ca_key, None, x509.DNSName("bench-ca"), ca=True)
    hop_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    hop = _cert(
        "127.0.0.1",
        hop_key,
        (ca.subject, ca_key),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    )
    anna_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    anna = _cert("Anna", anna_key, (ca.subject, ca_key), x509.RFC822Name(PATIENT), email=True)
    files = {"ca": ca, "hop_cert": hop, "hop_key": hop_key, "anna_cert": anna}
    paths = {}
    for name, obj in files.items():
        paths[name] = tmp / f"{name}.pem"
        paths[name].write_bytes(_pem(obj))
    return paths


# --- the next hop: counts what it receives ------------------------------------------------------


def run_sink(cert: str, key: str, port_out: Any, counter: Any) -> None:
    from aiosmtpd.smtp import SMTP

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            with counter.get_lock():
                counter.value += 1
            return "250 OK"

    async def main() -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(Handler(), tls_context=context, require_starttls=True, loop=loop),
            "127.0.0.1",
            0,
        )
        port_out.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


# --- the bare relay: same TLS + AUTH in front, pooled aiosmtplib behind ---------------------------


def run_bare_relay(cert: str, key: str, ca: str, hop_port: int, port_out: Any) -> None:
    import warnings

    from aiosmtpd.smtp import SMTP, AuthResult

    warnings.filterwarnings("ignore", message="Session.login_data is deprecated")

    client_context = ssl.create_default_context(cafile=ca)
    pool: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()

    async def connection() -> aiosmtplib.SMTP:
        if not pool.empty():
            return pool.get_nowait()
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=hop_port, start_tls=True, tls_context=client_context
        )
        await client.connect()
        return client

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            client = await connection()
            try:
                await client.sendmail(
                    envelope.mail_from, envelope.rcpt_tos, envelope.original_content
                )
            finally:
                if pool.qsize() < 8:
                    pool.put_nowait(client)
            return "250 OK relayed"

    def authenticate(
        server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        return AuthResult(
            success=data.login == USER.encode() and data.password == PASSWORD.encode(),
            auth_data=data,
        )

    async def main() -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(
                Handler(),
                tls_context=context,
                auth_required=True,
                authenticator=authenticate,
                loop=loop,
            ),
            "127.0.0.1",
            0,
        )
        port_out.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


# --- the load generator ---------------------------------------------------------------------------


async def load(port: int, cafile: str, messages: int, concurrency: int, body: bytes) -> list[float]:
    context = ssl.create_default_context(cafile=cafile)
    context.check_hostname = False  # the bare relay's certificate names the sink's host
    context.verify_mode = ssl.CERT_NONE
    remaining = [messages]
    latencies: list[float] = []

    async def worker() -> None:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, start_tls=True, tls_context=context, timeout=120
        )
        await client.connect()
        await client.login(USER, PASSWORD)
        while remaining[0] > 0:
            remaining[0] -= 1
            await client.mail(SENDER)
            await client.rcpt(PATIENT)
            started = time.perf_counter()
            await client.data(body)
            latencies.append(time.perf_counter() - started)
        await client.quit()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def _wait_count(counter: Any, target: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while counter.value < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"sink got {counter.value} of {target}")
        time.sleep(0.01)


def measure(
    name: str, port: int, cafile: str, counter: Any, args: argparse.Namespace, body: bytes
) -> dict[str, float]:
    asyncio.run(load(port, cafile, min(50, args.messages), args.concurrency, body))  # warm up
    _wait_count(counter, counter.value)
    start_count = counter.value
    started = time.perf_counter()
    latencies = asyncio.run(load(port, cafile, args.messages, args.concurrency, body))
    accepted = time.perf_counter() - started
    _wait_count(counter, start_count + args.messages)
    delivered = time.perf_counter() - started
    latencies.sort()
    return {
        "accepted_per_s": args.messages / accepted,
        "delivered_per_s": args.messages / delivered,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def start_gateway(
    tmp: Path, pki: dict[str, Path], hop_port: int
) -> tuple[subprocess.Popen[str], int]:
    from zoneinfo import ZoneInfo

    from consent_registry import certificates, consents, patients, relationships
    from consent_registry.consents import ConsentTerms
    from consent_registry.db import make_engine, session_scope
    from consent_registry.users import add_user
    from gateway.app import initialise
    from gateway.settings import Settings

    env = {k: v for k, v in os.environ.items() if not k.startswith("CGW_")}
    env.update(
        CGW_DATA_DIR=str(tmp / "cgw"),
        CGW_SUBMISSION_LISTEN="127.0.0.1:0",
        CGW_SMTPS_LISTEN="",
        CGW_PRACTICE_DOMAINS="praxis.example",
        CGW_DELIVERY=f"smtp://127.0.0.1:{hop_port}",
        CGW_DELIVERY_CA_FILE=str(pki["ca"]),
        CGW_HOSTNAME="localhost",
        CGW_AUTH_BACKOFF="0s",
    )
    settings = Settings(
        data_dir=tmp / "cgw", practice_domains="praxis.example", hostname="localhost"
    )
    initialise(settings)
    engine = make_engine(settings.database_url)
    now, utc = datetime.now(UTC), ZoneInfo("UTC")
    with session_scope(engine) as session:
        add_user(session, USER, [SENDER], "clinician", PASSWORD, "bench", now)
        patient = patients.resolve_patient(
            session,
            patients.add_patient(session, "Anna", [PATIENT], "A-1", "bench", now).mrn or "A-1",
        )
        relationships.add_relationship(
            session, patient, USER, now.date(), "primary", "bench", now, utc
        )
        consents.grant_many(
            session, [ConsentTerms(patient="A-1", email=PATIENT)], "bench", now, utc
        )
        certificates.import_certificate(
            session, PATIENT, pki["anna_cert"].read_bytes(), "bench", now
        )
    engine.dispose()
    cgw = str(Path(sys.executable).with_name("cgw"))
    process = subprocess.Popen(
        [cgw, "serve", "--log-level", "warning"],
        env=env,
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if "submission (STARTTLS)" in line:
            return process, int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
    raise RuntimeError("cgw serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    line = b"Lab results attached; nothing abnormal was found in any of the values. " * 1
    text = (line.rstrip() + b"\r\n") * (args.size // len(line) + 1)
    body = (f"From: {SENDER}\r\nTo: {PATIENT}\r\nSubject: results\r\n\r\n").encode() + text[
        : args.size
    ]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pki = make_pki(tmp)
        context = multiprocessing.get_context("spawn")
        counter, ports = context.Value("i", 0), context.Queue()
        sink = context.Process(
            target=run_sink,
            args=(str(pki["hop_cert"]), str(pki["hop_key"]), ports, counter),
            daemon=True,
        )
        sink.start()
        hop_port = ports.get(timeout=30)
        bare = context.Process(
            target=run_bare_relay,
            args=(str(pki["hop_cert"]), str(pki["hop_key"]), str(pki["ca"]), hop_port, ports),
            daemon=True,
        )
        bare.start()
        bare_port = ports.get(timeout=30)
        results = {"bare relay": measure("bare", bare_port, str(pki["ca"]), counter, args, body)}
        bare.terminate()
        gateway, port = start_gateway(tmp, pki, hop_port)
        try:
            results["cgw, S/MIME patient mail"] = measure(
                "cgw", port, str(tmp / "cgw" / "tls" / "dev-cert.pem"), counter, args, body
            )
        finally:
            gateway.terminate()
            gateway.wait(30)
            sink.terminate()
    ratio = (
        results["cgw, S/MIME patient mail"]["delivered_per_s"]
        / results["bare relay"]["delivered_per_s"]
    )
    print(
        f"{args.messages} messages of {args.size} bytes, concurrency {args.concurrency}, "
        f"{os.cpu_count()} cores"
    )
    print(f"{'':28} {'accepted/s':>11} {'delivered/s':>12} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in results.items():
        print(
            f"{name:28} {r['accepted_per_s']:11.0f} {r['delivered_per_s']:12.0f} "
            f"{r['p50_ms']:8.1f} {r['p99_ms']:8.1f}"
        )
    print(f"ratio cgw / bare relay (delivered): {ratio:.2f}")
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "messages": args.messages,
        "size": args.size,
        "concurrency": args.concurrency,
        "results": {k: {m: round(v, 2) for m, v in r.items()} for k, r in results.items()},
        "ratio_delivered": round(ratio, 3),
    }
    Path(__file__).with_name("results-throughput.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
