"""Every SMTP reply the gateway sends: the only place with numeric codes.

Decisions from ``policies`` become replies here, and aiosmtpd's own replies
get enhanced status codes (RFC 2034, RFC 3463), since the gateway advertises
ENHANCEDSTATUSCODES.
"""

from __future__ import annotations

import re

from policies.decision import Decision, Outcome

AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_LOCKED_OUT = "454 4.7.0 Too many failed logins from your address; try again later"
AUTH_DISABLED = "535 5.7.8 Authentication credentials invalid"
SENDER_OK = "250 2.1.0 Sender ok"
RECIPIENT_OK = "250 2.1.5 Recipient ok"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TOO_BIG = "552 5.3.4 Message too big for system"
HEADER_TOO_BIG = "552 5.3.4 Message header too big for system (the limit is 1 MiB)"
TEMPORARY_FAULT = "451 4.3.0 Temporary failure in the gateway; please try again later"
STORAGE_FULL = "452 4.3.1 Insufficient system storage; please try again later"
NEEDS_SMTPUTF8 = "553 5.6.7 A non-ASCII address needs the SMTPUTF8 parameter"


def sender_not_owned(address: str) -> str:
    return f"553 5.7.1 <{address}>: you may only send as one of your own professional addresses"


def header_sender_not_owned(address: str) -> str:
    return f"550 5.7.1 From: {address} is not one of your own professional addresses"


def bad_address(address: str, why: str) -> str:
    return f"553 5.1.3 <{printable(address)}>: {printable(why)}"


def printable(text: str) -> str:
    """Client text repeated in a reply: control characters become '?', so a CR
    or NUL from the client can never end or split the gateway's own reply line."""
    return "".join("?" if ord(c) < 32 or ord(c) == 127 else c for c in text)


def bad_header(why: str) -> str:
    return f"550 5.6.0 Message not accepted: {why}"


def bare_line_ending(kind: str) -> str:
    return (
        f"550 5.6.0 Message not accepted: it contains a {kind} line ending (only CRLF is allowed)"
    )


def queued(message_id: str, held: int = 0) -> str:
    if held:
        return (
            f"250 2.0.0 Ok: queued as {message_id}; {held} recipient(s) held for review, "
            "you will get a notice"
        )
    return f"250 2.0.0 Ok: queued as {message_id}"


def idle_timeout(hostname: str) -> str:
    return f"421 4.4.2 {hostname} Error: timeout exceeded"


def session_timeout(hostname: str) -> str:
    return f"421 4.4.2 {hostname} Error: session time limit exceeded"


def bare_line_feed(hostname: str) -> str:
    """Postfix's words for it; the client's lines must end in CRLF (``openssl s_client -crlf``)."""
    return f"521 5.5.2 {hostname} Error: bare <LF> received; SMTP lines end with CRLF"


def shutting_down(hostname: str) -> str:
    return f"421 4.3.2 {hostname} Service shutting down; please try again later"


def too_many_connections(hostname: str) -> str:
    return f"421 4.7.0 {hostname} Too many connections from your address"


def decision(result: Decision, address: str) -> str:
    """The RCPT reply for a decision: 250 when allowed, else its refusal."""
    enhanced = result.enhanced_code
    basic = {"2": "250", "4": "450", "5": "550"}[enhanced[0]]
    return f"{basic} {enhanced} <{address}>: {result.sentence}"


def recipient_accepted(result: Decision, address: str) -> str:
    """250 for a recipient taken on: allowed, held for review, or (bounce mode) to be reported."""
    if result.outcome is Outcome.DENY:
        return f"250 2.1.5 <{address}>: accepted; you will get a report: {result.sentence}"
    return decision(result, address)


PATIENTS_EXPOSED = (
    "550 5.7.1 The message would show a patient another patient's address; "
    "send it separately or put the patients in Bcc"
)
ALL_REFUSED_REPORTED = "250 2.0.0 Ok: nothing to deliver; the refusals are in a report to you"


# aiosmtpd's own replies that need a better text than a generic code.
_REWRITES = {
    "552 Error: Too much mail data": TOO_BIG,
    "552 Error: message size exceeds fixed maximum message size": TOO_BIG,
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)",
    "500 Command line too long": "500 5.5.2 Command line too long",
    "502 EXPN not implemented": "502 5.5.1 EXPN is not available",
    "252 Cannot VRFY user, but will accept message and attempt delivery": (
        "252 2.5.0 Cannot VRFY user; send mail to find out"
    ),
}
_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
_DEFAULT_ENHANCED = {
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "553": "5.1.3",
    "555": "5.5.4",
    "554": "5.7.0",
}


def enhance(status: str) -> str:
    """Give a reply without an enhanced status code a fitting one."""
    if status in _REWRITES:
        return _REWRITES[status]
    code = status[:3]
    if not code.isdigit() or code in ("220", "334", "354") or _ENHANCED.match(status):
        return status
    enhanced = _DEFAULT_ENHANCED.get(code, f"{code[0]}.0.0")
    separator = status[3:4] or " "
    return f"{code}{separator}{enhanced} {status[4:]}".rstrip()


def rejected_from_quarantine(address: str, reason: str | None) -> str:
    why = f": {' '.join(reason.split())}" if reason and reason.strip() else ""
    return f"550 5.7.1 <{address}>: the practice's privacy officer did not release it{why}"


def held_too_long(address: str, retention: str) -> str:
    return f"550 5.4.7 <{address}>: held for review longer than {retention}, and not released"
