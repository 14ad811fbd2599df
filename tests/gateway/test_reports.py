"""Reports to senders: what they say and leave out, and that they are stored all or nothing.

The builders (``gateway.bounce``) are checked by parsing their output with
Python's ``email`` package; the spool batch and the intake run against a real
spool (sealed files under tmp_path) and a real database (SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage, Message
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, col, select

from consent_registry.db import make_engine
from consent_registry.models import (
    AuditEvent,
    AuditHead,
    QueueMessage,
    QueueRecipient,
    SpooledMessage,
)
from consent_registry.writes import DirectWrites
from gateway.app import initialise
from gateway.audit import AuditAction, AuditEntry, AuditLog, audit_key
from gateway.bounce import FailedRecipient, build_dsn, build_held_notice
from gateway.crypto_at_rest import StorageKey, storage_key
from gateway.intake import Intake
from gateway.reports import Reports
from gateway.settings import Settings
from gateway.spool import INLINE_LIMIT, FileSpool, Spool, SpoolBatch
from policies.decision import Decision, Outcome, Protection, Reason
from policies.facts import Role, SenderFacts
from tests.conftest import DOMAIN
from tests.spools import file_spool, store

HOSTNAME = "gateway.test"
SENDER = f"dr.smith@{DOMAIN}"
NOW = datetime(2026, 6, 10, 10, 0, tzinfo=UTC)
SUBJECT_MARKER = "RPT-subject-4e1c90"
BODY_MARKER = "RPT-body-b7d205"
ORIGINAL_DATE = "Tue, 09 Jun 2026 08:15:00 +0200"
ORIGINAL_MESSAGE_ID = "<orig-3f9a61.77@praxis.example>"

# The fields a delivery-status part may hold (RFC 3464), and the gateway's own.
DSN_FIELDS = {
    "reporting-mta",
    "x-cgw-queue-id",
    "arrival-date",
    "final-recipient",
    "action",
    "status",
    "will-retry-until",
    "diagnostic-code",
}
FIELD_LINE = re.compile(rb"^[A-Za-z0-9-]+: ?\S")
STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


def _original(to: str = "anna@example.org") -> bytes:
    return (
        f"From: Dr Smith <{SENDER}>\r\n"
        f"To: {to}\r\n"
        f"Subject: Befund {SUBJECT_MARKER}\r\n"
        f"Date: {ORIGINAL_DATE}\r\n"
        f"Message-ID: {ORIGINAL_MESSAGE_ID}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Dear patient,\r\n"
        f"your thyroid values: {BODY_MARKER}.\r\n"
    ).encode()


# --- reading a report ---------------------------------------------------------------------------


def _parse(report: bytes) -> EmailMessage:
    message = email.message_from_bytes(report, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _check_report_envelope(message: EmailMessage) -> None:
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert not message.defects, message.defects
    for part in message.walk():
        assert not part.defects, (part.get_content_type(), part.defects)


def _content_types(message: EmailMessage) -> list[str]:
    """The report's own parts (not the field blocks inside the delivery-status part)."""
    return [part.get_content_type() for part in message.iter_parts()]


def _status_blocks(message: EmailMessage) -> list[Message]:
    """The delivery-status part's field blocks: per message first, then per recipient."""
    (status,) = [p for p in message.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return blocks


def _human_text(message: EmailMessage) -> str:
    (first, *_) = message.iter_parts()
    assert first.get_content_type() == "text/plain"
    content = first.get_content()
    assert isinstance(content, str)
    return content


def _raw_status_lines(report: bytes) -> list[bytes]:
    """The delivery-status part's body, line by line, exactly as built."""
    boundary = _parse(report).get_boundary()
    assert boundary
    sections = report.split(b"\r\n--" + boundary.encode())
    found = [s for s in sections if s.startswith(b"\r\nContent-Type: message/delivery-status")]
    assert len(found) == 1, "exactly one delivery-status part"
    _, blank, body = found[0].partition(b"\r\n\r\n")
    assert blank, "the part has a header and a body"
    return body.splitlines()


def _check_status_lines(report: bytes) -> None:
    """Every line is a known field, a continuation of one, or the blank between blocks."""
    previous = b""
    for line in _raw_status_lines(report):
        if line == b"":
            previous = line
            continue
        if line[:1] in (b" ", b"\t"):
            assert previous and line.strip(), f"stray continuation line {line!r}"
            continue
        assert FIELD_LINE.match(line), f"not a field: {line!r}"
        name = line.partition(b":")[0].decode("ascii").lower()
        assert name in DSN_FIELDS, f"unexpected field {name!r} in {line!r}"
        previous = line


def _recipient_blocks(report: bytes) -> dict[str, Message]:
    blocks = _status_blocks(_parse(report))
    per_message, *per_recipient = blocks
    assert per_message["Reporting-MTA"] == f"dns; {HOSTNAME}"
    assert per_message["Final-Recipient"] is None
    found: dict[str, Message] = {}
    for block in per_recipient:
        fields = ["final-recipient", "action", "status", "diagnostic-code"]
        if block["Action"] == "delayed":  # a held recipient: returned unreleased after this
            fields.append("will-retry-until")
        assert sorted(k.lower() for k in block) == sorted(fields), block.items()
        kind, _, address = str(block["Final-Recipient"]).partition("; ")
        assert kind == "rfc822"
        assert address not in found
        found[address] = block
    return found


# --- the held notice ----------------------------------------------------------------------------

HELD = [
    FailedRecipient(
        "anna@example.org",
        "4.7.0",
        "There is no secure way to deliver to this patient yet; the message is held for review.",
    ),
    FailedRecipient("lab@example.net", "4.7.0", "Held for review."),
]


def test_held_notice_is_a_delivery_status_report_of_delayed_recipients() -> None:
    report = build_held_notice(
        HOSTNAME, SENDER, _original(), HELD, NOW, "Q123", NOW + timedelta(days=30)
    )
    message = _parse(report)
    _check_report_envelope(message)
    assert message["To"].addresses[0].addr_spec == SENDER
    assert message["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOSTNAME}"
    assert message["Auto-Submitted"] == "auto-replied"
    assert _content_types(message) == ["text/plain", "message/delivery-status"]
    _check_status_lines(report)
    blocks = _recipient_blocks(report)
    assert sorted(blocks) == sorted(r.address for r in HELD)
    for rcpt in HELD:
        block = blocks[rcpt.address]
        assert block["Action"] == "delayed"
        assert STATUS.match(str(block["Status"])), block["Status"]
        assert str(block["Status"]).startswith("4.")
        assert rcpt.diagnostic in str(block["Diagnostic-Code"])


def test_held_notice_names_the_original_but_quotes_nothing_of_it() -> None:
    report = build_held_notice(
        HOSTNAME, SENDER, _original(), HELD, NOW, "Q123", NOW + timedelta(days=30)
    )
    message = _parse(report)
    human = _human_text(message)
    # The sender can tell which message is meant ...
    assert ORIGINAL_DATE in human
    assert ORIGINAL_MESSAGE_ID in human
    assert "Q123" in human
    for rcpt in HELD:
        assert f"<{rcpt.address}>" in human
    # ... but the held message stays unreadable outside the quarantine.
    assert SUBJECT_MARKER.encode() not in report
    assert BODY_MARKER.encode() not in report
    assert b"Befund" not in report
    assert b"thyroid" not in report
    assert "text/rfc822-headers" not in _content_types(message)
    quoting = {"text/rfc822-headers", "message/rfc822"}
    assert not any(p.get_content_type() in quoting for p in message.walk())


def test_held_notice_of_an_original_without_date_or_message_id() -> None:
    original = (f"From: {SENDER}\r\nSubject: {SUBJECT_MARKER}\r\n\r\n{BODY_MARKER}\r\n").encode()
    report = build_held_notice(
        HOSTNAME, SENDER, original, HELD[:1], NOW, "Q9", NOW + timedelta(days=30)
    )
    _check_report_envelope(_parse(report))
    _check_status_lines(report)
    assert SUBJECT_MARKER.encode() not in report
    assert BODY_MARKER.encode() not in report


# --- the bounce ---------------------------------------------------------------------------------

MULTI_LINE = [
    pytest.param(
        "550-5.1.1 <anna@example.org>: mailbox unavailable\r\n550-5.1.1 Injected-Field: one\r\n"
        "550 5.1.1 see https://help.example/550",
        id="crlf-continuation-lines",
    ),
    pytest.param(
        "554-5.7.1 policy\nAction: delivered\nStatus: 2.0.0\n554 5.7.1 rejected",
        id="bare-lf-with-field-lookalikes",
    ),
    pytest.param(
        "550 5.7.1 first\r\n\r\nFinal-Recipient: rfc822; evil@example.org\r\n",
        id="blank-line-then-a-second-recipient-block",
    ),
    pytest.param("550 5.7.1 trailing line break\r\n", id="trailing-crlf"),
    pytest.param("\r\n550 5.7.1 leading line break", id="leading-crlf"),
    pytest.param("450 4.2.0 bare\rcarriage return", id="bare-cr"),
]


@pytest.mark.parametrize("diagnostic", MULTI_LINE)
def test_a_multi_line_reply_does_not_break_the_status_fields(diagnostic: str) -> None:
    failed = [
        FailedRecipient("anna@example.org", "5.1.1", diagnostic),
        FailedRecipient("bob@example.org", "5.7.1", "550 5.7.1 <bob@example.org>: refused"),
    ]
    report = build_dsn(HOSTNAME, SENDER, _original(), failed, NOW, "Q77")
    message = _parse(report)
    _check_report_envelope(message)
    _check_status_lines(report)
    blocks = _recipient_blocks(report)
    assert sorted(blocks) == ["anna@example.org", "bob@example.org"]
    anna = blocks["anna@example.org"]
    assert anna["Action"] == "failed"
    assert anna["Status"] == "5.1.1"
    # The whole reply is kept, on one line.
    code = str(anna["Diagnostic-Code"])
    assert code.startswith("smtp; ")
    assert code.removeprefix("smtp; ").split() == diagnostic.split()
    assert blocks["bob@example.org"]["Action"] == "failed"
    # The human part keeps each recipient, and its whole reply, on one line as well.
    lines = _human_text(message).splitlines()
    assert sum(line.startswith("  <") for line in lines) == 2
    (anna_line,) = [line for line in lines if line.startswith("  <anna@example.org>: ")]
    assert anna_line.split()[-1] == diagnostic.split()[-1]


def test_a_bounce_quotes_the_header_but_never_the_body() -> None:
    failed = [FailedRecipient("anna@example.org", "5.7.1", "550 5.7.1 no consent")]
    report = build_dsn(HOSTNAME, SENDER, _original(), failed, NOW, "Q78")
    message = _parse(report)
    _check_report_envelope(message)
    assert _content_types(message) == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    (quoted,) = [p for p in message.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert ORIGINAL_MESSAGE_ID in quoted.get_content()
    assert BODY_MARKER.encode() not in report
    assert b"thyroid" not in report


def test_a_bounce_of_a_message_with_no_body_separator_quotes_only_the_header() -> None:
    """An original that is all header: nothing past it can appear either."""
    failed = [FailedRecipient("anna@example.org", "5.7.1", "550 5.7.1 no consent")]
    original = f"From: {SENDER}\r\nSubject: {SUBJECT_MARKER}\r\n".encode()
    report = build_dsn(HOSTNAME, SENDER, original, failed, NOW, "Q79")
    _check_report_envelope(_parse(report))
    _check_status_lines(report)


# Replies as a next hop might send them: any text, with line breaks in all their forms.
_line_breaks = st.sampled_from(["\r\n", "\n", "\r", "\r\n\r\n", "\n\n"])
_reply_words = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=40
)
replies = st.lists(st.one_of(_reply_words, _line_breaks), min_size=1, max_size=12).map("".join)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(replies, min_size=1, max_size=4))
def test_no_reply_text_breaks_a_bounce(diagnostics: list[str]) -> None:
    failed = [
        FailedRecipient(f"rcpt{n}@example.org", "5.0.0", diagnostic)
        for n, diagnostic in enumerate(diagnostics)
    ]
    report = build_dsn(HOSTNAME, SENDER, _original(), failed, NOW, "Q80")
    message = _parse(report)
    _check_report_envelope(message)
    _check_status_lines(report)
    blocks = _recipient_blocks(report)
    assert sorted(blocks) == sorted(r.address for r in failed)
    for rcpt in failed:
        block = blocks[rcpt.address]
        assert block["Action"] == "failed"
        assert block["Status"] == "5.0.0"
    assert BODY_MARKER.encode() not in report


# --- the spool batch ----------------------------------------------------------------------------


class Boom(Exception):
    pass


@pytest.fixture
def spool(tmp_path: Path) -> FileSpool:
    """Every received message in a file (an inline limit of 0)."""
    return file_spool(tmp_path / "spool", StorageKey(secrets.token_bytes(32)), inline_limit=0)


def _files(spool: FileSpool) -> list[Path]:
    return sorted(p for p in spool.directory.rglob("*") if p.is_file())


def _adopt(batch: SpoolBatch, spool: Spool, message_id: str, content: bytes) -> None:
    writer = spool.writer(message_id)
    try:
        writer.write(content)
    except BaseException:
        writer.discard()
        raise
    batch.adopt(writer)


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt], ids=["exception", "interrupt"])
def test_files_stored_in_a_failing_block_are_removed(
    spool: FileSpool, error: type[BaseException]
) -> None:
    store(spool, "EARLIER", b"stored before the block")
    with pytest.raises(error), spool.batch() as batch:
        _adopt(batch, spool, "FIRST", b"first " + BODY_MARKER.encode())
        _adopt(batch, spool, "SECOND", b"second " + BODY_MARKER.encode())
        assert sorted(spool.stored_ids()) == ["EARLIER", "FIRST", "SECOND"]
        raise error()
    assert spool.stored_ids() == ["EARLIER"]
    assert _files(spool) == [spool.path("EARLIER")]
    assert spool.load("EARLIER") == b"stored before the block"


def test_a_store_that_fails_in_a_block_takes_the_earlier_ones_with_it(spool: FileSpool) -> None:
    (spool.tmp / "SECOND.tmp").write_bytes(b"in the way")  # a real I/O failure for SECOND
    with pytest.raises(FileExistsError), spool.batch() as batch:
        _adopt(batch, spool, "FIRST", b"first")
        _adopt(batch, spool, "SECOND", b"second")
    assert spool.stored_ids() == []


def test_files_stored_in_a_block_that_succeeds_stay(spool: FileSpool) -> None:
    with spool.batch() as batch:
        _adopt(batch, spool, "FIRST", b"first " + BODY_MARKER.encode())
        _adopt(batch, spool, "SECOND", b"second")
        batch.store("REPORT", b"a report " + BODY_MARKER.encode())
    assert batch.stored == ["FIRST", "SECOND"]
    assert sorted(spool.stored_ids()) == ["FIRST", "SECOND"]
    assert spool.load("FIRST") == b"first " + BODY_MARKER.encode()
    assert spool.load("SECOND") == b"second"
    assert list(spool.tmp.iterdir()) == []
    assert all(BODY_MARKER.encode() not in p.read_bytes() for p in _files(spool))
    # A report is always an inline copy, for the block's transaction to insert.
    ((report_id, sealed),) = batch.inline
    assert report_id == "REPORT" and BODY_MARKER.encode() not in sealed
    assert spool.key.open(sealed, "REPORT") == b"a report " + BODY_MARKER.encode()


# --- the intake: all or nothing -----------------------------------------------------------------

DRSMITH = SenderFacts("drsmith", Role.CLINICIAN, frozenset({SENDER}))
COLLEAGUE = f"colleague@{DOMAIN}"
HELD_PATIENT = "anna@example.org"
REFUSED_PATIENT = "bob@example.org"
DECIDED = [
    (COLLEAGUE, Decision(Outcome.ALLOW, Reason.INTERNAL, "internal-recipient")),
    (
        HELD_PATIENT,
        Decision(
            Outcome.QUARANTINE,
            Reason.NO_SECURE_CHANNEL,
            "protected-delivery",
            Protection.NONE,
            patient_id=7,
            consent_id=11,
            relationship_id=3,
        ),
    ),
    (
        REFUSED_PATIENT,
        Decision(Outcome.DENY, Reason.NO_CONSENT, "active-consent", patient_id=8),
    ),
]


class TransactionFailed(Exception):
    pass


class FailingAuditLog(AuditLog):
    """The real audit log, except that its ``fail_at``-th entry fails.

    At that moment it notes what the spool and the transaction hold, to show
    that the failure came after the files were stored and rows were written.
    """

    def __init__(self, key: bytes, fail_at: int, spool: Spool) -> None:
        super().__init__(key)
        self.fail_at = fail_at
        self.spool = spool
        self.calls = 0
        self.spooled_when_failing: list[str] = []
        self.queued_when_failing = 0

    def record(self, session: Session, entry: AuditEntry, now: datetime) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            inline = session.exec(select(SpooledMessage.id)).all()
            self.spooled_when_failing = [*self.spool.stored_ids(), *inline]
            self.queued_when_failing = len(session.exec(select(QueueMessage)).all())
            raise TransactionFailed(f"audit entry {self.calls} ({entry.action}) failed")
        super().record(session, entry, now)


@dataclass
class Parts:
    settings: Settings
    engine: Engine
    spool: Spool
    accepted: list[str]

    def intake(self, audit: AuditLog) -> Intake:
        return Intake(
            DirectWrites(self.engine),
            self.spool,
            audit,
            Reports(audit, HOSTNAME, timedelta(days=30)),
            HOSTNAME,
            lambda: self.accepted.append("woken"),
            clock=lambda: NOW,
        )

    def accept(self, audit: AuditLog, content: bytes) -> str | None:
        """What the SMTP front end does: stream the lines in, then accept."""
        intake = self.intake(audit)
        message = intake.receive()
        try:
            for line in content.splitlines(keepends=True):
                message.add(line)
            message.end()
            return asyncio.run(intake.accept(DRSMITH, SENDER, DECIDED, message))
        finally:
            message.discard()

    def spool_files(self) -> list[Path]:
        return sorted(p for p in self.settings.spool_dir.rglob("*") if p.is_file())

    def copies(self) -> dict[str, bytes]:
        """Every spooled copy as stored (sealed): files and inline rows."""
        with Session(self.engine) as session:
            rows = {r.id: r.sealed for r in session.exec(select(SpooledMessage)).all()}
        files = {p.stem: p.read_bytes() for p in self.spool_files()}
        assert not rows.keys() & files.keys()
        return rows | files


@pytest.fixture(params=["inline", "file"], ids=lambda kind: f"message-{kind}")
def parts(
    make_settings: Callable[..., Settings], request: pytest.FixtureRequest
) -> Iterator[Parts]:
    """The intake's parts; the received message spooled inline, or in a file
    (reports are inline either way)."""
    settings = make_settings(denial_mode="bounce")
    initialise(settings)
    engine = make_engine(settings.database_url)
    limit = INLINE_LIMIT if request.param == "inline" else 0
    spool = FileSpool(settings.spool_dir, storage_key(settings)[0], engine, limit)
    try:
        yield Parts(settings, engine, spool, [])
    finally:
        engine.dispose()


def _rows(engine: Engine) -> tuple[list[QueueMessage], list[QueueRecipient], list[AuditEvent]]:
    with Session(engine) as session:
        return (
            list(session.exec(select(QueueMessage)).all()),
            list(session.exec(select(QueueRecipient).order_by(col(QueueRecipient.id))).all()),
            list(session.exec(select(AuditEvent).order_by(col(AuditEvent.seq))).all()),
        )


def _assert_nothing_left(parts: Parts) -> None:
    assert parts.copies() == {}
    messages, recipients, events = _rows(parts.engine)
    assert messages == []
    assert recipients == []
    assert events == []
    with Session(parts.engine) as session:
        head = session.get(AuditHead, 1)
        assert head is not None
        assert head.seq == 0
    assert parts.accepted == []


def _real_audit(parts: Parts) -> AuditLog:
    return AuditLog(audit_key(parts.settings)[0])


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4], ids=lambda n: f"audit-entry-{n}-of-4")
def test_a_failed_transaction_leaves_nothing_in_the_spool_or_the_queue(
    parts: Parts, fail_at: int
) -> None:
    audit = FailingAuditLog(audit_key(parts.settings)[0], fail_at, parts.spool)
    with pytest.raises(TransactionFailed):
        parts.accept(audit, _original())
    # The failure came after the message, its held notice and its bounce were
    # spooled, and after rows were written in the transaction ...
    assert len(audit.spooled_when_failing) == 3
    assert audit.queued_when_failing >= 1
    if fail_at == 4:
        assert audit.queued_when_failing == 3
    # ... and none of it stayed.
    _assert_nothing_left(parts)


def test_a_database_error_mid_transaction_leaves_nothing_behind(parts: Parts) -> None:
    """A real failure from the database: the audit table is not there for the moment."""
    with parts.engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_event RENAME TO audit_event_away"))
    try:
        with pytest.raises(DBAPIError):
            parts.accept(_real_audit(parts), _original())
    finally:
        with parts.engine.begin() as conn:
            conn.execute(text("ALTER TABLE audit_event_away RENAME TO audit_event"))
    _assert_nothing_left(parts)


def test_nothing_is_left_from_a_failure_and_the_next_message_goes_through(parts: Parts) -> None:
    audit = FailingAuditLog(audit_key(parts.settings)[0], 3, parts.spool)
    with pytest.raises(TransactionFailed):
        parts.accept(audit, _original())
    message_id = parts.accept(_real_audit(parts), _original())
    assert message_id is not None
    messages, _, events = _rows(parts.engine)
    assert len(messages) == 3
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert len(parts.copies()) == 3


def _report_actions(parts: Parts, report_id: str) -> dict[str, str]:
    """Recipient -> Action of a spooled report, read back through the storage key."""
    content = parts.spool.load(report_id)
    message = _parse(content)
    _check_report_envelope(message)
    _check_status_lines(content)
    actions = {address: str(b["Action"]) for address, b in _recipient_blocks(content).items()}
    assert BODY_MARKER.encode() not in content
    if set(actions.values()) == {"delayed"}:
        # The held notice: nothing of the held message but its date and id.
        assert SUBJECT_MARKER.encode() not in content
        assert "text/rfc822-headers" not in _content_types(message)
    return actions


def test_one_accept_stores_the_message_a_held_notice_and_a_bounce_sealed(parts: Parts) -> None:
    audit = _real_audit(parts)
    message_id = parts.accept(audit, _original(f"{COLLEAGUE}, {HELD_PATIENT}"))
    assert message_id is not None
    assert parts.accepted == ["woken"]

    messages, recipients, events = _rows(parts.engine)
    by_id = {m.id: m for m in messages}
    assert len(by_id) == 3
    original = by_id.pop(message_id)
    assert not original.is_bounce
    assert original.mail_from == SENDER
    assert original.username == "drsmith"
    assert original.received_at == NOW
    reports = list(by_id.values())
    assert [(r.is_bounce, r.mail_from, r.username) for r in reports] == [(True, "", None)] * 2

    # The message is queued for the allowed and the held recipient, never the refused one.
    mine = {r.address: r for r in recipients if r.message_id == message_id}
    assert sorted(mine) == sorted([COLLEAGUE, HELD_PATIENT])
    assert mine[COLLEAGUE].state == "queued"
    assert mine[HELD_PATIENT].state == "quarantined"
    assert mine[HELD_PATIENT].reason == Reason.NO_SECURE_CHANNEL.value
    assert mine[HELD_PATIENT].patient_id == 7
    # Each report goes to the sender alone, due now.
    for report in reports:
        rows = [r for r in recipients if r.message_id == report.id]
        assert [(r.address, r.state) for r in rows] == [(SENDER, "queued")]

    # One report is the held notice, the other the bounce; both read back from the spool.
    actions = sorted(
        (tuple(sorted(_report_actions(parts, r.id).items())) for r in reports), key=str
    )
    assert actions == sorted(
        [((HELD_PATIENT, "delayed"),), ((REFUSED_PATIENT, "failed"),)], key=str
    )

    # Everything is in the spool, sealed: no marker in any copy as stored.
    copies = parts.copies()
    assert sorted(copies) == sorted(by_id.keys() | {message_id})
    for copy_id, raw in copies.items():
        assert SUBJECT_MARKER.encode() not in raw, copy_id
        assert BODY_MARKER.encode() not in raw, copy_id
        assert b"Befund" not in raw, copy_id
    # The markers were there to find: the message opens to them.
    stored = parts.spool.load(message_id)
    assert SUBJECT_MARKER.encode() in stored
    assert BODY_MARKER.encode() in stored
    assert stored.startswith(f"Received: by {HOSTNAME}".encode())

    # The audit log tells the story, with no content in it, and verifies.
    assert Counter(e.action for e in events) == Counter(
        [
            AuditAction.MESSAGE_ACCEPTED.value,
            AuditAction.MESSAGE_QUARANTINED.value,
            AuditAction.SENDER_NOTIFIED.value,
            AuditAction.MESSAGE_BOUNCED.value,
        ]
    )
    by_action = {e.action: e for e in events}
    accepted = by_action[AuditAction.MESSAGE_ACCEPTED.value]
    assert (accepted.recipient, accepted.message_id) == (COLLEAGUE, message_id)
    quarantined = by_action[AuditAction.MESSAGE_QUARANTINED.value]
    assert (quarantined.recipient, quarantined.message_id) == (HELD_PATIENT, message_id)
    assert quarantined.reason == Reason.NO_SECURE_CHANNEL.value
    assert quarantined.patient_id == 7
    for action in (AuditAction.SENDER_NOTIFIED, AuditAction.MESSAGE_BOUNCED):
        event = by_action[action.value]
        assert (event.recipient, event.message_id) == (SENDER, message_id)
    for event in events:
        assert SUBJECT_MARKER not in repr(event.model_dump())
        assert BODY_MARKER not in repr(event.model_dump())
    with Session(parts.engine) as session:
        assert audit.verify(session) == (4, None)
