"""A next hop for tests: an aiosmtpd server on 127.0.0.1 that records what it gets.

It offers STARTTLS with a certificate from the test CA (or no TLS at all), and
PIPELINING if asked to, can answer RCPT and DATA with scripted replies, and
can stall before its greeting to hold a delivery in flight. Runs on its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    tls: bool


@dataclass
class SinkHandler:
    received: list[Received] = field(default_factory=list)
    data_replies: list[str | bytes] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds each DATA takes, to hold deliveries in flight
    pipelining: bool = False  # offer PIPELINING (aiosmtpd reads pipelined commands anyway)
    changed: threading.Condition = field(default_factory=threading.Condition)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, lines: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*lines[:-1], "250-PIPELINING", lines[-1]] if self.pipelining else lines

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_replies.get(address)
        if reply is not None and not reply.startswith("250"):
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str | bytes:
        if self.delay:
            await asyncio.sleep(self.delay)
        reply: str | bytes = "250 OK stored"
        if self.data_replies:
            reply = self.data_replies.pop(0)  # bytes: a reply in some other charset
            if not reply.startswith("250" if isinstance(reply, str) else b"250"):
                return reply
        with self.changed:
            self.received.append(
                Received(
                    envelope.mail_from or "",
                    tuple(envelope.rcpt_tos),
                    envelope.original_content or b"",
                    session.ssl is not None,
                )
            )
            self.changed.notify_all()
        return reply

    def wait_for(self, count: int, timeout: float = 30) -> list[Received]:
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.received) >= count, timeout):
                raise AssertionError(f"sink got {len(self.received)} messages, expected {count}")
            return list(self.received)


class Sink:
    """Start with ``start()``; ``port`` is the bound port."""

    def __init__(
        self,
        tls: ssl.SSLContext | None,
        stall: bool = False,
        implicit: bool = False,
        credentials: tuple[str, str] | None = None,
        **handler: Any,
    ) -> None:
        self.handler = SinkHandler(**handler)
        self.tls = tls
        self.stall = stall
        self.implicit = implicit
        self.credentials = credentials
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0
        self.protocols: list[SMTP] = []

    def _protocol(self) -> asyncio.Protocol:
        self.connections += 1
        if self.stall:
            return asyncio.Protocol()  # accepts, never greets
        protocol = self._smtp()
        self.protocols.append(protocol)
        return protocol

    def _smtp(self) -> SMTP:
        return SMTP(
            self.handler,
            tls_context=None if self.implicit else self.tls,
            require_starttls=self.tls is not None and not self.implicit,
            auth_required=self.credentials is not None,
            auth_require_tls=not self.implicit,
            authenticator=self._authenticate if self.credentials else None,
            hostname="sink.test",
            loop=self.loop,
        )

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        given = (data.login.decode(), data.password.decode())
        return AuthResult(success=given == self.credentials)

    def start(self) -> Sink:
        return self.start_on(0)

    def start_on(self, port: int) -> Sink:
        """Listen on ``port`` (0: any free one), e.g. to stand in for a restarted hop."""
        self.thread.start()

        async def listen() -> asyncio.Server:
            return await self.loop.create_server(
                self._protocol,
                "127.0.0.1",
                port,
                ssl=self.tls if self.implicit else None,
                reuse_address=True,
            )

        self.server = asyncio.run_coroutine_threadsafe(listen(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self.server is not None
            self.server.close()
            for protocol in self.protocols:  # as a stopping server does: hang up on clients
                if protocol.transport is not None:
                    protocol.transport.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def received(self) -> list[Received]:
        return list(self.handler.received)

    def wait_for(self, count: int, timeout: float = 30) -> list[Received]:
        return self.handler.wait_for(count, timeout)
