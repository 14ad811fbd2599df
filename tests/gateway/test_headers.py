"""Header-block handling (gateway.headers): line endings, fields, From, rewriting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.headers import (
    HeaderError,
    HeaderField,
    bare_line_ending,
    from_addresses,
    parse_fields,
    rewrite_header,
    sender_addresses,
    split_message,
)

RECEIVED = (
    b"Received: by gateway.test (Consent Gateway) with ESMTPSA id X;\r\n\tSat, 1 Mar 2025\r\n"
)
STAMPS = {"Message-ID": b"<new@gateway.test>", "Date": b"Sat, 01 Mar 2025 12:00:00 +0000"}
BCC = frozenset({"bcc"})


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", None),
        (b"no line ending at all", None),
        (b"From: a@b.example\r\n\r\nbody\r\n", None),
        (b"\r\n\r\n\r\n", None),
        (b"a\nb", "bare LF"),
        (b"a\rb", "bare CR"),
        (b"\r\n\n", "bare LF"),
        (b"\r\r\n", "bare CR"),
        (b"\n\r", "bare LF"),
        (b"body\r\n.\n", "bare LF"),
        (b"body\r\n.\r", "bare CR"),
        (b"ok\r\nok\r\nlast\n", "bare LF"),
    ],
    ids=repr,
)
def test_bare_line_ending(content: bytes, expected: str | None) -> None:
    assert bare_line_ending(content) == expected


@pytest.mark.parametrize(
    ("content", "header", "rest"),
    [
        (
            b"From: a@b.example\r\nTo: c@d.example\r\n",
            b"From: a@b.example\r\nTo: c@d.example\r\n",
            b"",
        ),
        (b"\r\nbody only\r\n", b"", b"\r\nbody only\r\n"),
        (b"\r\n", b"", b"\r\n"),
        (b"From: a@b.example\r\n\r\nbody\r\n", b"From: a@b.example\r\n", b"\r\nbody\r\n"),
        (b"A: 1\r\n\r\n", b"A: 1\r\n", b"\r\n"),
        (b"A: 1\r\n\r\nx\r\n\r\ny\r\n", b"A: 1\r\n", b"\r\nx\r\n\r\ny\r\n"),
        (b"", b"", b""),
    ],
    ids=[
        "no-body",
        "empty-line-first",
        "only-empty-line",
        "normal",
        "empty-body",
        "two-blanks",
        "empty",
    ],
)
def test_split_message(content: bytes, header: bytes, rest: bytes) -> None:
    assert split_message(content) == (header, rest)
    assert header + rest == content


def test_parse_fields_keeps_folding_in_raw_and_unfolds_value() -> None:
    block = (
        b"Subject: a long\r\n"
        b"  subject\r\n"
        b"\tline\r\n"
        b"FROM: Dr. Smith <dr.smith@praxis.example>\r\n"
        b"X-Empty:\r\n"
    )
    fields = parse_fields(block)
    assert fields == [
        HeaderField("subject", b"Subject: a long\r\n  subject\r\n\tline\r\n"),
        HeaderField("from", b"FROM: Dr. Smith <dr.smith@praxis.example>\r\n"),
        HeaderField("x-empty", b"X-Empty:\r\n"),
    ]
    assert [field.value for field in fields] == [
        "a long subject line",
        "Dr. Smith <dr.smith@praxis.example>",
        "",
    ]
    assert b"".join(field.raw for field in fields) == block


def test_value_decodes_utf8() -> None:
    (field,) = parse_fields("Subject: Befund für Frau Müller\r\n".encode())
    assert field.value == "Befund für Frau Müller"


def test_value_keeps_colons_after_the_first() -> None:
    (field,) = parse_fields(b"Subject: Re: Termin: 10:30\r\n")
    assert field.value == "Re: Termin: 10:30"


@pytest.mark.parametrize(
    "block",
    [
        b"From: a@b.example\r\nthis is not a header\r\n",
        b" leading continuation\r\n",
        b"From : a@b.example\r\n",
        b": no name\r\n",
        "Frøm: a@b.example\r\n".encode(),
        b"From: a@b.example\r\n\r\n",  # an empty line is not a header field
    ],
    ids=[
        "no-colon",
        "leading-continuation",
        "space-before-colon",
        "empty-name",
        "non-ascii-name",
        "empty-line",
    ],
)
def test_parse_fields_refuses_non_header_lines(block: bytes) -> None:
    with pytest.raises(HeaderError, match="not a header field"):
        parse_fields(block)


def test_parse_fields_of_empty_block() -> None:
    assert parse_fields(b"") == []


def _fields(*lines: str) -> list[HeaderField]:
    return parse_fields("".join(line + "\r\n" for line in lines).encode())


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["From: dr.smith@praxis.example"], ["dr.smith@praxis.example"]),
        (["From: Dr. Smith <dr.smith@praxis.example>"], ["dr.smith@praxis.example"]),
        (['From: "Smith, Dr." <dr.smith@praxis.example>'], ["dr.smith@praxis.example"]),
        (
            ["From: a@praxis.example, Dr. B <b@praxis.example>"],
            ["a@praxis.example", "b@praxis.example"],
        ),
        (["From: Dr. Smith", " <dr.smith@praxis.example>"], ["dr.smith@praxis.example"]),
        (["To: x@y.example", "from: a@praxis.example"], ["a@praxis.example"]),
    ],
    ids=["bare", "display-name", "quoted-name", "several", "folded", "lower-case-name"],
)
def test_from_addresses(lines: list[str], expected: list[str]) -> None:
    assert from_addresses(_fields(*lines)) == expected


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["To: x@y.example", "Subject: hi"], "no From: header"),
        ([], "no From: header"),
        (["From: a@praxis.example", "From: b@praxis.example"], "more than one From: header"),
        (["From: a@praxis.example", "FROM: a@praxis.example"], "more than one From: header"),
        (["From:"], "holds no address"),
        (["From: Dr. Smith <>"], "holds no address"),
        (["From: Undisclosed recipients:;"], "holds no address"),
    ],
    ids=["missing", "empty-header", "two", "two-case", "empty", "empty-angle", "empty-group"],
)
def test_from_addresses_refuses(lines: list[str], message: str) -> None:
    with pytest.raises(HeaderError, match=message):
        from_addresses(_fields(*lines))


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["From: a@praxis.example"], ["a@praxis.example"]),
        (
            ["From: a@praxis.example", "Sender: Desk <desk@praxis.example>"],
            ["a@praxis.example", "desk@praxis.example"],
        ),
        (
            ["Sender: desk@praxis.example", "From: a@praxis.example, b@praxis.example"],
            ["a@praxis.example", "b@praxis.example", "desk@praxis.example"],
        ),
        (["From: a@praxis.example", "Sender:"], ["a@praxis.example"]),
        (
            ["From: a@praxis.example", "Sender: x@evil.example", "Sender: y@evil.example"],
            ["a@praxis.example", "x@evil.example", "y@evil.example"],
        ),
        (["From: a@praxis.example", "Reply-To: r@elsewhere.example"], ["a@praxis.example"]),
    ],
    ids=["from-only", "with-sender", "sender-first", "empty-sender", "two-senders", "reply-to"],
)
def test_sender_addresses(lines: list[str], expected: list[str]) -> None:
    assert sender_addresses(_fields(*lines)) == expected


def test_sender_addresses_needs_from() -> None:
    with pytest.raises(HeaderError, match="no From: header"):
        sender_addresses(_fields("Sender: desk@praxis.example"))


# --- rewrite_header ---------------------------------------------------------------------------


def test_rewrite_prepends_and_adds_missing_fields() -> None:
    content = b"From: a@praxis.example\r\nSubject: hi\r\n\r\nbody\r\n"
    assert rewrite_header(content, [RECEIVED], STAMPS, BCC) == (
        RECEIVED
        + b"From: a@praxis.example\r\nSubject: hi\r\n"
        + b"Message-ID: <new@gateway.test>\r\n"
        + b"Date: Sat, 01 Mar 2025 12:00:00 +0000\r\n"
        + b"\r\nbody\r\n"
    )


@pytest.mark.parametrize(
    "existing",
    [
        b"Message-ID: <old@client>\r\nDate: Fri, 28 Feb 2025 09:00:00 +0100\r\n",
        b"message-id: <old@client>\r\nDATE: Fri, 28 Feb 2025 09:00:00 +0100\r\n",
        b"MESSAGE-ID:\r\n <old@client>\r\ndate: Fri, 28 Feb 2025 09:00:00 +0100\r\n",
    ],
    ids=["canonical", "mixed-case", "folded"],
)
def test_rewrite_keeps_existing_message_id_and_date(existing: bytes) -> None:
    content = b"From: a@praxis.example\r\n" + existing + b"\r\nbody\r\n"
    result = rewrite_header(content, [RECEIVED], STAMPS, BCC)
    assert result == RECEIVED + content
    assert b"<new@gateway.test>" not in result


def test_rewrite_adds_only_the_missing_one() -> None:
    content = b"From: a@praxis.example\r\ndate: today\r\n\r\nbody\r\n"
    result = rewrite_header(content, [], STAMPS, BCC)
    assert result == (
        b"From: a@praxis.example\r\ndate: today\r\nMessage-ID: <new@gateway.test>\r\n\r\nbody\r\n"
    )


def test_rewrite_removes_every_bcc_with_its_continuations() -> None:
    content = (
        b"From: a@praxis.example\r\n"
        b"Bcc: secret1@example.org,\r\n"
        b"  secret2@example.org\r\n"
        b"To: b@praxis.example\r\n"
        b"BCC: secret3@example.org\r\n"
        b"bcc:\r\n"
        b"\tsecret4@example.org\r\n"
        b"Message-ID: <m@x>\r\nDate: d\r\n"
        b"\r\n"
        b"Bcc: body text is not a header\r\n"
    )
    result = rewrite_header(content, [], STAMPS, BCC)
    assert result == (
        b"From: a@praxis.example\r\n"
        b"To: b@praxis.example\r\n"
        b"Message-ID: <m@x>\r\nDate: d\r\n"
        b"\r\n"
        b"Bcc: body text is not a header\r\n"
    )
    head, _ = split_message(result)
    for secret in (b"secret1", b"secret2", b"secret3", b"secret4"):
        assert secret not in head


def test_rewrite_keeps_header_order_and_bytes() -> None:
    content = b"X-B: 2\r\nFrom:  odd   spacing \r\nX-A: 1\r\n\r\n"
    result = rewrite_header(content, [], {}, BCC)
    assert result == content


def test_rewrite_of_header_without_body_adds_the_empty_line() -> None:
    content = b"From: a@praxis.example\r\n"
    result = rewrite_header(content, [RECEIVED], {}, BCC)
    assert result == RECEIVED + b"From: a@praxis.example\r\n\r\n"


def test_rewrite_of_body_only_message() -> None:
    content = b"\r\njust a body\r\n"
    result = rewrite_header(content, [RECEIVED], {"Date": b"d"}, BCC)
    assert result == RECEIVED + b"Date: d\r\n" + content


def test_rewrite_refuses_a_broken_header() -> None:
    with pytest.raises(HeaderError):
        rewrite_header(b"not a header\r\n\r\nbody\r\n", [], STAMPS, BCC)


_body_line = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_body = st.lists(_body_line, max_size=12).map(lambda lines: b"".join(x + b"\r\n" for x in lines))
_header_value = st.from_regex(r"[A-Za-z0-9 ]{0,30}", fullmatch=True)


@given(
    body=st.tuples(_body, _body_line).map(lambda parts: parts[0] + parts[1]),
    subject=_header_value,
    with_bcc=st.booleans(),
    with_message_id=st.booleans(),
)
def test_rewrite_never_changes_the_body(
    body: bytes, subject: str, with_bcc: bool, with_message_id: bool
) -> None:
    header = b"From: a@praxis.example\r\nSubject: " + subject.encode() + b"\r\n"
    if with_bcc:
        header += b"Bcc: hidden@example.org,\r\n other@example.org\r\n"
    if with_message_id:
        header += b"Message-ID: <m@client>\r\n"
    content = header + b"\r\n" + body
    assert bare_line_ending(content) is None
    result = rewrite_header(content, [RECEIVED], STAMPS, BCC)
    new_header, rest = split_message(result)
    assert rest == b"\r\n" + body
    assert result.endswith(b"\r\n" + body)
    assert result.startswith(RECEIVED)
    assert b"hidden@example.org" not in new_header
    assert b"other@example.org" not in new_header
    assert [field.name for field in parse_fields(new_header)].count("message-id") == 1
    assert bare_line_ending(result) is None
