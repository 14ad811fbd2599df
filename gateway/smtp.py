"""The submission front end: aiosmtpd hooks that translate, and nothing more.

``SubmissionProtocol`` adds what aiosmtpd lacks for a server on the internet:
a per-client connection cap, a 421 before an idle or overlong session is
closed, and enhanced status codes on every reply. ``SubmissionHandler``'s
hooks build facts, ask ``policies``, and answer with ``replies``; storing
an accepted message is ``intake``'s job.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, SupportsIndex, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, TLSSetupException

from consent_registry.addresses import Address, AddressError, parse_address
from gateway import replies
from gateway.auth import Authenticator
from gateway.headers import (
    HeaderError,
    HeaderField,
    sender_addresses,
    shown_addresses,
)
from gateway.intake import HeaderTooLarge, IncomingMessage, Intake, StorageFullError
from gateway.policy_gate import PolicyGate
from policies.decision import Decision, Outcome
from policies.engine import sender_owns
from policies.facts import SenderFacts

if TYPE_CHECKING:
    from asyncio.streams import _ReaduntilBuffer  # typeshed: what readuntil takes

log = logging.getLogger(__name__)

_LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"  # aiosmtpd's words


class ConnectionLimiter:
    """Open connections per client address, capped; and the sessions themselves,
    so that a shutdown can let each finish its transaction."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self.open: Counter[str] = Counter()
        self.sessions: set[SubmissionProtocol] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    def acquire(self, client: str, session: SubmissionProtocol) -> bool:
        if self.open[client] >= self.per_client:
            return False
        self.open[client] += 1
        self.sessions.add(session)
        self._empty.clear()
        return True

    def release(self, client: str, session: SubmissionProtocol) -> None:
        self.open[client] -= 1
        if self.open[client] <= 0:
            del self.open[client]
        self.sessions.discard(session)
        if not self.sessions:
            self._empty.set()

    async def drain(self, grace: float) -> int:
        """Stop every session once its transaction is done; after ``grace``
        seconds, stop the rest. Returns how many had to be cut off."""
        for session in list(self.sessions):
            session.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), grace)
        remaining = list(self.sessions)
        for session in remaining:
            session.close_with(replies.shutting_down(session.hostname))
        return len(remaining)


class SubmissionEnvelope(Envelope):
    """aiosmtpd's envelope plus the policy's decision for each recipient,
    and the message (streamed into the spool) instead of ``content``."""

    def __init__(self) -> None:
        super().__init__()
        self.recipient_keys: set[str] = set()
        self.decisions: dict[str, Decision] = {}
        self.message: IncomingMessage | None = None


# A path in its everyday form: <dot-atom@LDH-labels>, ASCII. Anything else
# (quoted local parts, address literals, UTF-8, spaces) goes to aiosmtpd's
# full RFC 5322 parser, which returns the same for these (a property test).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PLAIN_PATH = re.compile(rf"<(({_ATEXT}(?:\.{_ATEXT})*)@{_LABEL}(?:\.{_LABEL})*)>")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # the C0 controls and DEL
_END_OF_DATA = b".\r\n"


class _TlsLayer:
    """What aiosmtpd reads of its ``_tls_protocol``: that there is one (AUTH,
    EHLO, require_starttls) and its ``_extra``, which becomes ``session.ssl``."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        keys = ("sslcontext", "peercert", "cipher", "compression", "ssl_object")
        self._extra = {key: transport.get_extra_info(key) for key in keys}


class BareLineFeed(Exception):
    """A command line ended in LF without CR (see ``CommandLines``)."""


class CommandLines(asyncio.StreamReader):
    """The reader aiosmtpd reads commands from, on which only CRLF ends a line.

    aiosmtpd reads commands with ``readuntil()``, whose separator is LF
    alone: ``RCPT TO:<a>\\nRCPT TO:<b>`` was two commands in one line, the
    ambiguity SMTP smuggling lives on (RFC 5321 2.3.8 allows only CRLF). A
    line that ends in a bare LF raises ``BareLineFeed`` instead, and nothing
    after it is read: the session answers 521 and closes, as Postfix's
    ``smtpd_forbid_bare_newline = yes`` does. (DATA reads to CRLF itself.)
    """

    _refusing = False
    # The last octet handed out: past an overlong line aiosmtpd reads on in
    # pieces, and a CR can end one piece and its LF start the next.
    _last = b""

    async def readuntil(self, separator: _ReaduntilBuffer = b"\n") -> bytes:
        line = await super().readuntil(separator)
        crlf = line.endswith(b"\r\n") or (line == b"\n" and self._last == b"\r")
        if separator == b"\n" and not crlf:
            self._refusing = True
            self._buffer.clear()  # type: ignore[attr-defined]  # what came after it
            raise BareLineFeed
        self._last = line[-1:]
        return line

    async def read(self, n: int = -1) -> bytes:
        data = await super().read(n)
        self._last = data[-1:] or self._last
        return data

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        if not self._refusing:
            super().feed_data(data)

    def buffered_lines(self, last: bytes) -> list[bytes]:
        """The lines already here, as ``readuntil(b"\\r\\n")`` would return them
        one by one, up to and including the first line that is ``last``.

        DATA takes them without an await each: a 4 KB message is about sixty
        lines, and each went through ``readuntil`` and its await (with the
        address checks by pattern, a fifth fewer Python calls a message in
        a worker). A line past the reader's limit, and what follows it, stay for
        ``readuntil`` (and its LimitOverrunError), as does all after ``last``.
        """
        buffer: bytearray = self._buffer  # type: ignore[attr-defined]
        limit: int = self._limit  # type: ignore[attr-defined]
        lines: list[bytes] = []
        start = 0
        while True:
            end = buffer.find(b"\r\n", start)
            if end < 0 or end - start > limit:
                break
            line = bytes(buffer[start : end + 2])
            lines.append(line)
            start = end + 2
            if line == last:
                break
        if start:
            del buffer[:start]
            self._last = b"\n"
            self._maybe_resume_transport()  # type: ignore[attr-defined]
        return lines


class _DataReceipt:
    """DATA's lines as they are read: the running size, the refusal once a
    limit is passed, and whether the last piece ended its line.

    ``take`` is the rule, line by line and in aiosmtpd's order: a line cut
    at the reader's limit, the size, a long line. ``take_lines`` takes the
    lines read together at once when none of them can pass a limit (nearly
    always): the same outcome, with a few steps a batch instead of about
    ten a line.
    """

    def __init__(self, message: IncomingMessage, size_limit: int | None, line_limit: int) -> None:
        self.message = message
        self.size_limit = size_limit
        self.line_limit = line_limit
        self.size = 0
        self.refusal: str | None = None
        self.mid_line = False

    def take_lines(self, lines: list[bytes]) -> bool:
        """Whole lines (each ending in CRLF; the end of data only last): True at the end."""
        ended = lines[-1] == _END_OF_DATA
        content = lines[:-1] if ended else lines
        size = self.size + sum(map(len, content))
        if (
            self.refusal is not None
            or self.mid_line
            or (self.size_limit and size > self.size_limit)
            or max(map(len, content), default=0) > self.line_limit
        ):
            return any(self.take(line) for line in lines)
        self.size = size
        self.message.add_lines([line[1:] if line.startswith(b".") else line for line in content])
        return ended

    def take(self, line: bytes) -> bool:
        """One line, or one piece of an overlong line: True at the end of data."""
        if not self.mid_line and line == _END_OF_DATA:
            return True
        self.mid_line = not line.endswith(b"\r\n")
        self.size += len(line)
        if self.refusal is not None:
            return False
        if self.mid_line:
            self.refusal = _LINE_TOO_LONG
        elif self.size_limit and self.size > self.size_limit:
            self.refusal = "552 Error: Too much mail data"
        elif len(line) > self.line_limit:
            self.refusal = _LINE_TOO_LONG
        else:
            self.message.add(line[1:] if line.startswith(b".") else line)
            return False
        self.message.discard()  # the disk space back now, not at the end of DATA
        return False


class SubmissionProtocol(SMTP):
    # RFC 5321 4.5.3.1.6: a text line is at most 1,000 octets with its CRLF
    # (aiosmtpd's default allows 1,001).
    line_length_limit = 1000

    def __init__(
        self,
        handler: SubmissionHandler,
        *,
        limiter: ConnectionLimiter,
        session_timeout: float,
        ended: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        """``ended``: called when the connection is gone (``gateway.spread`` counts them)."""
        # aiosmtpd keeps these in one class-level dict that every session's
        # EHLO grows and every new connection clears: each session gets its own.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(handler, **kwargs)
        # Again, with CommandLines for aiosmtpd's reader (nothing is connected yet).
        asyncio.StreamReaderProtocol.__init__(
            self,
            CommandLines(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )
        self._limiter = limiter
        self._session_timeout = session_timeout
        self._ended = ended
        self._client: str | None = None
        self._rejected = False
        self._deadline: asyncio.TimerHandle | None = None
        self._in_ehlo = False
        self._draining = False

    def _create_envelope(self) -> Envelope:
        return SubmissionEnvelope()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Refuse source routes (<@relay:user@host>) and control characters.

        aiosmtpd's parser would drop a route, or a CR inside the brackets, and
        pass on an address the client never wrote; it fails on a lone ``<``
        (IndexError) and on ``<a@[`` (AttributeError).
        """
        if arg.lstrip().startswith("<@") or _CONTROL.search(arg):
            return None, None
        plain = _PLAIN_PATH.match(arg)
        rest = arg[plain.end() :].lstrip(" \t") if plain else ""
        # Comments and RFC 2047 encoded words are the parser's business.
        if plain is None or rest.startswith("(") or "=?" in plain.group(1):
            try:
                return super()._getaddr(arg)
            except (IndexError, AttributeError):  # the parser's crash: a syntax error, not a fault
                return None, None
        # The everyday form, as the full parser would read it: it cost a tenth
        # of the event loop's time at load (two paths a message).
        address = plain.group(1)
        if self.local_part_limit and len(plain.group(2)) > self.local_part_limit:
            return None, None
        return address, rest

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:  # the TLS layer after STARTTLS
            super().connection_made(transport)
            return
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if peer else "unknown"
        if not self._limiter.acquire(client, self):
            self._rejected = True
            # uvloop's transports are no subclasses of asyncio's: a cast, not a check.
            transport = cast(asyncio.WriteTransport, transport)
            transport.write(replies.too_many_connections(self.hostname).encode() + b"\r\n")
            transport.close()
            return
        self._client = client
        super().connection_made(transport)
        self._deadline = self.loop.call_later(
            self._session_timeout, self.close_with, replies.session_timeout(self.hostname)
        )

    def connection_lost(self, error: Exception | None) -> None:
        self._ended()
        if self._rejected:
            return
        self._finished()
        super().connection_lost(error)

    def _finished(self) -> None:
        """The session is over for the gateway (once, at close or at connection loss).

        Not only at connection loss: closing a TLS connection waits for the
        client's close_notify, which a client may never send.
        """
        if self._client is not None:
            self._limiter.release(self._client, self)
            self._client = None
        if self._deadline is not None:
            self._deadline.cancel()

    def eof_received(self) -> bool | None:
        if self._rejected:
            return False
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        """Any bytes from the client restart the idle timer, message data too:
        aiosmtpd restarts it only per command, so a large attachment on a slow
        line was cut off as idle. The session timeout still bounds a trickle."""
        if self.transport is not None and not self.transport.is_closing():
            self._reset_timeout()
        super().data_received(data)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, BareLineFeed):
            log.warning("%s sent a bare LF in a command line: closed", self._client or "a client")
            reply = replies.bare_line_feed(self.hostname)
            self.close_with(reply)
            return reply
        return await super().handle_exception(error)

    def _timeout_cb(self) -> None:
        self.close_with(replies.idle_timeout(self.hostname))

    def drain(self) -> None:
        """The gateway is stopping: a session between transactions is told so
        and closed now; one inside a transaction finishes it first (see push)."""
        self._draining = True
        if not self._in_transaction():
            self.close_with(replies.shutting_down(self.hostname))

    def _in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def close_with(self, reply: str) -> None:
        """Say why before closing: aiosmtpd alone would just hang up."""
        if self.transport is None:
            return
        if not self.transport.is_closing():
            # AttributeError: asyncio's TLS transport after its protocol went away.
            with contextlib.suppress(RuntimeError, OSError, AttributeError):
                self._writer.write(reply.encode() + b"\r\n")
            self.transport.close()
        self._finished()

    async def smtp_EHLO(self, hostname: str) -> None:
        # aiosmtpd adds the SIZE and SMTPUTF8 allowance to MAIL at every EHLO:
        # start from the base limit, so repeating EHLO cannot grow it.
        self.command_size_limits.pop("MAIL", None)
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS on the event loop's own TLS layer.

        aiosmtpd builds asyncio's pure-Python SSLProtocol by hand; under
        uvloop, ``loop.start_tls`` gives uvloop's compiled one, and every
        later command, reply and message passes through it (about 5 % of
        cgw's CPU per message). What follows the handshake stays aiosmtpd's
        (its connection_made): a fresh session and its STARTTLS hook.

        RFC 3207 4.2: plaintext pipelined behind STARTTLS is discarded, here,
        before the handshake. After it, the reader may already hold a command
        sent under TLS (TLS 1.3 lets a client send EHLO in the segment with
        its Finished, which start_tls decrypts before this task resumes):
        aiosmtpd's connection_made clears the reader, so that is put back.
        """
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if not self.tls_context:
            await self.push("454 TLS not available")
            return
        await self.push("220 Ready to start TLS")
        plain = cast(asyncio.WriteTransport, self.transport)  # uvloop's: no asyncio subclass
        buffer: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        buffer.clear()
        try:
            secured = await self.loop.start_tls(plain, self, self.tls_context, server_side=True)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error
        if secured is None:  # the connection closed during the handshake
            return
        early = bytes(buffer)
        self._original_transport = plain
        self._tls_protocol = _TlsLayer(secured)  # type: ignore[assignment]
        self.connection_made(secured)
        buffer.extend(early)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, streaming: each line goes to the spool as it arrives.

        aiosmtpd keeps every line, then joins and copies them: about four
        times the message in memory per session. Here a session holds its
        header block and 64 kB of body at most. The checks, the limits and
        their replies are aiosmtpd's.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert isinstance(envelope, SubmissionEnvelope)
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        assert isinstance(self.event_handler, SubmissionHandler)
        message = self.event_handler.intake.receive()
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            refusal = await self._receive(message)
            if refusal is not None:
                await self.push(refusal)
                self.envelope = self._create_envelope()
                return
            envelope.message = message
            status = await self._call_handler_hook("DATA")
            self.envelope = self._create_envelope()
            await self.push(status)
        finally:
            message.discard()  # a no-op once the spool adopted it

    async def _receive(self, message: IncomingMessage) -> str | None:
        """Read DATA up to the lone dot; a refusal when a limit was passed.

        Past a limit the rest is still read (and dropped), so that the reply
        comes after the data, as RFC 5321 4.2.5 implies. The tail of an
        overlong line is never taken for the lone dot, even when it is one.
        """
        receipt = _DataReceipt(message, self.data_size_limit, self.line_length_limit)
        reader = cast(CommandLines, self._reader)
        ended = False
        while not ended and self.transport is not None:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.CancelledError:
                self._writer.close()  # the connection was lost during DATA
                raise
            except asyncio.LimitOverrunError as exc:
                ended = receipt.take(await reader.read(exc.consumed))
                continue
            if line == _END_OF_DATA:  # after the end, the next command waits
                ended = receipt.take(line)
            else:
                ended = receipt.take_lines([line, *reader.buffered_lines(_END_OF_DATA)])
        if receipt.refusal is None:
            message.end()
        return receipt.refusal

    async def push(self, status: Any) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # closed by the gateway (close_with), after its last word
        if isinstance(status, str) and not self._in_ehlo:
            status = replies.enhance(status)
        await super().push(status)
        if self._draining and not self._in_ehlo and not self._in_transaction():
            self.close_with(replies.shutting_down(self.hostname))


@dataclass
class SubmissionHandler:
    """The hooks aiosmtpd calls; each is a short translation."""

    authenticator: Authenticator
    intake: Intake
    gate: PolicyGate
    max_recipients: int
    bounce_denials: bool = False  # CGW_DENIAL_MODE=bounce
    _log: logging.Logger = field(default=log, repr=False)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250 HELP"]

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        blob = await _initial_or_challenge(server, args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            await server.push("501 5.5.2 Malformed AUTH PLAIN response")
            return AuthResult(success=False, handled=True)
        return await self._login(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        login = await _initial_or_challenge(server, args, "Username:")
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth("Password:")
        if password is MISSING or not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._login(server, login, password)

    async def _login(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        assert server.session is not None
        client = str(server.session.peer[0]) if server.session.peer else "unknown"
        # Credentials that are not UTF-8 cannot match, but they are a failed
        # login like any other: audited, delayed, counted towards the lock-out.
        outcome = await self.authenticator.authenticate(
            client, login.decode("utf-8", "replace"), password.decode("utf-8", "replace")
        )
        if outcome.sender is None:
            await server.push(
                replies.AUTH_LOCKED_OUT if outcome.locked_out else replies.AUTH_INVALID
            )
            return AuthResult(success=False, handled=True)
        return AuthResult(success=True, auth_data=outcome.sender, message=replies.AUTH_OK)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        sender = _sender(session)
        parsed, refusal = _parse(address, "SMTPUTF8" in options)
        if parsed is None:
            return refusal
        if not sender_owns(sender, parsed.key):
            return replies.sender_not_owned(address)
        envelope.mail_from = parsed.written
        envelope.mail_options.extend(options)
        envelope.smtp_utf8 = "SMTPUTF8" in options
        return replies.SENDER_OK

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        assert isinstance(envelope, SubmissionEnvelope)
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        parsed, refusal = _parse(address, envelope.smtp_utf8)
        if parsed is None:
            return refusal
        sender = _sender(session)
        (decision,) = await self.gate.decide_async(sender, [parsed])
        if decision.outcome is Outcome.DENY:
            await self.intake.record_refusal(sender, parsed.written, decision)
            if not self.bounce_denials:
                return replies.decision(decision, parsed.written)
        if parsed.key not in envelope.recipient_keys:
            envelope.recipient_keys.add(parsed.key)
            envelope.rcpt_tos.append(parsed.written)
            envelope.rcpt_options.extend(options)
            envelope.decisions[parsed.written] = decision
        return replies.recipient_accepted(decision, parsed.written)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """A fault is answered here, not in handle_exception: a hook that
        returns lets aiosmtpd end the transaction, one that raises leaves it open."""
        try:
            return await self._data(session, envelope)
        except Exception as exc:
            self._log.error("could not take a message: %s", exc, exc_info=exc)
            return replies.TEMPORARY_FAULT

    async def _data(self, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope, SubmissionEnvelope) and envelope.mail_from is not None
        message = envelope.message
        assert message is not None
        if message.line_ending is not None:
            return replies.bare_line_ending(message.line_ending)
        if isinstance(message.header_error, HeaderTooLarge):
            return replies.HEADER_TOO_BIG
        if message.header_error is not None:
            return replies.bad_header(str(message.header_error))
        sender = _sender(session)
        try:
            for address in sender_addresses(message.fields):
                if not _owned(sender, address):
                    return replies.header_sender_not_owned(address)
        except HeaderError as exc:
            return replies.bad_header(str(exc))
        decisions = await self._apply_header_rules(sender, envelope.decisions, message.fields)
        if decisions is None:
            return replies.PATIENTS_EXPOSED
        try:
            message_id = await self.intake.accept(
                sender, envelope.mail_from, list(decisions.items()), message
            )
        except StorageFullError:
            return replies.STORAGE_FULL
        if message_id is None:
            return replies.ALL_REFUSED_REPORTED
        held = sum(d.outcome is Outcome.QUARANTINE for d in decisions.values())
        return replies.queued(message_id, held)

    async def _apply_header_rules(
        self, sender: SenderFacts, decisions: dict[str, Decision], fields: list[HeaderField]
    ) -> dict[str, Decision] | None:
        """Patients must not see each other's addresses: None means refuse the message.

        In bounce mode the patient recipients are refused (and reported) instead,
        and the rest of the message goes on.
        """
        patients = frozenset(
            d.patient_id
            for d in decisions.values()
            if d.patient_id is not None and d.outcome is not Outcome.DENY
        )
        exposure = await self.gate.exposure_async(patients, shown_addresses(fields))
        if exposure is None:
            return decisions
        for address, decision in decisions.items():
            if decision.patient_id in patients:
                refusal = replace(exposure, patient_id=decision.patient_id)
                await self.intake.record_refusal(sender, address, refusal)
        if not self.bounce_denials:
            return None
        return {
            a: (replace(exposure, patient_id=d.patient_id) if d.patient_id in patients else d)
            for a, d in decisions.items()
        }

    async def handle_exception(self, error: Exception) -> str:
        """A fault in the gateway is temporary for the client: never a 500.

        A client that went away mid-command, or whose TLS handshake failed,
        is no fault of the gateway's: one line, no traceback.  aiosmtpd
        wraps a reset during STARTTLS in ``TLSSetupException``, so the
        causes count too.
        """
        if _client_side(error):
            self._log.info("SMTP client went away: %r (%r)", error, error.__cause__)
        else:
            self._log.error("SMTP session fault: %s", error, exc_info=error)
        return replies.TEMPORARY_FAULT


def _client_side(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a dropped connection or a failed handshake."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (ConnectionError, TLSSetupException)):
            return True
        seen = seen.__cause__
    return False


async def _initial_or_challenge(server: SMTP, args: list[str], prompt: str) -> bytes | None:
    """The client's first AUTH response, sent inline or after a 334 prompt."""
    if len(args) > 1:
        try:
            return base64.b64decode(args[1], validate=True)
        except (binascii.Error, ValueError):
            await server.push("501 5.5.2 Cannot decode base64")
            return None
    answer = await server.challenge_auth(prompt)
    return answer if isinstance(answer, bytes) else None


def _sender(session: Session) -> SenderFacts:
    assert isinstance(session.auth_data, SenderFacts)
    return session.auth_data


def _parse(address: str, smtputf8: bool) -> tuple[Address | None, str]:
    if not address.isascii() and not smtputf8:
        return None, replies.NEEDS_SMTPUTF8
    try:
        return parse_address(address), ""
    except AddressError as exc:
        return None, replies.bad_address(address, str(exc))


def _owned(sender: SenderFacts, address: str) -> bool:
    try:
        return sender_owns(sender, parse_address(address).key)
    except AddressError:
        return False
