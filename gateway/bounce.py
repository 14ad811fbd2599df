"""Delivery status notifications (RFC 3464), built as bytes; pure.

A bounce tells the sender, in words, which recipients did not get the
message and what to do, and repeats it machine-readably. It quotes only the
original header block (``text/rfc822-headers``), never the body: a bounce
must not become a second, unprotected copy of patient mail.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

from gateway.headers import split_message


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
) -> bytes:
    boundary = f"=_cgw_{secrets.token_hex(12)}"
    lines = [
        f"This is the mail gateway at {hostname}.",
        "",
        "Your message could not be delivered to the following recipients:",
        "",
    ]
    for rcpt in failed:
        lines.append(f"  <{rcpt.address}>: {_human(rcpt.diagnostic)}")
    lines += [
        "",
        "The other recipients, if any, were not affected. Nothing more will be tried for",
        "the recipients above: check the address, the patient's consent and relationship",
        "records (ask the practice's privacy officer), and send again when it is resolved.",
        "The original message's header follows; its body is not repeated here.",
    ]
    human = "\r\n".join(lines) + "\r\n"
    status = [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Cgw-Queue-ID: {queue_id}",
        f"Arrival-Date: {format_datetime(now)}",
        "",
    ]
    for rcpt in failed:
        status += [
            f"Final-Recipient: rfc822; {rcpt.address}",
            "Action: failed",
            f"Status: {rcpt.status}",
            f"Diagnostic-Code: smtp; {rcpt.diagnostic}",
            "",
        ]
    headers, _ = split_message(original)
    parts = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {format_datetime(now)}",
        f"Message-ID: <{queue_id}.dsn.{secrets.token_hex(4)}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        human.rstrip("\r\n"),
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        "\r\n".join(status).rstrip("\r\n"),
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    head = "\r\n".join(parts).encode() + b"\r\n"
    return head + headers.rstrip(b"\r\n") + f"\r\n\r\n--{boundary}--\r\n".encode()


def _human(diagnostic: str) -> str:
    """The sentence of a reply, without the codes."""
    words = diagnostic.split(" ", 2)
    if len(words) == 3 and words[0].isdigit() and words[1][:1].isdigit():
        return words[2]
    return diagnostic
