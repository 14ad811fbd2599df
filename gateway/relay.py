"""Handing a message to the next hop: a narrow Relay protocol, two implementations.

``OutboxRelay`` writes files under ``data_dir/outbox`` (the embedded default:
one ``ID.eml`` as it would go on the wire, beside ``ID.json`` with the
envelope; a repeated delivery of the same message rewrites the same files).
``SmtpRelay`` speaks SMTP (``gateway.smtp_client``) and never in the clear:
STARTTLS is demanded or the connection is implicit TLS, and the certificate
must verify for the host name. Any failure of TLS defers the message.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Protocol

from gateway.queue import RecipientResult, Verdict
from gateway.settings import DeliveryTarget
from gateway.smtp_client import BrokenConnection, Refused, Reply, SmtpClient, SmtpError


class Relay(Protocol):
    """Hands one message to the next hop; ``verified`` names the recipients whose
    consent demands TLS with a verified certificate all the way to their host."""

    async def send(
        self,
        message_id: str,
        mail_from: str,
        recipients: Sequence[str],
        content: bytes,
        verified: Collection[str] = (),
    ) -> dict[str, RecipientResult]: ...

    async def close(self) -> None:
        """Release what the relay keeps between messages (at shutdown)."""


def verdict_for(code: int) -> Verdict:
    if 200 <= code < 300:
        return Verdict.DELIVERED
    if 400 <= code < 500:
        return Verdict.DEFERRED
    return Verdict.FAILED


class OutboxRelay:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(
        self,
        message_id: str,
        mail_from: str,
        recipients: Sequence[str],
        content: bytes,
        verified: Collection[str] = (),
    ) -> dict[str, RecipientResult]:
        await asyncio.to_thread(self._write, message_id, mail_from, recipients, content)
        reply = f"250 written to outbox as {message_id}.eml"
        return {r: RecipientResult(Verdict.DELIVERED, reply) for r in recipients}

    async def close(self) -> None:
        """Nothing is kept open between messages."""

    def _write(
        self, message_id: str, mail_from: str, recipients: Sequence[str], content: bytes
    ) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        envelope = json.dumps({"mail_from": mail_from, "rcpt_to": list(recipients)}).encode()
        _write_durably(self.directory / f"{message_id}.json", envelope)
        _write_durably(self.directory / f"{message_id}.eml", content)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class SmtpRelay:
    """A smarthost: always verified TLS (STARTTLS or implicit), optionally AUTH.

    Connections are reused across messages: after a transaction a connection
    goes back to a small pool of idle ones (at most ``pool_size``, none older
    than ``max_idle`` seconds), as Postfix's connection cache does. A pooled
    connection the next hop has closed meanwhile is replaced by a fresh one.
    """

    def __init__(
        self,
        target: DeliveryTarget,
        tls_context: ssl.SSLContext,
        local_hostname: str,
        timeout: float,
        pool_size: int = 16,  # one for each delivery in flight (DELIVERY_CONCURRENCY)
        max_idle: float = 30.0,
    ) -> None:
        self.target = target
        self.tls_context = tls_context
        self.local_hostname = local_hostname
        self.timeout = timeout
        self.pool_size = pool_size
        self.max_idle = max_idle
        self._idle: list[tuple[float, SmtpClient]] = []

    async def send(
        self,
        message_id: str,
        mail_from: str,
        recipients: Sequence[str],
        content: bytes,
        verified: Collection[str] = (),
    ) -> dict[str, RecipientResult]:
        pooled = self._take_idle()
        if pooled is not None:
            try:
                results = await transaction(pooled, mail_from, recipients, content)
            except (ConnectionError, TimeoutError):
                pooled.close()  # it went stale while idle: start afresh
            else:
                self._give_back(pooled)
                return results
        target = self.target
        client = None
        try:
            client = await SmtpClient.connect(
                target.host,
                target.port,
                local_hostname=self.local_hostname,
                wait=self.timeout,
                tls=self.tls_context if target.tls == "implicit" else None,
            )
            if target.tls == "starttls":
                await client.starttls(self.tls_context, target.host)
            if target.username:
                await client.login(target.username, target.password or "")
            results = await transaction(client, mail_from, recipients, content)
        except Refused as exc:  # the session, STARTTLS or AUTH refused
            failure = _result(exc.reply)
        except (SmtpError, OSError, TimeoutError) as exc:
            failure = RecipientResult(Verdict.DEFERRED, describe_failure(exc))
        else:
            self._give_back(client)
            return results
        if client is not None:
            await client.quit()
        return dict.fromkeys(recipients, failure)

    def _take_idle(self) -> SmtpClient | None:
        now = time.monotonic()
        while self._idle:
            since, client = self._idle.pop()
            if client.is_connected and now - since < self.max_idle:
                return client
            client.close()
        return None

    def _give_back(self, client: SmtpClient) -> None:
        if client.is_connected and len(self._idle) < self.pool_size:
            self._idle.append((time.monotonic(), client))
        else:
            client.close()

    async def close(self) -> None:
        """QUIT every idle connection (at shutdown)."""
        idle, self._idle = self._idle, []
        for _, client in idle:
            await client.quit()


async def transaction(
    client: SmtpClient, mail_from: str, recipients: Sequence[str], content: bytes
) -> dict[str, RecipientResult]:
    """One message on a ready connection: what the next hop said per recipient.

    Connection-level failures propagate; the caller decides whether another
    host is worth trying.
    """
    options = _mail_options(mail_from, recipients, content)
    if client.supports("SIZE"):
        options.insert(0, f"SIZE={len(content)}")
    said = await client.send(mail_from, options, recipients, content)
    return {r: _result(reply) for r, reply in said.items()}


def _result(reply: Reply) -> RecipientResult:
    return RecipientResult(verdict_for(reply.code), str(reply))


def _mail_options(mail_from: str, recipients: Sequence[str], content: bytes) -> list[str]:
    options = []
    if not content.isascii():
        options.append("BODY=8BITMIME")
    if not mail_from.isascii() or not all(r.isascii() for r in recipients):
        options.append("SMTPUTF8")
    return options


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate of the next hop did not verify: {exc.verify_message}"
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS certificate of the next hop did not verify: {cause.verify_message}"
    if isinstance(exc, (SmtpError, BrokenConnection, TimeoutError)) and str(exc):
        return str(exc)  # said in words already
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
