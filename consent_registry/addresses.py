"""One normalisation of e-mail addresses, used everywhere an address is matched.

An address is kept as written, for display and delivery, and a canonical
matching key is derived from it: lower case, the domain in IDNA A-label form
without a trailing dot, and a ``+tag`` removed from the local part. A patient
is then recognised however the address is typed.

Addresses that route through other hosts (source routes, the ``%`` hack),
quoted local parts, address literals and anything with control characters
or white space are refused with the reason: a gateway that enforces consent
must never have to guess what an address means.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import idna

MAX_LOCAL_OCTETS = 64
MAX_DOMAIN_OCTETS = 253
MAX_ADDRESS_OCTETS = 254

# RFC 5322 atext plus '.', and (RFC 6531) any non-ASCII character.
_LOCAL_ALLOWED = re.compile(r"^[A-Za-z0-9!#$&'*+/=?^_`{|}~.\-\u0080-\U0010FFFF]+$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# White space as str.isspace() has it, and the C0 controls and DEL. A pattern,
# not a test per character: addresses are parsed several times a message.
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")


class AddressError(ValueError):
    """An address the gateway refuses; the message says why."""


@dataclass(frozen=True)
class Address:
    written: str
    local: str
    domain: str
    key: str

    @property
    def is_ascii(self) -> bool:
        return self.written.isascii()


def parse_address(text: str) -> Address:
    """Parse and normalise one address, or raise AddressError saying why."""
    written = text.strip()
    if written.startswith("<") and written.endswith(">"):
        written = written[1:-1]
    if not written:
        raise AddressError("the address is empty")
    if _SPACE_OR_CONTROL.search(written):
        raise AddressError("the address contains white space or control characters")
    if written.startswith("@") or ":" in written:
        raise AddressError("source-routed addresses are not accepted")
    if written.startswith('"'):
        raise AddressError("quoted local parts are not accepted")
    local, at, domain_written = written.rpartition("@")
    if not at or not local or not domain_written:
        raise AddressError("the address must have the form name@domain")
    if "@" in local:
        raise AddressError("the address has more than one '@'")
    if "%" in local or "!" in local:
        raise AddressError("routing through '%' or '!' in the local part is not accepted")
    _check_local(local)
    domain = normalise_domain(domain_written)
    if len(written.encode()) > MAX_ADDRESS_OCTETS:
        raise AddressError(f"the address is longer than {MAX_ADDRESS_OCTETS} octets")
    base_local = local.split("+", 1)[0] or local
    return Address(
        written=written, local=local, domain=domain, key=f"{base_local.lower()}@{domain}"
    )


def _check_local(local: str) -> None:
    if len(local.encode()) > MAX_LOCAL_OCTETS:
        raise AddressError(f"the local part is longer than {MAX_LOCAL_OCTETS} octets")
    if not _LOCAL_ALLOWED.match(local):
        raise AddressError("the local part contains characters that are not allowed")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise AddressError("the local part has a misplaced dot")


@functools.lru_cache(maxsize=4096)
def normalise_domain(domain: str) -> str:
    """Lower-case IDNA A-label form of a domain, without a trailing dot.

    Cached: IDNA 2008 checks cost a tenth of a millisecond, every address
    of every command is normalised, and a practice mails few domains.
    """
    if domain.startswith("["):
        raise AddressError("address literals ([1.2.3.4]) are not accepted")
    name = domain[:-1] if domain.endswith(".") else domain
    if not name:
        raise AddressError("the domain is empty")
    if len(name.encode()) > MAX_DOMAIN_OCTETS:
        raise AddressError(f"the domain is longer than {MAX_DOMAIN_OCTETS} octets")
    try:
        # IDNA 2008 with UTS 46 mapping, non-transitional: "straße.de" stays
        # distinct from "strasse.de" (Python's built-in codec is IDNA 2003).
        ascii_name = idna.encode(name, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as exc:
        raise AddressError(f"the domain {domain!r} is not a valid host name") from exc
    if len(ascii_name) > MAX_DOMAIN_OCTETS:
        raise AddressError(f"the domain is longer than {MAX_DOMAIN_OCTETS} octets")
    labels = ascii_name.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise AddressError(f"the domain {domain!r} is not a valid host name")
    if labels[-1].isdigit():
        raise AddressError("IP addresses are not accepted as domains")
    return ascii_name


def address_key(text: str) -> str:
    """The canonical matching key of an address (raises AddressError)."""
    return parse_address(text).key
