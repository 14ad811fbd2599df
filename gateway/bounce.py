"""Reports to senders (RFC 3464 delivery status notifications), built as bytes; pure.

Two kinds: a *bounce* says which recipients will never get the message
(``Action: failed``); a *held notice* says which recipients' copies wait in
the quarantine for review (``Action: delayed``). A bounce quotes only the
original header block (``text/rfc822-headers``), never the body: a report
must not become a second, unprotected copy of patient mail. A held notice
quotes nothing but the original's date and Message-ID, because the message
it reports on is still held and must stay unreadable outside the quarantine.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

from gateway.headers import HeaderError, parse_fields, split_message, storable


@dataclass(frozen=True)
class FailedRecipient:
    address: str
    status: str  # enhanced status code, e.g. 5.7.1
    diagnostic: str  # the reply that explains it, e.g. "550 5.7.1 ..."


def build_dsn(
    hostname: str,
    sender: str,
    original: bytes,
    failed: Sequence[FailedRecipient],
    now: datetime,
    queue_id: str,
    arrived: datetime | None = None,
) -> bytes:
    lines = [
        f"This is the mail gateway at {hostname}.",
        "",
        "Your message could not be delivered to the following recipients:",
        "",
        *(f"  <{rcpt.address}>: {_human(rcpt.diagnostic)}" for rcpt in failed),
        "",
        "The other recipients, if any, were not affected. Nothing more will be tried for",
        "the recipients above: check the address, the patient's consent and relationship",
        "records (ask the practice's privacy officer), and send again when it is resolved.",
        "The original message's header follows; its body is not repeated here.",
    ]
    headers, _ = split_message(original)
    return _report(
        hostname,
        sender,
        "Undelivered Mail Returned to Sender",
        lines,
        "failed",
        failed,
        now,
        arrived or now,
        queue_id,
        headers,
        [],
    )


def build_held_notice(
    hostname: str,
    sender: str,
    original: bytes,
    held: Sequence[FailedRecipient],
    now: datetime,
    queue_id: str,
    returned_after: datetime,
) -> bytes:
    """``returned_after``: when the quarantine's retention returns it unreleased."""
    date, message_id = _identity(original)
    lines = [
        f"This is the mail gateway at {hostname}.",
        "",
        f"Your message of {date} (queue id {queue_id}, Message-ID {message_id})",
        "has not been sent yet to the following recipients. It is held, encrypted, for",
        "review by the practice's privacy officer:",
        "",
        *(f"  <{rcpt.address}>: {_human(rcpt.diagnostic)}" for rcpt in held),
        "",
        "You need not send it again. The privacy officer either releases it (for example",
        "once the patient's certificate or consent is on file), and then it is delivered,",
        "or returns it to you with a reason. Unless it is released by",
        f"{format_datetime(returned_after)}, it is returned to you then.",
        "The other recipients, if any, were not affected.",
    ]
    return _report(
        hostname,
        sender,
        "Message held for review (not yet delivered)",
        lines,
        "delayed",
        held,
        now,
        now,
        queue_id,
        None,
        [f"Will-Retry-Until: {format_datetime(returned_after)}"],
    )


def _report(
    hostname: str,
    sender: str,
    subject: str,
    human: list[str],
    action: str,
    recipients: Sequence[FailedRecipient],
    now: datetime,
    arrived: datetime,
    queue_id: str,
    headers: bytes | None,
    per_recipient: list[str],
) -> bytes:
    boundary = f"=_cgw_{secrets.token_hex(12)}"
    status = [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Cgw-Queue-ID: {queue_id}",
        f"Arrival-Date: {format_datetime(arrived)}",
        "",
    ]
    # A held recipient's diagnostic is the policy's sentence, not a reply.
    diagnostic_type = "smtp" if action == "failed" else "x-cgw-policy"
    for rcpt in recipients:
        address_type = "rfc822" if rcpt.address.isascii() else "utf-8"
        status += [
            f"Final-Recipient: {address_type}; {rcpt.address}",
            f"Action: {action}",
            f"Status: {rcpt.status}",
            f"Diagnostic-Code: {diagnostic_type}; {_field_text(rcpt.diagnostic)}",
            *per_recipient,
            "",
        ]
    parts = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: <{queue_id}.dsn.{secrets.token_hex(4)}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        "\r\n".join(storable(line) for line in human),
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        "\r\n".join(status).rstrip("\r\n"),
        "",
    ]
    head = "\r\n".join(parts).encode() + b"\r\n"
    if headers is None:
        return head + f"--{boundary}--\r\n".encode()
    quoted = f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n".encode()
    return head + quoted + headers.rstrip(b"\r\n") + f"\r\n\r\n--{boundary}--\r\n".encode()


def _field_text(text: str) -> str:
    """A delivery-status field value: one line of US-ASCII (RFC 3464), at most 900 octets.

    Line breaks in a next hop's multi-line reply must not break the report's
    fields apart; non-ASCII (an admin's reason in German) becomes '?'.
    """
    flat = " ".join(text.split())
    return flat.encode("ascii", "replace").decode("ascii")[:900]


def failure_status(reply: str) -> str:
    """The enhanced status code of a reply that failed a recipient for good
    (a 4.x.y that ran out of time becomes 5.x.y), or 5.0.0 when it has none."""
    words = reply.split()
    if len(words) > 1 and words[1][:2] in ("4.", "5.") and words[1].count(".") == 2:
        return "5" + words[1][1:]
    return "5.0.0"


def _identity(original: bytes) -> tuple[str, str]:
    """The original's Date and Message-ID, the only header fields a held notice repeats."""
    found = {"date": "(no date)", "message-id": "(none)"}
    try:
        fields = parse_fields(split_message(original)[0])
    except HeaderError:
        return found["date"], found["message-id"]
    for field in fields:
        if field.name in found:
            found[field.name] = _field_text(field.value)[:200]
    return found["date"], found["message-id"]


def _human(diagnostic: str) -> str:
    """The sentence of a reply, without the codes."""
    words = " ".join(diagnostic.split()).split(" ", 2)
    if len(words) == 3 and words[0].isdigit() and words[1][:1].isdigit():
        return words[2]
    return " ".join(diagnostic.split())
