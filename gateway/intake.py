"""Accepting a message: stamp its header, spool it durably, queue it, audit it.

The message is sealed while DATA arrives (``IncomingMessage``): in memory
up to the spool's inline limit, then into the spool's ``tmp`` directory; only
its header block is kept whole, to be read and stamped, so ten 25 MB uploads
cost megabytes, not hundreds of them.

The order is the promise behind 250: a message in a file is fsync'ed into
the spool first; then its queue rows, audit entries, the reports the sender
is owed (a held notice, a bounce in bounce mode) and the inline copies of
message and reports commit in one transaction, and only then does the
client hear 250. A fault at any step removes what was written and the
client hears 451 (or 452 when the disk is full).

Fresh mail goes to delivery directly when it has a free slot: the
recipients are queued already claimed and handed over, so the queue is not
polled or claimed for them (``DeliveryHandOff``); the queue rows stay the
record, should the process die.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Protocol

from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from consent_registry.writes import Writes
from gateway import replies
from gateway.audit import AuditAction, AuditEntry, AuditLog
from gateway.bounce import FailedRecipient
from gateway.headers import (
    CRLF,
    HeaderError,
    HeaderField,
    bare_line_ending,
    parse_fields,
    rewrite_header,
)
from gateway.queue import (
    Claim,
    ClaimedMessage,
    ClaimedRecipient,
    QueuedRecipient,
    QueueStore,
    new_message_id,
)
from gateway.reports import Report, Reports
from gateway.spool import InlineCopy, Spool, SpoolFull, SpoolWriter, storage_full, store_inline
from policies.decision import Decision, Outcome
from policies.facts import SenderFacts

log = logging.getLogger(__name__)


# The header block is read whole (to check From and To, and to stamp it);
# beyond this it is refused rather than held in memory. Ten times Postfix's
# header_size_limit: real headers are a few kB.
HEADER_LIMIT = 1 << 20
_WRITE_SIZE = 1 << 16


@functools.lru_cache(maxsize=4)
def _header_date(second: datetime) -> str:
    """``second`` as a Date header's value. Cached: at full load every
    message of the same second gets the same stamp, and the email package's
    formatting was a few per cent of a worker's time per message."""
    return format_datetime(second)


class HeaderTooLarge(HeaderError):
    """The header block passed ``HEADER_LIMIT``."""


class StorageFullError(Exception):
    """No room to store the message: the client should try again later."""


class IncomingMessage:
    """One message while its DATA arrives, line by line (dot-unstuffed, CRLF-ended).

    The header block is kept until it ends, then stamped and written;
    the body goes to the spool writer in 64 kB pieces. The first problem
    (a bare CR or LF, an unusable header, a write that failed) stops the
    writing; the rest of DATA is still read, and only checked for bare line
    endings, which take precedence in the reply as they did before streaming.
    """

    def __init__(self, writer: SpoolWriter, stamp: Callable[[bytes], bytes]) -> None:
        self.writer = writer
        self._stamp = stamp
        self._header: list[bytes] = []
        self._header_size = 0
        self._body = bytearray()
        self._in_header = True
        self.fields: list[HeaderField] = []
        self.stamped_header = b""  # the header block as stored, with its empty line
        self.line_ending: str | None = None  # "bare LF" / "bare CR"
        self.header_error: HeaderError | None = None
        self.fault: OSError | None = None

    @property
    def message_id(self) -> str:
        return self.writer.message_id

    @property
    def spoiled(self) -> bool:
        return bool(self.line_ending or self.header_error or self.fault)

    def add(self, line: bytes) -> None:
        if self.spoiled:
            if self.line_ending is None:
                self.line_ending = bare_line_ending(line)
            return
        if not self._in_header:
            self._keep_body(line)
        elif line == CRLF:
            self._end_header()
        else:
            self._header_size += len(line)
            if self._header_size > HEADER_LIMIT:
                self._spoil(header_error=HeaderTooLarge("its header is larger than 1 MiB"))
            else:
                self._header.append(line)

    def add_lines(self, lines: list[bytes]) -> None:
        """``add`` for each of ``lines``; the body's lines are kept in one step.

        DATA hands over the lines that arrived together, about sixty for
        4 KB: one step for the body instead of one for each of its lines.
        """
        taken = 0
        while taken < len(lines) and (self._in_header or self.spoiled):
            self.add(lines[taken])
            taken += 1
        if taken < len(lines):
            self._keep_body(b"".join(lines[taken:]))

    def end(self) -> None:
        """DATA is complete (a message without an empty line is all header)."""
        if self._in_header and not self.spoiled:
            self._end_header()
        if self._body and not self.spoiled:
            self._write_body()

    def discard(self) -> None:
        self.writer.discard()

    def _end_header(self) -> None:
        self._in_header = False
        block = b"".join(self._header)
        self._header.clear()
        kind = bare_line_ending(block)
        if kind is not None:
            self._spoil(line_ending=kind)
            return
        try:
            self.fields = parse_fields(block)
            self.stamped_header = self._stamp(block)
        except HeaderError as exc:
            self._spoil(header_error=exc)
            return
        self._write(self.stamped_header)

    def _keep_body(self, data: bytes) -> None:
        """Body octets held until there are ``_WRITE_SIZE`` of them to write."""
        self._body += data
        if len(self._body) >= _WRITE_SIZE:
            self._write_body()

    def _write_body(self) -> None:
        chunk = bytes(self._body)
        self._body.clear()
        kind = bare_line_ending(chunk)  # whole lines: a CR or LF not in a CRLF is bare
        if kind is not None:
            self._spoil(line_ending=kind)
        else:
            self._write(chunk)

    def _write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
        except OSError as exc:
            self._spoil(fault=exc)

    def _spoil(
        self,
        line_ending: str | None = None,
        header_error: HeaderError | None = None,
        fault: OSError | None = None,
    ) -> None:
        self.line_ending, self.header_error, self.fault = line_ending, header_error, fault
        self._header.clear()
        self._body.clear()
        self.writer.discard()  # give the disk space back now, not at the end of DATA


class DeliveryHandOff(Protocol):
    """The delivery stage, as intake hands it fresh mail (``DeliveryWorker``)."""

    def reserve(self, now: datetime) -> Claim | None: ...

    def hand_over(self, message: ClaimedMessage | None) -> None: ...


class Intake:
    def __init__(
        self,
        writes: Writes,
        spool: Spool,
        audit: AuditLog,
        reports: Reports,
        hostname: str,
        on_accepted: Callable[[], None],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        deliveries: DeliveryHandOff | None = None,
    ) -> None:
        self.writes = writes
        self.spool = spool
        self.audit = audit
        self.reports = reports
        self.hostname = hostname
        self.on_accepted = on_accepted  # something was queued for the stages to find
        self.clock = clock
        self.deliveries = deliveries

    def receive(self) -> IncomingMessage:
        """A new message about to arrive. A spool that cannot take it shows
        when it outgrows memory (``SpoolWriter``), or at the commit: 452 or
        451 after the data, never 250."""
        now = self.clock()
        message_id = new_message_id(now)
        writer = self.spool.writer(message_id)
        return IncomingMessage(writer, lambda block: self._stamp(block, message_id, now))

    async def accept(
        self,
        sender: SenderFacts,
        mail_from: str,
        decided: Sequence[tuple[str, Decision]],
        message: IncomingMessage,
    ) -> str | None:
        """Store a message and the reports its sender is owed, all or nothing.

        Allowed and held recipients are queued; the sender is told of held
        ones in a notice and of refused ones (bounce mode) in a bounce.
        Returns the queue id, or None when every recipient was refused.
        """
        if message.fault is not None:
            if isinstance(message.fault, SpoolFull):
                raise StorageFullError(str(message.fault)) from message.fault
            raise message.fault
        now = self.clock()
        deliveries = self.deliveries
        claim = deliveries.reserve(now) if deliveries is not None else None
        store = asyncio.ensure_future(self._store(sender, mail_from, decided, message, now, claim))

        def stored(done: asyncio.Future[tuple[bool, ClaimedMessage | None, bool]]) -> None:
            # Handed over when the store ends, not when this session does: a
            # client that hangs up after "." cancels the session while the
            # store may still commit recipients claimed for this slot. (And
            # a failure nobody awaits any more is still seen, not warned of.)
            handed = _handed(done)
            if deliveries is not None and claim is not None:
                deliveries.hand_over(handed)

        store.add_done_callback(stored)
        kept, handed, more = await asyncio.shield(store)
        message_id = message.message_id
        held = sum(d.outcome is Outcome.QUARANTINE for _, d in decided)
        refused = sum(d.outcome is Outcome.DENY for _, d in decided)
        log.info(
            "%s from=<%s> user=%s size=%d recipients=%d held=%d refused=%d",
            message_id if kept else "-",
            mail_from,
            sender.username,
            message.writer.size,
            len(decided),
            held,
            refused,
            extra={"event": "accepted", "queue_id": message_id if kept else None},
        )
        if more or handed is None:
            self.on_accepted()
        return message_id if kept else None

    def _stamp(self, header_block: bytes, message_id: str, now: datetime) -> bytes:
        # No client host name or address: patients need not learn the
        # practice's internal network (as Postfix's header privacy checks do).
        date = _header_date(now.replace(microsecond=0))
        received = (
            f"Received: by {self.hostname} (Consent Gateway) with ESMTPSA id {message_id};\r\n"
            f"\t{date}\r\n"
        ).encode()
        return rewrite_header(
            header_block,
            prepend=[received],
            add_if_missing={
                "Message-ID": f"<{message_id}.{secrets.token_hex(4)}@{self.hostname}>".encode(),
                "Date": date.encode(),
            },
            remove=frozenset({"bcc"}),
        )

    async def _store(
        self,
        sender: SenderFacts,
        mail_from: str,
        decided: Sequence[tuple[str, Decision]],
        message: IncomingMessage,
        now: datetime,
        claim: Claim | None,
    ) -> tuple[bool, ClaimedMessage | None, bool]:
        """Spool and queue the message: whether any recipient was kept, what
        delivery takes over (with ``claim``), and whether more was queued.

        Only a message in a file takes a thread (to be fsync'ed); the event
        loop awaits the writer's commit itself.
        """
        kept = [(a, d) for a, d in decided if d.outcome is not Outcome.DENY]
        refused = [
            FailedRecipient(a, d.enhanced_code, replies.decision(d, a))
            for a, d in decided
            if d.outcome is Outcome.DENY
        ]
        held = [(a, d.sentence) for a, d in decided if d.outcome is Outcome.QUARANTINE]
        message_id = message.message_id
        about = message_id if kept else "-"
        header = message.stamped_header  # all a report quotes
        try:
            with self.spool.batch() as batch:
                if kept and message.writer.in_memory:
                    batch.adopt(message.writer)
                elif kept:
                    await asyncio.to_thread(batch.adopt, message.writer)
                reports = self.reports.owed(
                    batch, mail_from, header, about, now, failed=refused, held=held
                )
                queue_it = QueueAccepted(
                    self.audit,
                    self.reports,
                    sender,
                    message_id,
                    mail_from,
                    tuple(kept),
                    message.writer.size,
                    now,
                    claim,
                    tuple(reports),
                    tuple(batch.inline),
                )
                claimed = await self.writes.commit(queue_it)
        except SpoolFull as exc:
            raise StorageFullError(str(exc)) from exc
        except OperationalError as exc:
            if storage_full(exc):
                raise StorageFullError("the database's disk is full") from exc
            raise
        handed = None
        if claimed:
            size = message.writer.size
            handed = ClaimedMessage(
                message_id,
                mail_from,
                now,
                claimed,
                username=sender.username,
                size=size,
                content=message.writer.content(),
            )
        # Anything not handed over (held recipients, reports) is for the stages to find.
        return bool(kept), handed, bool(reports) or len(claimed) < len(kept)

    async def record_refusal(self, sender: SenderFacts, recipient: str, decision: Decision) -> None:
        await asyncio.to_thread(self._audit_refusal, sender, recipient, decision, self.clock())

    def _audit_refusal(
        self, sender: SenderFacts, recipient: str, decision: Decision, now: datetime
    ) -> None:
        entry = _decision_entry(AuditAction.MESSAGE_DENIED, sender, recipient, decision)
        self.writes.run(RecordAudit(self.audit, entry, now))


@dataclass(frozen=True)
class QueueAccepted:
    """The transaction that acknowledges a message: its queue rows, an audit
    entry per kept recipient, and the reports its sender is owed.

    A value, not a closure: with several worker processes it is run by the
    writer process (``consent_registry.writes``), so it must pickle.
    """

    audit: AuditLog
    reports: Reports
    sender: SenderFacts
    message_id: str
    mail_from: str
    kept: tuple[tuple[str, Decision], ...]
    size: int
    now: datetime
    claim: Claim | None
    owed: tuple[Report, ...]
    inline: tuple[InlineCopy, ...]  # the message and its reports, when spooled inline

    def __call__(self, session: Session) -> tuple[ClaimedRecipient, ...]:
        store_inline(session, self.inline, self.now)
        claimed: tuple[ClaimedRecipient, ...] = ()
        if self.kept:
            queued = [QueuedRecipient.decided(a, d) for a, d in self.kept]
            claimed = QueueStore.enqueue(
                session,
                self.message_id,
                self.mail_from,
                self.sender.username,
                self.size,
                queued,
                self.now,
                claim=self.claim,
            )
            for address, decision in self.kept:
                held = decision.outcome is Outcome.QUARANTINE
                action = AuditAction.MESSAGE_QUARANTINED if held else AuditAction.MESSAGE_ACCEPTED
                entry = _decision_entry(action, self.sender, address, decision, self.message_id)
                self.audit.record(session, entry, self.now)
        self.reports.enqueue(session, self.owed, self.now)
        return claimed


@dataclass(frozen=True)
class RecordAudit:
    """A transaction of one audit entry (a refusal at RCPT or DATA); it pickles."""

    audit: AuditLog
    entry: AuditEntry
    now: datetime

    def __call__(self, session: Session) -> None:
        self.audit.record(session, self.entry, self.now)


def _handed(
    store: asyncio.Future[tuple[bool, ClaimedMessage | None, bool]],
) -> ClaimedMessage | None:
    """What a finished store hands to delivery: nothing if it failed."""
    if store.cancelled() or store.exception() is not None:
        return None
    return store.result()[1]


def _decision_entry(
    action: AuditAction,
    sender: SenderFacts,
    recipient: str,
    decision: Decision,
    message_id: str | None = None,
) -> AuditEntry:
    """One audit line per decision: who, to whom, what and why; never content."""
    return AuditEntry(
        action=action,
        actor=sender.username,
        message_id=message_id,
        username=sender.username,
        recipient=recipient,
        patient_id=decision.patient_id,
        consent_id=decision.consent_id,
        decision=decision.outcome.value,
        reason=decision.reason.value,
        detail=f"rule {decision.rule}; protection {decision.protection.value}",
    )
