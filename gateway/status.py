"""Is this instance healthy? What ``cgw status`` and Docker's HEALTHCHECK ask.

Healthy means: the database answers at the current schema, and the
submission listener answers with an SMTP greeting (a bound port alone could
belong to a hung process). Queue figures are reported, never judged: a
long queue is the admin's call, not a reason for an orchestrator to restart.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.exc import SQLAlchemyError

from consent_registry.db import driver_error, make_engine, schema_is_current
from gateway.queue import QueueStats, QueueStore
from gateway.settings import ListenAddress, Settings

PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Probe:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Status:
    probes: list[Probe]
    queue: QueueStats | None

    @property
    def healthy(self) -> bool:
        return all(p.ok for p in self.probes)


def check(settings: Settings) -> Status:
    probes = [_listener("submission", settings.submission_listen, implicit=False)]
    if settings.smtps_listen is not None:
        probes.append(_listener("smtps", settings.smtps_listen, implicit=True))
    engine = make_engine(settings.database_url)
    queue = None
    try:
        if schema_is_current(engine):
            probes.append(Probe("database", True, "reachable, schema current"))
            queue = QueueStore(engine, "cgw-status", timedelta(0)).stats()
        else:
            probes.append(Probe("database", False, "schema not current: run 'cgw init'"))
    except SQLAlchemyError as exc:
        probes.append(Probe("database", False, f"unreachable: {driver_error(exc)[1]}"))
    finally:
        engine.dispose()
    return Status(probes, queue)


def _listener(name: str, address: ListenAddress, implicit: bool) -> Probe:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(  # noqa: S104
        address.host, address.host
    )
    where = f"{address.host}:{address.port}"
    try:
        with socket.create_connection((host, address.port), timeout=PROBE_TIMEOUT) as raw:
            if implicit:
                # Only "does it answer": the certificate is the client's business.
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                with context.wrap_socket(raw, server_hostname=host) as tls:
                    greeting = _greeting(tls)
            else:
                greeting = _greeting(raw)
    except OSError as exc:
        return Probe(name, False, f"{where} not answering: {exc.strerror or exc}")
    if not greeting.startswith("220"):
        return Probe(name, False, f"{where} answered {greeting[:60]!r}")
    return Probe(name, True, f"{where} answering")


def _greeting(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\r\n") and len(data) < 1024:
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    sock.sendall(b"QUIT\r\n")
    return data.decode("ascii", errors="replace").strip()
