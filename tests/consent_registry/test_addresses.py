"""Address parsing and the canonical matching key (consent_registry.addresses)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consent_registry.addresses import (
    MAX_LOCAL_OCTETS,
    Address,
    AddressError,
    address_key,
    normalise_domain,
    parse_address,
)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("dr.smith@praxis.example", "dr.smith@praxis.example"),
        ("Dr.Smith@Praxis.Example", "dr.smith@praxis.example"),
        ("DR.SMITH@PRAXIS.EXAMPLE", "dr.smith@praxis.example"),
        ("anna+clinic@example.org", "anna@example.org"),
        ("Anna+Clinic+x@Example.org", "anna@example.org"),
        ("+only@example.org", "+only@example.org"),  # nothing before '+': kept whole
        ("anna@example.org.", "anna@example.org"),
        ("jörg@bücher.de", "jörg@xn--bcher-kva.de"),
        ("jörg@xn--bcher-kva.de", "jörg@xn--bcher-kva.de"),
        ("Jörg@XN--BCHER-KVA.DE", "jörg@xn--bcher-kva.de"),
        ("JÖRG@BÜCHER.DE", "jörg@xn--bcher-kva.de"),
        ("<anna@example.org>", "anna@example.org"),
        ("  <Anna@Example.org>  ", "anna@example.org"),
        ("o'brien@example.org", "o'brien@example.org"),
        ("a_b-c{d}@sub.example-host.org", "a_b-c{d}@sub.example-host.org"),
        ("x@123.example", "x@123.example"),
        ("a" * 64 + "@example.org", "a" * 64 + "@example.org"),
    ],
    ids=lambda value: value if len(value) < 40 else value[:20] + "…",
)
def test_accepted_addresses_and_keys(text: str, key: str) -> None:
    parsed = parse_address(text)
    assert parsed.key == key
    assert address_key(text) == key


@pytest.mark.parametrize(
    ("text", "written", "local", "domain"),
    [
        ("Dr.Smith@Praxis.Example", "Dr.Smith@Praxis.Example", "Dr.Smith", "praxis.example"),
        ("<anna+clinic@example.org>", "anna+clinic@example.org", "anna+clinic", "example.org"),
        ("jörg@bücher.de", "jörg@bücher.de", "jörg", "xn--bcher-kva.de"),
        ("anna@example.org.", "anna@example.org.", "anna", "example.org"),
    ],
)
def test_written_keeps_the_original_text(text: str, written: str, local: str, domain: str) -> None:
    parsed = parse_address(text)
    assert parsed == Address(written=written, local=local, domain=domain, key=parsed.key)


def test_unicode_and_a_label_forms_give_the_same_key() -> None:
    unicode_form = parse_address("jörg@bücher.de")
    a_label_form = parse_address("jörg@xn--bcher-kva.de")
    assert unicode_form.key == a_label_form.key == "jörg@xn--bcher-kva.de"
    assert unicode_form.domain == a_label_form.domain
    assert unicode_form.written != a_label_form.written


@pytest.mark.parametrize(
    ("text", "is_ascii"),
    [("anna@example.org", True), ("jörg@xn--bcher-kva.de", False), ("a@bücher.de", False)],
)
def test_is_ascii(text: str, is_ascii: bool) -> None:
    assert parse_address(text).is_ascii is is_ascii


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("<>", "empty"),
        ("anna @example.org", "white space"),
        ("anna@example.org extra", "white space"),
        ("an\tna@example.org", "white space"),
        ("anna\x00@example.org", "control characters"),
        ("anna\x1b@example.org", "control characters"),
        ("anna\x7f@example.org", "control characters"),
        ("anna@exa\rmple.org", "control characters"),
        ("@a.b:x@c.d", "source-routed"),
        ("@a.b,@e.f:x@c.d", "source-routed"),
        ("x:y@c.d", "source-routed"),
        ("user%other.example@relay.example", "'%' or '!'"),
        ("host!user@relay.example", "'%' or '!'"),
        ('"john doe"@example.org', "white space"),
        ('"john"@example.org', "quoted local parts"),
        ("anna@[127.0.0.1]", "address literals"),
        ("anna.example.org", "name@domain"),
        ("anna@", "name@domain"),
        ("anna@@example.org", "more than one '@'"),
        ("a@b@example.org", "more than one '@'"),
        (".anna@example.org", "misplaced dot"),
        ("anna.@example.org", "misplaced dot"),
        ("an..na@example.org", "misplaced dot"),
        ("a" * 65 + "@example.org", f"longer than {MAX_LOCAL_OCTETS} octets"),
        ("ä" * 33 + "@example.org", f"longer than {MAX_LOCAL_OCTETS} octets"),  # 66 octets
        ("anna(comment)@example.org", "characters that are not allowed"),
        ("an,na@example.org", "characters that are not allowed"),
        ("anna@bad_label.example", "not a valid host name"),
        ("anna@-lead.example", "not a valid host name"),
        ("anna@trail-.example", "not a valid host name"),
        ("anna@a..example", "domain"),
        ("anna@localhost", "not a valid host name"),
        ("anna@.", "the domain is empty"),
        ("anna@" + "a" * 64 + ".org", "domain"),
        ("anna@" + ".".join(["abcdefghi"] * 26) + ".org", "longer than 253 octets"),
        ("a" * 60 + "@" + ".".join(["abcdefghij"] * 18) + ".org", "longer than 254 octets"),
    ],
    ids=repr,
)
def test_refused_addresses(text: str, message: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_address(text)
    assert message in str(caught.value)


def test_address_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        address_key("")


@pytest.mark.parametrize(
    ("domain", "normalised"),
    [
        ("Example.ORG", "example.org"),
        ("example.org.", "example.org"),
        ("Bücher.de", "xn--bcher-kva.de"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
    ],
)
def test_normalise_domain(domain: str, normalised: str) -> None:
    assert normalise_domain(domain) == normalised


def test_eszett_domain_is_not_folded_into_ss() -> None:
    assert parse_address("anna@straße.de").key != parse_address("anna@strasse.de").key


# --- properties -------------------------------------------------------------------------------

# "!" and "%" are atext but refused as routing, so they are left out.
_atom = st.from_regex(r"[A-Za-z0-9#$&'*=?^_`{|}~/-]{1,10}", fullmatch=True)
_local = st.lists(_atom, min_size=1, max_size=4).map(".".join)  # at most 43 characters
# Labels with "--" in positions 3-4 are reserved (IDNA "xn--" and friends).
_label = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,12}[A-Za-z0-9])?", fullmatch=True).filter(
    lambda label: label[2:4] != "--"
)
_tld = st.from_regex(r"[a-z][a-z0-9]{1,9}", fullmatch=True)
_domain = st.tuples(st.lists(_label, min_size=1, max_size=3), _tld).map(
    lambda parts: ".".join([*parts[0], parts[1]])
)
_tag = st.one_of(st.just(""), st.from_regex(r"\+[A-Za-z0-9.+-]{0,8}", fullmatch=True))


@given(local=_local, tag=_tag, domain=_domain, trailing_dot=st.booleans())
def test_key_is_idempotent(local: str, tag: str, domain: str, trailing_dot: bool) -> None:
    text = f"{local}{tag}@{domain}{'.' if trailing_dot else ''}"
    try:
        key = parse_address(text).key
    except AddressError:
        # Only a tag that ends the local part with a dot (or doubles one) may be refused.
        assert tag.endswith(".") or ".." in tag
        return
    assert parse_address(key).key == key
    assert key == key.lower()
    assert key == f"{local.lower()}@{domain.lower()}"


@given(local=_local, tag=_tag, domain=_domain)
def test_key_is_case_insensitive(local: str, tag: str, domain: str) -> None:
    text = f"{local}{tag}@{domain}"
    try:
        key = parse_address(text).key
    except AddressError:
        return
    assert parse_address(text.upper()).key == key
    assert parse_address(text.lower()).key == key
    assert parse_address(f"<{text.swapcase()}>").key == key
