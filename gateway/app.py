"""The composition root: the only place that wires the stages together.

``initialise`` prepares a data directory (idempotent: what exists is kept,
never replaced). ``Gateway`` builds the SMTP listeners, the intake and the
delivery worker from settings, recovers the spool, and runs until stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from consent_registry.db import make_engine, migrate
from consent_registry.writes import GroupCommit, RemoteWrites
from gateway.audit import AuditLog, audit_key
from gateway.auth import Authenticator
from gateway.budget import MachineTurn
from gateway.crypto_at_rest import StorageKey, storage_key
from gateway.delivery import DELIVERY_MEMORY, DELIVERY_MEMORY_PART, DeliveryWorker
from gateway.intake import Intake
from gateway.mx import make_resolver
from gateway.mx_relay import MxRelay
from gateway.policy_gate import PolicyGate
from gateway.protection import Protector, load_practice_keys
from gateway.quarantine import Quarantine, RetentionSweep
from gateway.queue import QueueStore, RetryPolicy
from gateway.relay import OutboxRelay, Relay, SmtpRelay
from gateway.reports import Reports
from gateway.settings import ListenAddress, Settings
from gateway.smtp import ConnectionLimiter, SubmissionHandler, SubmissionProtocol
from gateway.spool import FileSpool, Spool, open_spool
from gateway.spread import ConnectionSpread, HandedConnections, Serve
from gateway.tls import (
    client_context,
    create_dev_certificate,
    dev_certificate_paths,
    server_context,
)
from policies.throttle import AuthThrottle

log = logging.getLogger(__name__)

# How long a stopping stage may take to finish its current step (one database call).
STAGE_STOP_SECONDS = 30.0

logging.getLogger("mail.log").setLevel(logging.ERROR)


@dataclass
class InitReport:
    """What ``initialise`` made and kept, and the keys it loaded (for the gateway)."""

    storage_key: StorageKey
    audit_key: bytes
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def key(self, name: str, from_setting: bool, created: bool, keys_dir: Path) -> None:
        if from_setting:
            self.kept.append(f"{name} key (from CGW_{name.upper()}_KEY)")
        else:
            (self.created if created else self.kept).append(
                f"{name} key {keys_dir / f'{name}.key'}"
            )


def tls_files(settings: Settings) -> tuple[Path, Path]:
    if settings.tls_cert is not None and settings.tls_key is not None:
        return settings.tls_cert, settings.tls_key
    return dev_certificate_paths(settings.tls_dir)


def initialise(settings: Settings) -> InitReport:
    """Data directory, storage key, dev certificate and schema, as needed."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    storage, storage_created = storage_key(settings)
    audit, audit_created = audit_key(settings)
    report = InitReport(storage, audit)
    report.key("storage", settings.storage_key is not None, storage_created, settings.keys_dir)
    report.key("audit", settings.audit_key is not None, audit_created, settings.keys_dir)
    cert, key = tls_files(settings)
    if settings.tls_cert is None and not (cert.exists() and key.exists()):
        create_dev_certificate(settings.tls_dir, settings.hostname)
        report.created.append(f"self-signed TLS certificate {cert}")
    else:
        report.kept.append(f"TLS certificate {cert}")
    FileSpool.prepare(settings.spool_dir)
    engine = make_engine(settings.database_url)
    try:
        migrate(engine)
    finally:
        engine.dispose()
    report.kept.append("database schema (migrated to the newest revision)")
    return report


def build_relay(settings: Settings) -> Relay:
    target = settings.delivery
    if target.kind == "outbox":
        return OutboxRelay(settings.outbox_dir)
    if target.kind == "smtp":
        return SmtpRelay(
            target,
            client_context(settings.delivery_ca_file),
            settings.hostname,
            settings.delivery_timeout.total_seconds(),
        )
    return MxRelay(
        make_resolver([(s.host, s.port) for s in settings.dns_resolvers]),
        settings.mx_port,
        client_context(settings.delivery_ca_file),
        settings.hostname,
        settings.delivery_timeout.total_seconds(),
    )


class _Once:
    """Calls ``ended`` the first time it is called: a connection ends once,
    whether its session or its handshake ended it."""

    def __init__(self, ended: Callable[[], None]) -> None:
        self._ended: Callable[[], None] | None = ended

    def __call__(self) -> None:
        if self._ended is not None:
            ended, self._ended = self._ended, None
            ended()


def bind_listeners(address: ListenAddress, backlog: int = 100) -> list[socket.socket]:
    """Listening sockets on every address ``address.host`` names, as asyncio's
    ``create_server`` opens them (SO_REUSEADDR; IPv6 sockets IPv6 only)."""
    infos = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, where in dict.fromkeys(infos):
            listener = socket.socket(family, kind, proto)
            listeners.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                listener.bind(where)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
            listener.listen(backlog)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


@dataclass(frozen=True)
class Listener:
    label: str
    address: ListenAddress


class Gateway:
    """One running gateway instance."""

    def __init__(
        self,
        settings: Settings,
        writes: socket.socket | None = None,
        handed: socket.socket | None = None,
    ) -> None:
        """``writes``: a connection to the workers' writer process, which then
        commits this gateway's transactions (``consent_registry.writes``).
        ``handed``: in a worker, the first process's connection that hands it
        SMTP connections (``gateway.spread``); without it, this gateway listens."""
        self.settings = settings
        self._writes_connection = writes
        self._handed_connection = handed
        self.listeners: list[Listener] = []
        # The first process's listeners, which workers join (``add_worker``).
        self.spread: ConnectionSpread | None = None
        self._handed: HandedConnections | None = None
        self._serves: list[Serve] = []
        self._connecting: set[asyncio.Task[object]] = set()
        self._limiters: list[ConnectionLimiter] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._engine: Engine | None = None
        self._writes: GroupCommit | RemoteWrites | None = None
        self.worker: DeliveryWorker | None = None
        self.sweep: RetentionSweep | None = None
        self._gate: PolicyGate | None = None

    async def start(self) -> None:
        settings = self.settings
        relay = build_relay(settings)
        initialised = await asyncio.to_thread(initialise, settings)
        engine = make_engine(settings.database_url)
        self._engine = engine
        writes: GroupCommit | RemoteWrites
        if self._writes_connection is not None:
            writes = RemoteWrites(self._writes_connection, asyncio.get_running_loop())
        else:
            writes = GroupCommit(engine)
        self._writes = writes
        spool = open_spool(settings, engine, initialised.storage_key)
        audit = AuditLog(initialised.audit_key)
        queue = QueueStore(engine, settings.instance_name, settings.claim_lease, audit, writes)
        await asyncio.to_thread(self._recover, spool, queue)
        retry = RetryPolicy(
            settings.retry_backoff, settings.retry_backoff_max, settings.queue_lifetime
        )
        reports = Reports(audit, settings.hostname, settings.quarantine_retention)
        archive, signer = load_practice_keys(
            settings.smime_archive_cert, settings.smime_signing_cert, settings.smime_signing_key
        )
        protector = Protector(settings.protect_subject, archive, signer)
        gate = self._gate = PolicyGate(engine, settings.policy())
        self.worker = DeliveryWorker(
            queue,
            spool,
            relay,
            retry,
            reports,
            protector,
            gate,
            memory=max(DELIVERY_MEMORY // settings.workers, DELIVERY_MEMORY_PART),
            large=MachineTurn(settings.spool_dir / "large-delivery.lock"),
        )
        intake = Intake(
            writes, spool, audit, reports, settings.hostname, self.wake, deliveries=self.worker
        )
        self.sweep = RetentionSweep(
            Quarantine(queue, spool, audit, reports, gate), settings.quarantine_retention
        )
        handler = SubmissionHandler(
            authenticator=Authenticator(
                engine,
                audit,
                AuthThrottle(
                    base_delay=settings.auth_backoff.total_seconds(),
                    max_delay=30.0,
                    lockout_after=settings.auth_lockout,
                ),
            ),
            intake=intake,
            gate=gate,
            max_recipients=settings.max_recipients,
            bounce_denials=settings.denial_mode == "bounce",
        )
        cert, key_file = tls_files(settings)
        tls = server_context(cert, key_file)
        if self._handed_connection is None:
            self.spread = ConnectionSpread()
        self._listen("submission (STARTTLS)", settings.submission_listen, handler, tls, False)
        if settings.smtps_listen is not None:
            self._listen("submission (implicit TLS)", settings.smtps_listen, handler, tls, True)
        if self._handed_connection is not None:
            self._handed = HandedConnections(self._handed_connection, self._serves)
        self._tasks = [
            asyncio.create_task(self.worker.run()),
            asyncio.create_task(self.sweep.run()),
        ]

    @staticmethod
    def _recover(spool: Spool, queue: QueueStore) -> None:
        released = queue.release_own_claims()
        finished = queue.finished_among(spool.stored_ids())
        for message_id in finished:
            spool.remove(message_id)
        dropped = spool.recover(queue.open_message_ids())
        if released:
            log.info("released %d delivery claims left by an earlier run", released)
        if finished:
            log.info("removed %d spool files of messages already delivered", len(finished))
        if dropped:
            log.info("removed %d spool files that were never acknowledged", len(dropped))

    def _listen(
        self,
        label: str,
        address: ListenAddress,
        handler: SubmissionHandler,
        tls: ssl.SSLContext,
        implicit: bool,
    ) -> None:
        """Serve ``address``: bind it (the first process) or serve what the first
        process hands over for it (a worker)."""
        settings = self.settings
        limiter = ConnectionLimiter(settings.max_connections_per_client)
        self._limiters.append(limiter)
        loop = asyncio.get_running_loop()

        def protocol(ended: Callable[[], None]) -> SubmissionProtocol:
            # The implicit-TLS listener offers AUTH without STARTTLS because the
            # whole connection is TLS already; aiosmtpd warns about that setting
            # on every connection, which is noise here.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
                return SubmissionProtocol(
                    handler,
                    limiter=limiter,
                    session_timeout=settings.smtp_session_timeout.total_seconds(),
                    ended=ended,
                    data_size_limit=settings.max_message_size,
                    enable_SMTPUTF8=True,
                    hostname=settings.hostname,
                    ident="Consent Gateway ESMTP",
                    tls_context=None if implicit else tls,
                    timeout=settings.smtp_idle_timeout.total_seconds(),
                    auth_required=True,
                    auth_require_tls=not implicit,
                    loop=loop,
                )

        def serve(connection: socket.socket, ended: Callable[[], None]) -> None:
            once = _Once(ended)
            # On the implicit-TLS port a session (its cap, its idle timer) begins
            # after the handshake: a client that never starts one is dropped after
            # the idle timeout, not held for asyncio's default minute.
            connecting = loop.create_task(
                loop.connect_accepted_socket(
                    lambda: protocol(once),
                    connection,
                    ssl=tls if implicit else None,
                    ssl_handshake_timeout=(
                        settings.smtp_idle_timeout.total_seconds() if implicit else None
                    ),
                )
            )
            self._connecting.add(connecting)
            connecting.add_done_callback(lambda task: self._connected(task, connection, once))

        self._serves.append(serve)
        if self.spread is None:
            return
        listeners = bind_listeners(address)
        for listener in listeners:
            self.spread.listen(listener, serve)
        host, port = listeners[0].getsockname()[:2]
        self.listeners.append(Listener(label, ListenAddress(str(host), int(port))))

    def _connected(
        self, task: asyncio.Task[object], connection: socket.socket, once: _Once
    ) -> None:
        """A handshake that failed (implicit TLS) ends the connection before any session."""
        self._connecting.discard(task)
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.info("a connection ended before its session began: %s", task.exception())
            connection.close()
            once()

    def wake(self) -> None:
        """A message was queued: the delivery worker (and the retention sweep,
        should it hold recipients) need not wait for their polls."""
        if self.worker is not None:
            self.worker.wake()
        if self.sweep is not None:
            self.sweep.wake()

    async def stop(self) -> None:
        """Stop accepting, let sessions finish their transactions (up to
        ``CGW_SHUTDOWN_GRACE``), then finish the deliveries in flight."""
        if self.spread is not None:
            self.spread.close()
        if self._handed is not None:
            self._handed.close()
        grace = self.settings.shutdown_grace.total_seconds()
        cut = await asyncio.gather(*(limiter.drain(grace) for limiter in self._limiters))
        if sum(cut):
            log.warning("%d SMTP sessions were cut off after the shutdown grace period", sum(cut))
        for connecting in list(self._connecting):  # handshakes not done: not sessions yet
            connecting.cancel()
        for stage in (self.worker, self.sweep):
            if stage is not None:
                stage.stop()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=STAGE_STOP_SECONDS)
            for task in stuck:  # a database call that hangs: stop waiting for it
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.worker is not None:
            await self.worker.drain()
            await self.worker.close()
        if isinstance(self._writes, RemoteWrites):
            await self._writes.close()  # it reads its replies on this loop
        elif self._writes is not None:
            await asyncio.to_thread(self._writes.close)
        if self._gate is not None:
            self._gate.close()
        if self._engine is not None:
            self._engine.dispose()
