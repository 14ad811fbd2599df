"""The message as bytes: line-ending checks and header-block edits.

Pure functions over the raw message. The body is never parsed or changed:
what the physician wrote arrives byte for byte. Only the header block is read
(From, Bcc) and edited (Received prepended, Message-ID and Date added when
missing, Bcc removed so it never leaves the gateway).
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import getaddresses

CRLF = b"\r\n"


class HeaderError(ValueError):
    """The header block is unusable; the message says why."""


@dataclass(frozen=True)
class HeaderField:
    name: str  # lower case
    raw: bytes  # the whole field, with folding and its final CRLF

    @property
    def value(self) -> str:
        """The unfolded value, decoded as UTF-8 (RFC 6532) where it is not ASCII."""
        _, _, value = self.raw.partition(b":")
        text = value.decode("utf-8", errors="surrogateescape")
        return " ".join(text.replace("\r\n", " ").split())


def storable(text: str) -> str:
    """Text from outside (a next hop's reply) as valid UTF-8: undecodable bytes become U+FFFD.

    aiosmtplib decodes replies with surrogateescape; such text cannot be encoded,
    hashed or stored, and must not be able to stop the queue from recording a result.
    """
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def bare_line_ending(content: bytes) -> str | None:
    """'bare LF' or 'bare CR' when a line does not end in CRLF, else None.

    Such endings are how SMTP smuggling hides a second message: they are
    refused, never normalised.
    """
    crlf = content.count(CRLF)
    if content.count(b"\n") != crlf:
        return "bare LF"
    if content.count(b"\r") != crlf:
        return "bare CR"
    return None


def split_message(content: bytes) -> tuple[bytes, bytes]:
    """(header block, rest): the rest starts with the empty line, if any."""
    if content.startswith(CRLF):
        return b"", content
    end = content.find(b"\r\n\r\n")
    if end < 0:
        return content, b""
    return content[: end + 2], content[end + 2 :]


def parse_fields(header_block: bytes) -> list[HeaderField]:
    # Lines are collected per field and joined once: joining at every
    # continuation line costs time quadratic in a long folded field.
    parts: list[tuple[str, list[bytes]]] = []
    for line in header_block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and parts:
            parts[-1][1].append(line)
            continue
        name, colon, _ = line.partition(b":")
        if not colon or not name or name != name.strip() or not name.isascii():
            raise HeaderError("the message header contains a line that is not a header field")
        parts.append((name.decode("ascii").lower(), [line]))
    return [HeaderField(name, b"".join(lines)) for name, lines in parts]


def from_addresses(fields: list[HeaderField]) -> list[str]:
    """The addresses in the single From: field (RFC 5322 allows exactly one)."""
    values = [f.value for f in fields if f.name == "from"]
    if not values:
        raise HeaderError("the message has no From: header")
    if len(values) > 1:
        raise HeaderError("the message has more than one From: header")
    addresses = [address for _, address in getaddresses(values) if address]
    if not addresses:
        raise HeaderError("the From: header holds no address")
    return addresses


def sender_addresses(fields: list[HeaderField]) -> list[str]:
    """Addresses in From: and Sender:, every one of which must be the user's."""
    found = from_addresses(fields)
    found += [a for _, a in getaddresses([f.value for f in fields if f.name == "sender"]) if a]
    return found


def shown_addresses(fields: list[HeaderField]) -> list[str]:
    """Addresses every recipient sees: To and Cc (Bcc is never shown)."""
    return [a for _, a in getaddresses([f.value for f in fields if f.name in ("to", "cc")]) if a]


def rewrite_header(
    content: bytes, prepend: list[bytes], add_if_missing: dict[str, bytes], remove: frozenset[str]
) -> bytes:
    """The message with its header block edited; the body is untouched."""
    block, rest = split_message(content)
    if block and not block.endswith(CRLF):
        block += CRLF
    fields = parse_fields(block)
    present = {f.name for f in fields}
    kept = [f.raw for f in fields if f.name not in remove]
    added = [
        f"{name}: ".encode() + value + CRLF
        for name, value in add_if_missing.items()
        if name.lower() not in present
    ]
    if not rest:
        rest = CRLF
    return b"".join(prepend) + b"".join(kept) + b"".join(added) + rest
