"""Accepting a message: stamp its header, spool it durably, queue it, audit it.

The order is the promise behind 250: the sealed file (and any report the
sender is owed: a held notice, a bounce in bounce mode) is fsync'ed into the
spool, then the queue rows and audit entries commit in one transaction, and
only then does the client hear 250. A fault at any step removes what was
written and the client hears 451 (or 452 when the disk is full).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime

from sqlalchemy import Engine
from sqlmodel import Session

from consent_registry.db import session_scope
from gateway import replies
from gateway.audit import AuditAction, AuditEntry, AuditLog
from gateway.bounce import FailedRecipient
from gateway.headers import rewrite_header
from gateway.queue import QueuedRecipient, QueueStore, new_message_id
from gateway.reports import Reports
from gateway.spool import Spool, SpoolFull
from policies.decision import Decision, Outcome
from policies.facts import SenderFacts

log = logging.getLogger(__name__)


class StorageFullError(Exception):
    """No room to store the message: the client should try again later."""


class Intake:
    def __init__(
        self,
        engine: Engine,
        spool: Spool,
        audit: AuditLog,
        reports: Reports,
        hostname: str,
        on_accepted: Callable[[], None],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.spool = spool
        self.audit = audit
        self.reports = reports
        self.hostname = hostname
        self.on_accepted = on_accepted
        self.clock = clock

    async def accept(
        self,
        sender: SenderFacts,
        mail_from: str,
        decided: Sequence[tuple[str, Decision]],
        content: bytes,
    ) -> str | None:
        """Store a message and the reports its sender is owed, all or nothing.

        Allowed and held recipients are queued; the sender is told of held
        ones in a notice and of refused ones (bounce mode) in a bounce.
        Returns the queue id, or None when every recipient was refused.
        """
        now = self.clock()
        message_id = new_message_id(now)
        stamped = self._stamp(content, message_id, now)
        kept = await asyncio.to_thread(
            self._store, sender, message_id, mail_from, decided, stamped, now
        )
        held = sum(d.outcome is Outcome.QUARANTINE for _, d in decided)
        refused = sum(d.outcome is Outcome.DENY for _, d in decided)
        log.info(
            "%s from=<%s> user=%s size=%d recipients=%d held=%d refused=%d",
            message_id if kept else "-",
            mail_from,
            sender.username,
            len(stamped),
            len(decided),
            held,
            refused,
            extra={"event": "accepted", "queue_id": message_id if kept else None},
        )
        self.on_accepted()
        return message_id if kept else None

    def _stamp(self, content: bytes, message_id: str, now: datetime) -> bytes:
        # No client host name or address: patients need not learn the
        # practice's internal network (as Postfix's header privacy checks do).
        received = (
            f"Received: by {self.hostname} (Consent Gateway) with ESMTPSA id {message_id};\r\n"
            f"\t{format_datetime(now)}\r\n"
        ).encode()
        return rewrite_header(
            content,
            prepend=[received],
            add_if_missing={
                "Message-ID": f"<{message_id}.{secrets.token_hex(4)}@{self.hostname}>".encode(),
                "Date": format_datetime(now).encode(),
            },
            remove=frozenset({"bcc"}),
        )

    def _store(
        self,
        sender: SenderFacts,
        message_id: str,
        mail_from: str,
        decided: Sequence[tuple[str, Decision]],
        content: bytes,
        now: datetime,
    ) -> bool:
        kept = [(a, d) for a, d in decided if d.outcome is not Outcome.DENY]
        refused = [
            FailedRecipient(a, d.enhanced_code, replies.decision(d, a))
            for a, d in decided
            if d.outcome is Outcome.DENY
        ]
        held = [(a, d.sentence) for a, d in decided if d.outcome is Outcome.QUARANTINE]
        about = message_id if kept else "-"
        try:
            with self.spool.batch() as batch:
                if kept:
                    batch.store(message_id, content)
                reports = []
                if refused and mail_from:
                    reports.append(
                        self.reports.bounce(batch, mail_from, content, refused, about, now)
                    )
                if held and mail_from:
                    reports.append(
                        self.reports.held_notice(batch, mail_from, content, held, about, now)
                    )
                with session_scope(self.engine) as session:
                    if kept:
                        self._enqueue(session, sender, message_id, mail_from, kept, content, now)
                    for report in reports:
                        self.reports.enqueue(session, report, now)
        except SpoolFull as exc:
            raise StorageFullError(str(exc)) from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(str(exc)) from exc
            raise
        return bool(kept)

    def _enqueue(
        self,
        session: Session,
        sender: SenderFacts,
        message_id: str,
        mail_from: str,
        kept: Sequence[tuple[str, Decision]],
        content: bytes,
        now: datetime,
    ) -> None:
        queued = [QueuedRecipient.decided(address, decision) for address, decision in kept]
        QueueStore.enqueue(
            session, message_id, mail_from, sender.username, len(content), queued, now
        )
        for address, decision in kept:
            held = decision.outcome is Outcome.QUARANTINE
            self.audit.record(
                session,
                _decision_entry(
                    AuditAction.MESSAGE_QUARANTINED if held else AuditAction.MESSAGE_ACCEPTED,
                    sender,
                    address,
                    decision,
                    message_id,
                ),
                now,
            )

    async def record_refusal(self, sender: SenderFacts, recipient: str, decision: Decision) -> None:
        await asyncio.to_thread(self._audit_refusal, sender, recipient, decision, self.clock())

    def _audit_refusal(
        self, sender: SenderFacts, recipient: str, decision: Decision, now: datetime
    ) -> None:
        with session_scope(self.engine) as session:
            self.audit.record(
                session,
                _decision_entry(AuditAction.MESSAGE_DENIED, sender, recipient, decision),
                now,
            )


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
