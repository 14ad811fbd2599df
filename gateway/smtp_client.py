"""The SMTP client delivery speaks to the next hop, with PIPELINING (RFC 2920).

Why not aiosmtplib, which the gateway used before: it cannot read pipelined
replies (its protocol drops what arrives while a parsed reply awaits pickup),
so every message cost four round trips (MAIL, RCPT, DATA, content), each a TLS
record and a send on both sides. With PIPELINING, which every common MTA
offers, MAIL, all RCPTs and DATA go in one write and the content in a second:
two round trips whatever the number of recipients.

The client knows the SMTP state machine and nothing of queues or verdicts:
``send`` returns what the next hop said to each recipient, and leaves the
connection ready for the next message (RSET after a refusal) or closes it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import ssl
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

MAX_LINE = 8192  # RFC 5321 4.5.3.1.5 allows 512; real servers stay far below this
MAX_REPLY = 4 * MAX_LINE  # a multiline reply (EHLO's is a few hundred bytes)
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|\r?\n)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Reply:
    code: int
    text: str  # the lines' texts, joined by "\n"

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300


class SmtpError(Exception):
    """The next hop does not offer what this connection needs."""


class Refused(SmtpError):
    """The next hop refused a step outside a message's envelope (session, STARTTLS, AUTH)."""

    def __init__(self, step: str, reply: Reply) -> None:
        super().__init__(f"the next hop refused {step}: {reply}")
        self.reply = reply


class BrokenConnection(ConnectionError):
    """The connection closed, or the peer said something that is not SMTP."""


class _Wire(asyncio.Protocol):
    """Bytes in, complete replies out; and the write side's flow control.

    Replies are parsed as they arrive and queued, so replies to pipelined
    commands that come in one segment, or in several, are all kept in order.
    """

    def __init__(self, wait: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.wait = wait  # seconds for each reply, and for the transport to take more
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._lines: list[bytes] = []  # of the reply being received
        self._replies: deque[Reply] = deque()
        self._error: BrokenConnection | None = None
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None  # while the transport is paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return  # given up on (or closed by cgw): nothing more is read
        self._buffer += data
        start = 0
        while (end := self._buffer.find(b"\n", start)) != -1:
            self._line(bytes(self._buffer[start : end + 1]))
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > MAX_LINE:
            self._fail("the next hop sent a line longer than 8192 bytes")
        self._wake_reader()

    def _line(self, line: bytes) -> None:
        match = _REPLY_LINE.match(line)
        if match is None or (self._lines and not line.startswith(self._lines[0][:3])):
            self._fail(f"the next hop sent something that is not an SMTP reply: {line[:80]!r}")
            return
        self._lines.append(line)
        if sum(map(len, self._lines)) > MAX_REPLY:
            self._fail("the next hop sent a reply longer than 32 KiB")
        elif match.group(2) != b"-":
            text = "\n".join(
                part[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape")
                for part in self._lines
            )
            self._replies.append(Reply(int(match.group(1)), text))
            self._lines = []

    def _fail(self, why: str) -> None:
        """Give up on a peer that broke the protocol (or left): abort, no goodbye."""
        self.close(why, abort=True)

    def close(self, why: str, abort: bool = False) -> None:
        """Nothing more is read or written; ``why`` is what a later attempt raises."""
        if self._error is None:
            self._error = BrokenConnection(why)
        self._buffer.clear()
        self._lines = []
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def eof_received(self) -> bool:
        self._fail("the next hop closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self.transport = None
        self._fail(f"the connection to the next hop was lost{reason}")
        self._wake_reader()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def _wake_reader(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    @property
    def open(self) -> bool:
        return (
            self._error is None and self.transport is not None and not self.transport.is_closing()
        )

    @property
    def idle(self) -> bool:
        """Nothing received that no command asked for (a STARTTLS precondition)."""
        return not (self._buffer or self._lines or self._replies)

    def write(self, data: bytes) -> None:
        if not self.open:
            raise self._error or BrokenConnection("the connection to the next hop is closed")
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport takes more (stdlib's flow control, as StreamWriter does)."""
        if self._writable is not None:
            await self._within(self._writable, "to take more of the message")
        if self._error is not None:
            raise self._error

    async def reply(self) -> Reply:
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._readable = self._loop.create_future()
            try:
                await self._within(self._readable, "to reply")
            finally:
                self._readable = None
        return self._replies.popleft()

    async def _within(self, future: asyncio.Future[None], what: str) -> None:
        try:
            async with asyncio.timeout(self.wait):
                await future
        except TimeoutError:
            raise TimeoutError(f"the next hop took more than {self.wait:g} s {what}") from None


class SmtpClient:
    """One connection to a next hop, after its greeting and EHLO."""

    def __init__(self, wire: _Wire, local_hostname: str) -> None:
        self._wire = wire
        self.local_hostname = local_hostname
        self.extensions: dict[str, str] = {}  # EHLO keyword (upper case) -> its parameters

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        local_hostname: str,
        wait: float,
        tls: ssl.SSLContext | None = None,
    ) -> SmtpClient:
        """Connect (``tls``: implicit TLS, verified for ``host``), read the greeting, EHLO.

        ``wait`` is how many seconds connecting, each reply and each write may take.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(wait):
                _, wire = await loop.create_connection(lambda: _Wire(wait), host, port, ssl=tls)
        except TimeoutError:
            raise TimeoutError(f"no connection to {host} port {port} within {wait:g} s") from None
        client = cls(wire, local_hostname)
        try:
            greeting = await wire.reply()
            if greeting.code != 220:
                raise Refused("the session", greeting)
            await client._hello()
        except BaseException:
            client.close()
            raise
        return client

    @property
    def is_connected(self) -> bool:
        return self._wire.open

    def supports(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    async def _command(self, line: str) -> Reply:
        self._wire.write(_encoded(line))
        return await self._wire.reply()

    async def _hello(self) -> None:
        """EHLO, or HELO from a server that does not know EHLO (RFC 5321 3.2)."""
        reply = await self._command(f"EHLO {self.local_hostname}")
        if reply.code in (500, 502):
            reply = await self._command(f"HELO {self.local_hostname}")
            if reply.code != 250:
                raise Refused("HELO", reply)
            self.extensions = {}
            return
        if reply.code != 250:
            raise Refused("EHLO", reply)
        self.extensions = {}
        for line in reply.text.split("\n")[1:]:
            keyword, _, parameters = line.partition(" ")
            self.extensions[keyword.upper()] = parameters

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """Secure the connection, the certificate checked as ``context`` says; EHLO again."""
        if not self.supports("STARTTLS"):
            raise SmtpError(f"{server_hostname} does not offer STARTTLS")
        reply = await self._command("STARTTLS")
        if reply.code != 220:
            raise Refused("STARTTLS", reply)
        wire = self._wire
        if not wire.idle:  # RFC 3207 5: a reply injected before TLS must not count as inside it
            why = "the next hop sent more than its reply to STARTTLS"
            wire.close(why, abort=True)
            raise BrokenConnection(why)
        assert wire.transport is not None
        loop = asyncio.get_running_loop()
        try:
            secured = await loop.start_tls(
                wire.transport,
                wire,
                context,
                server_hostname=server_hostname,
                ssl_handshake_timeout=wire.wait,
            )
        except BaseException:
            wire.close("the TLS handshake failed", abort=True)  # start_tls closed the transport
            raise
        if secured is None:
            raise BrokenConnection("the next hop closed the connection during the TLS handshake")
        wire.transport = secured
        await self._hello()

    async def login(self, username: str, password: str) -> None:
        """AUTH PLAIN, or LOGIN where that is all the next hop offers (both need TLS)."""
        offered = self.extensions.get("AUTH", "").upper().split()

        def b64(text: str) -> str:
            return base64.b64encode(text.encode()).decode()

        if "PLAIN" in offered:
            reply = await self._command("AUTH PLAIN " + b64(f"\0{username}\0{password}"))
        elif "LOGIN" in offered:
            reply = await self._command("AUTH LOGIN")
            for answer in (username, password):
                if reply.code != 334:
                    break
                reply = await self._command(b64(answer))
        else:
            named = " ".join(offered) or "none"
            raise SmtpError(f"the next hop offers no AUTH cgw speaks (PLAIN, LOGIN): {named}")
        if reply.code != 235:
            raise Refused("AUTH", reply)

    async def send(
        self, mail_from: str, options: Sequence[str], recipients: Sequence[str], content: bytes
    ) -> dict[str, Reply]:
        """One message: what the next hop said to each recipient.

        MAIL, the RCPTs and DATA go in one write where the next hop offers
        PIPELINING, one by one otherwise; either way every reply is read.
        A refused MAIL or DATA answers for every recipient it concerns.
        ``content`` has CRLF line endings only.
        """
        mail = f"MAIL FROM:<{mail_from}>" + "".join(f" {o}" for o in options)
        if self.supports("PIPELINING"):
            self._wire.write(
                b"".join(_encoded(c) for c in (mail, *(f"RCPT TO:<{r}>" for r in recipients)))
                + b"DATA\r\n"
            )
            mail_reply = await self._wire.reply()
            said = {r: await self._wire.reply() for r in recipients}
            data_reply: Reply | None = await self._wire.reply()
        else:
            mail_reply = await self._command(mail)
            said = {}
            if mail_reply.positive:
                said = {r: await self._command(f"RCPT TO:<{r}>") for r in recipients}
            data_reply = None
            if any(reply.positive for reply in said.values()):
                data_reply = await self._command("DATA")
        accepted = {r for r, reply in said.items() if reply.positive and mail_reply.positive}
        if data_reply is not None and data_reply.code == 354 and not accepted:
            # RFC 2920 3.1: the server took DATA although no recipient was accepted.
            self._wire.write(b".\r\n")
            await self._wire.reply()
            data_reply = None
        if not mail_reply.positive:
            await self._reset()
            return dict.fromkeys(recipients, mail_reply)
        if data_reply is None or data_reply.code != 354:  # None: every RCPT was refused
            await self._reset()
            return {r: data_reply if data_reply and r in accepted else said[r] for r in recipients}
        done = await self._content(content)
        return {r: done if r in accepted else said[r] for r in recipients}

    async def _content(self, content: bytes) -> Reply:
        """The message in 64 kB pieces, each once the connection took the last one.

        The message is held once: no joined copy of it, and no more than a
        piece in the TLS layer's buffers at a time (a 25 MB message would
        otherwise be there twice over).
        """
        try:
            pieces = dot_stuffed(content)
            last = next(pieces, b"")
            for piece in pieces:
                self._wire.write(last)
                await self._wire.drain()
                last = piece
            # The end of data rides with the last piece: one TLS record and one
            # send fewer a message (a 4 KB message is a single piece).
            self._wire.write(last + b".\r\n")
            return await self._wire.reply()
        except TimeoutError:
            self.close()  # mid-message: the connection cannot carry another one
            raise

    async def _reset(self) -> None:
        """RSET after a refusal; a connection that fails it is closed, not reused."""
        try:
            reply = await self._command("RSET")
        except (OSError, TimeoutError):
            reply = None
        if reply is None or reply.code != 250:
            self.close()

    async def quit(self) -> None:
        """QUIT politely, then close; the connection is done with either way."""
        if self.is_connected:
            with contextlib.suppress(OSError, TimeoutError):
                await self._command("QUIT")
        self.close()

    def close(self) -> None:
        self._wire.close("cgw closed the connection")


def _encoded(line: str) -> bytes:
    """A command line; no control character may smuggle a second command into it."""
    if _CONTROL.search(line):
        raise ValueError(f"a control character in an SMTP command: {line!r}")
    return line.encode("utf-8") + b"\r\n"


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
