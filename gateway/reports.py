"""Reports to senders, queued in the same transaction as the event they report.

A report (a bounce or a held notice, see ``bounce``) is a message of its own,
from the null sender, in the queue like any other. It is sealed into the
caller's ``SpoolBatch`` as an inline copy; that copy, its queue row and its
audit entry commit together with what it reports. A crash can therefore neither
lose the report of a failure nor send a report about something that never
happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session

from gateway.audit import AuditAction, AuditEntry, AuditLog
from gateway.bounce import FailedRecipient, build_dsn, build_held_notice
from gateway.queue import QueuedRecipient, QueueStore, new_message_id
from gateway.spool import InlineCopy, SpoolBatch, store_inline

# A held recipient in a notice: not delivered yet, for a security reason (RFC 3463).
HELD_STATUS = "4.7.0"


@dataclass(frozen=True)
class Report:
    """A report sealed in the spool, waiting for its queue row."""

    report_id: str
    recipient: str  # the sender of the message reported on
    about: str  # the queue id of that message, or "-" when it was never queued
    action: AuditAction
    size: int


class Reports:
    def __init__(self, audit: AuditLog, hostname: str, retention: timedelta) -> None:
        """``retention``: how long the quarantine holds (the notice says when it returns)."""
        self.audit = audit
        self.hostname = hostname
        self.retention = retention

    def owed(
        self,
        batch: SpoolBatch,
        sender: str,
        original: bytes,
        about: str,
        now: datetime,
        failed: Sequence[FailedRecipient] = (),
        held: Sequence[tuple[str, str]] = (),
        arrived: datetime | None = None,
    ) -> list[Report]:
        """What ``sender`` is owed about a message: a bounce for ``failed``, a
        notice for ``held``; nothing for the null sender (no report on a report)."""
        if not sender:
            return []
        reports = []
        if failed:
            reports.append(self.bounce(batch, sender, original, failed, about, now, arrived))
        if held:
            reports.append(self.held_notice(batch, sender, original, held, about, now))
        return reports

    def bounce(
        self,
        batch: SpoolBatch,
        sender: str,
        original: bytes,
        failed: Sequence[FailedRecipient],
        about: str,
        now: datetime,
        arrived: datetime | None = None,
    ) -> Report:
        """Recipients that will never get the message (which arrived at ``arrived``)."""
        content = build_dsn(self.hostname, sender, original, failed, now, about, arrived)
        return self._store(batch, sender, content, about, AuditAction.MESSAGE_BOUNCED, now)

    def held_notice(
        self,
        batch: SpoolBatch,
        sender: str,
        original: bytes,
        held: Sequence[tuple[str, str]],
        about: str,
        now: datetime,
    ) -> Report:
        """Recipients whose copy waits in the quarantine: (address, why) each."""
        recipients = [FailedRecipient(address, HELD_STATUS, why) for address, why in held]
        content = build_held_notice(
            self.hostname, sender, original, recipients, now, about, now + self.retention
        )
        return self._store(batch, sender, content, about, AuditAction.SENDER_NOTIFIED, now)

    @staticmethod
    def _store(
        batch: SpoolBatch,
        sender: str,
        content: bytes,
        about: str,
        action: AuditAction,
        now: datetime,
    ) -> Report:
        report_id = new_message_id(now)
        batch.store(report_id, content)
        return Report(report_id, sender, about, action, len(content))

    def enqueue(self, session: Session, reports: Sequence[Report], now: datetime) -> None:
        """The reports' queue rows and audit entries, in the caller's transaction."""
        for report in reports:
            self._enqueue(session, report, now)

    def _enqueue(self, session: Session, report: Report, now: datetime) -> None:
        QueueStore.enqueue(
            session,
            report.report_id,
            "",
            None,
            report.size,
            [QueuedRecipient(report.recipient)],
            now,
            is_bounce=True,
        )
        self.audit.record(
            session,
            AuditEntry(
                action=report.action,
                actor="gateway",
                message_id=report.about,
                recipient=report.recipient,
                detail=f"delivery status notification {report.report_id}",
            ),
            now,
        )


@dataclass(frozen=True)
class EnqueueReports:
    """``Reports.enqueue`` as part of another transaction; a value, so that it
    pickles with that transaction (see ``queue.ClaimDue``)."""

    reports: Reports
    owed: tuple[Report, ...]
    now: datetime
    inline: tuple[InlineCopy, ...]  # their sealed copies (``SpoolBatch.inline``)

    def __call__(self, session: Session) -> None:
        store_inline(session, self.inline, self.now)
        self.reports.enqueue(session, self.owed, self.now)
