"""Accepting a message: stamp its header, spool it durably, queue it, audit it.

The order is the promise behind 250: the sealed file is fsync'ed into the
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

from consent_registry.db import session_scope
from gateway.audit import AuditAction, AuditEntry, AuditLog
from gateway.bounce import FailedRecipient, build_dsn
from gateway.headers import rewrite_header
from gateway.queue import QueuedRecipient, QueueStore
from gateway.spool import Spool, SpoolFull
from policies.decision import Decision, Outcome
from policies.facts import SenderFacts

log = logging.getLogger(__name__)


class StorageFullError(Exception):
    """No room to store the message: the client should try again later."""


def new_message_id(now: datetime) -> str:
    """Time-ordered, unguessable queue id (like Postfix's long queue ids)."""
    return f"{int(now.timestamp() * 1000):011X}{secrets.token_hex(5).upper()}"


class Intake:
    def __init__(
        self,
        engine: Engine,
        spool: Spool,
        audit: AuditLog,
        hostname: str,
        on_accepted: Callable[[], None],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.spool = spool
        self.audit = audit
        self.hostname = hostname
        self.on_accepted = on_accepted
        self.clock = clock

    async def accept(
        self,
        sender: SenderFacts,
        mail_from: str,
        decided: Sequence[tuple[str, Decision]],
        content: bytes,
    ) -> str:
        """Store a message for its allowed and held recipients; returns the queue id."""
        now = self.clock()
        message_id = new_message_id(now)
        stamped = self._stamp(content, message_id, now)
        await asyncio.to_thread(self._store, sender, message_id, mail_from, decided, stamped, now)
        self.on_accepted()
        return message_id

    async def bounce(
        self, sender_address: str, original: bytes, failed: Sequence[FailedRecipient], about: str
    ) -> str:
        """Queue one delivery status notification to the sender (from the null sender)."""
        now = self.clock()
        message_id = new_message_id(now)
        report = build_dsn(self.hostname, sender_address, original, failed, now, about)
        await asyncio.to_thread(self._store_bounce, message_id, sender_address, report, about, now)
        self.on_accepted()
        return message_id

    def _store_bounce(
        self, message_id: str, sender_address: str, report: bytes, about: str, now: datetime
    ) -> None:
        self.spool.store(message_id, report)
        try:
            with session_scope(self.engine) as session:
                QueueStore.enqueue(
                    session,
                    message_id,
                    "",
                    None,
                    len(report),
                    [QueuedRecipient(sender_address)],
                    now,
                    is_bounce=True,
                )
                self.audit.record(
                    session,
                    AuditEntry(
                        action=AuditAction.MESSAGE_BOUNCED,
                        actor="gateway",
                        message_id=about,
                        recipient=sender_address,
                        detail=f"delivery status notification {message_id}",
                    ),
                    now,
                )
        except BaseException:
            self.spool.remove(message_id)
            raise

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
    ) -> None:
        try:
            self.spool.store(message_id, content)
        except SpoolFull as exc:
            raise StorageFullError(str(exc)) from exc
        try:
            with session_scope(self.engine) as session:
                queued = [_queued(address, decision) for address, decision in decided]
                QueueStore.enqueue(
                    session, message_id, mail_from, sender.username, len(content), queued, now
                )
                for address, decision in decided:
                    held = decision.outcome is Outcome.QUARANTINE
                    self.audit.record(
                        session,
                        _decision_entry(
                            AuditAction.MESSAGE_QUARANTINED
                            if held
                            else AuditAction.MESSAGE_ACCEPTED,
                            sender,
                            address,
                            decision,
                            message_id,
                        ),
                        now,
                    )
        except BaseException as exc:
            self.spool.remove(message_id)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(str(exc)) from exc
            raise

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


def _queued(address: str, decision: Decision) -> QueuedRecipient:
    return QueuedRecipient(
        address=address,
        protection=decision.protection.value,
        reason=decision.reason.value,
        patient_id=decision.patient_id,
        certificate_id=decision.certificate_id,
        quarantined=decision.outcome is Outcome.QUARANTINE,
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
