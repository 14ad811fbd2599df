"""Handing a message to the next hop: a narrow Relay protocol, two implementations.

``OutboxRelay`` writes files under ``data_dir/outbox`` (the embedded default:
one ``ID.eml`` as it would go on the wire, beside ``ID.json`` with the
envelope; a repeated delivery of the same message rewrites the same files).
``SmtpRelay`` speaks SMTP with aiosmtplib and never in the clear: STARTTLS
is demanded (``start_tls=True``; aiosmtplib's default would fall back to
plaintext) or the connection is implicit TLS, and the certificate must
verify for the host name. Any failure of TLS defers the message.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import aiosmtplib

from gateway.queue import RecipientResult, Verdict
from gateway.settings import DeliveryTarget


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
        self._idle: list[tuple[float, aiosmtplib.SMTP]] = []

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
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError, TimeoutError):
                await close_quietly(pooled)  # it went stale while idle: start afresh
            else:
                self._give_back(pooled)
                return results
        client = aiosmtplib.SMTP(
            hostname=self.target.host,
            port=self.target.port,
            use_tls=self.target.tls == "implicit",
            start_tls=self.target.tls == "starttls",
            tls_context=self.tls_context,
            local_hostname=self.local_hostname,
            timeout=self.timeout,
        )
        try:
            await client.connect()
            if self.target.username:
                await client.login(self.target.username, self.target.password or "")
            results = await transaction(client, mail_from, recipients, content)
        except aiosmtplib.SMTPResponseException as exc:  # greeting or AUTH refused
            await close_quietly(client)
            result = RecipientResult(verdict_for(exc.code), f"{exc.code} {exc.message}")
            return dict.fromkeys(recipients, result)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await close_quietly(client)
            return dict.fromkeys(
                recipients, RecipientResult(Verdict.DEFERRED, describe_failure(exc))
            )
        self._give_back(client)
        return results

    def _take_idle(self) -> aiosmtplib.SMTP | None:
        now = time.monotonic()
        while self._idle:
            since, client = self._idle.pop()
            if client.is_connected and now - since < self.max_idle:
                return client
            client.close()
        return None

    def _give_back(self, client: aiosmtplib.SMTP) -> None:
        if client.is_connected and len(self._idle) < self.pool_size:
            self._idle.append((time.monotonic(), client))
        else:
            client.close()

    async def close(self) -> None:
        """QUIT every idle connection (at shutdown)."""
        idle, self._idle = self._idle, []
        for _, client in idle:
            await close_quietly(client)


async def transaction(
    client: aiosmtplib.SMTP, mail_from: str, recipients: Sequence[str], content: bytes
) -> dict[str, RecipientResult]:
    """MAIL, RCPT, DATA on a ready connection: what the next hop said per recipient.

    Connection-level failures propagate; the caller decides whether another
    host is worth trying. A refusal resets the envelope (RSET), so the
    connection can carry the next message.
    """
    options = _mail_options(mail_from, recipients, content)
    encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
    if client.supports_extension("size"):
        options.insert(0, f"SIZE={len(content)}")
    results: dict[str, RecipientResult] = {}
    try:
        await client.mail(mail_from, options=options, encoding=encoding)
        for recipient in recipients:
            try:
                await client.rcpt(recipient, encoding=encoding)
            except aiosmtplib.SMTPRecipientRefused as exc:
                results[recipient] = RecipientResult(
                    verdict_for(exc.code), f"{exc.code} {exc.message}"
                )
        if len(results) == len(recipients):
            await _reset(client)
            return results
        reply = await send_data(client, content)
    except aiosmtplib.SMTPResponseException as exc:
        await _reset(client)
        failed = RecipientResult(verdict_for(exc.code), f"{exc.code} {exc.message}")
        return {r: results.get(r, failed) for r in recipients}
    delivered = RecipientResult(Verdict.DELIVERED, f"250 {reply}")
    return {r: results.get(r, delivered) for r in recipients}


async def send_data(client: aiosmtplib.SMTP, content: bytes) -> str:
    """DATA, written in 64 kB pieces, each once the connection took the last one.

    aiosmtplib's own DATA copies the message three times and hands all of it
    to the TLS layer at once, which holds it twice more: five copies of a
    25 MB message. Here the message is held once. ``content`` has CRLF line
    endings only (the gateway refuses anything else and writes nothing else).
    """
    start = await client.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    try:
        pieces = dot_stuffed(content)
        last = next(pieces, b"")
        for piece in pieces:
            protocol.write(last)
            await protocol._drain_helper()  # stdlib's flow control, which aiosmtplib carries
            last = piece
        # The end of data rides with the last piece: one TLS record and one
        # send fewer a message (a 4 KB message is a single piece).
        protocol.write(last + b".\r\n")
        done = await protocol.read_response(timeout=client.timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, ConnectionError):
        client.close()  # mid-message: the connection cannot carry another one
        raise
    if done.code != 250:
        raise aiosmtplib.SMTPDataError(done.code, done.message)
    return done.message


_PIECE = 1 << 16


def dot_stuffed(content: bytes) -> Iterator[bytes]:
    """``content`` with RFC 5321 4.5.2 transparency, in pieces, ending in CRLF.

    A line that starts with a dot gets a second one, also where a line
    starts exactly at a piece's boundary.
    """
    at_line_start = True
    for start in range(0, len(content), _PIECE):
        piece = content[start : start + _PIECE].replace(b"\n.", b"\n..")
        if at_line_start and piece.startswith(b"."):
            piece = b"." + piece
        at_line_start = piece.endswith(b"\n")
        yield piece
    if content and not content.endswith(b"\r\n"):
        yield b"\r\n"


async def _reset(client: aiosmtplib.SMTP) -> None:
    """RSET after a refusal; a connection that fails it is closed, not reused."""
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, OSError):
        client.close()


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
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def close_quietly(client: aiosmtplib.SMTP) -> None:
    if client.is_connected:
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            client.close()
