"""SMTP replies (gateway.replies): enhanced status codes and decision replies."""

from __future__ import annotations

import re

import pytest

from gateway import replies
from policies.decision import Decision, Outcome, Reason

ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
        ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
        ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
        ("501 Syntax: MAIL FROM: <address>", "501 5.5.4 Syntax: MAIL FROM: <address>"),
        ("502 Command not implemented", "502 5.5.1 Command not implemented"),
        ("504 Unrecognized authentication type", "504 5.5.4 Unrecognized authentication type"),
        ("553 Bad address", "553 5.1.3 Bad address"),
        ("554 Transaction failed", "554 5.7.0 Transaction failed"),
        (
            "555 MAIL FROM parameters not recognized",
            "555 5.5.4 MAIL FROM parameters not recognized",
        ),
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("421 Service not available", "421 4.0.0 Service not available"),
        ("451 Local error", "451 4.0.0 Local error"),
        ("550 Refused", "550 5.0.0 Refused"),
        ("250-first line", "250-2.0.0 first line"),
    ],
)
def test_enhance_adds_codes(status: str, expected: str) -> None:
    enhanced = replies.enhance(status)
    assert enhanced == expected
    assert ENHANCED.match(enhanced)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("552 Error: Too much mail data", replies.TOO_BIG),
        ("552 Error: message size exceeds fixed maximum message size", replies.TOO_BIG),
        (
            "500 Line too long (see RFC5321 4.5.3.1.6)",
            "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)",
        ),
        ("500 Command line too long", "500 5.5.2 Command line too long"),
        ("502 EXPN not implemented", "502 5.5.1 EXPN is not available"),
        (
            "252 Cannot VRFY user, but will accept message and attempt delivery",
            "252 2.5.0 Cannot VRFY user; send mail to find out",
        ),
    ],
)
def test_enhance_rewrites_known_replies(status: str, expected: str) -> None:
    assert replies.enhance(status) == expected
    assert replies.TOO_BIG == "552 5.3.4 Message too big for system"


@pytest.mark.parametrize(
    "status",
    [
        "220 gateway.test ESMTP ready",
        "334 VXNlcm5hbWU6",
        "334 ",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.1.0 Sender ok",
        "250 2.0.0 Ok: queued as X",
        "535 5.7.8 Authentication credentials invalid",
        "530 5.7.0 Authentication required",
        "454 4.7.0 Too many failed logins from your address; try again later",
        "250-2.0.0 first line",
        "550 5.7.1",
        replies.TOO_BIG,
        replies.AUTH_OK,
        replies.RECIPIENT_OK,
        "not a reply",
        "",
    ],
)
def test_enhance_leaves_these_unchanged(status: str) -> None:
    assert replies.enhance(status) == status


@pytest.mark.parametrize(
    "constant",
    [
        replies.AUTH_OK,
        replies.AUTH_INVALID,
        replies.AUTH_LOCKED_OUT,
        replies.AUTH_DISABLED,
        replies.SENDER_OK,
        replies.RECIPIENT_OK,
        replies.TOO_MANY_RECIPIENTS,
        replies.TOO_BIG,
        replies.TEMPORARY_FAULT,
        replies.STORAGE_FULL,
        replies.NEEDS_SMTPUTF8,
        replies.queued("X1"),
        replies.sender_not_owned("a@b.example"),
        replies.header_sender_not_owned("a@b.example"),
        replies.bad_address("a@b", "why"),
        replies.bad_header("why"),
        replies.bare_line_ending("bare LF"),
        replies.idle_timeout("gw.test"),
        replies.session_timeout("gw.test"),
        replies.too_many_connections("gw.test"),
    ],
)
def test_gateway_replies_carry_matching_enhanced_codes(constant: str) -> None:
    assert ENHANCED.match(constant)
    assert constant[0] == constant[4]  # basic and enhanced class agree


def test_decision_deny() -> None:
    result = Decision(Outcome.DENY, Reason.NO_CONSENT, "active-consent")
    assert replies.decision(result, "patient@example.org") == (
        "550 5.7.1 <patient@example.org>: There is no documented consent from this patient "
        "to e-mail at this address."
    )


def test_decision_deny_sender_not_owned() -> None:
    result = Decision(Outcome.DENY, Reason.SENDER_NOT_OWNED, "some-rule")
    assert replies.decision(result, "x@praxis.example") == (
        "550 5.7.1 <x@praxis.example>: You may only send as one of your own professional addresses."
    )


def test_decision_allow() -> None:
    result = Decision(Outcome.ALLOW, Reason.INTERNAL, "internal-recipient")
    assert replies.decision(result, "colleague@praxis.example") == (
        "250 2.1.5 <colleague@praxis.example>: Recipient is inside the practice."
    )


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("a@praxis.example", "553 5.7.1 <a@praxis.example>: you may only send"),
        ("jörg@bücher.de", "553 5.7.1 <jörg@bücher.de>: you may only send"),
    ],
)
def test_sender_not_owned(address: str, expected: str) -> None:
    assert replies.sender_not_owned(address).startswith(expected)


def test_small_helpers() -> None:
    assert replies.queued("ABC") == "250 2.0.0 Ok: queued as ABC"
    assert replies.bad_address("x", "the address is empty") == "553 5.1.3 <x>: the address is empty"
    assert replies.bare_line_ending("bare CR") == (
        "550 5.6.0 Message not accepted: it contains a bare CR line ending (only CRLF is allowed)"
    )
    assert replies.idle_timeout("gw.test") == "421 4.4.2 gw.test Error: timeout exceeded"
