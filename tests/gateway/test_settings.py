"""Settings (gateway.settings): sources, precedence, validation and masking.

The autouse fixture in tests/conftest.py removes every CGW_* variable and
changes into tmp_path, so each test starts from the defaults.
"""

from __future__ import annotations

import base64
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.settings import (
    DeliveryTarget,
    ListenAddress,
    SettingsError,
    load_settings,
    masked_settings,
    parse_delivery,
    parse_duration,
    parse_listen,
)

KEY_32 = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture(autouse=True)
def _no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults of hostname and instance name ask the resolver; keep tests offline."""
    monkeypatch.setenv("CGW_HOSTNAME", "gateway.test")
    monkeypatch.setenv("CGW_INSTANCE_NAME", "test-instance")


def test_defaults() -> None:
    settings = load_settings()
    assert settings.hostname == "gateway.test"
    assert settings.submission_listen == ListenAddress("127.0.0.1", 2587)
    assert settings.smtps_listen == ListenAddress("127.0.0.1", 2465)
    assert settings.delivery == DeliveryTarget(kind="outbox")
    assert settings.practice_domains == frozenset()
    assert settings.max_message_size == 26_214_400
    assert settings.max_recipients == 100
    assert settings.queue_lifetime == timedelta(days=5)
    assert settings.unknown_external == "allow"
    assert settings.denial_mode == "reject"
    assert settings.protect_subject is True
    assert settings.storage_key is None
    assert settings.tls_cert is None
    assert settings.timezone == "UTC"


def test_database_url_defaults_to_sqlite_under_data_dir() -> None:
    settings = load_settings()
    data_dir = Path.cwd() / "cgw-data"
    assert settings.data_dir == data_dir
    assert settings.database_url == f"sqlite:///{data_dir / 'cgw.db'}"
    assert settings.spool_dir == data_dir / "spool"
    assert settings.keys_dir == data_dir / "keys"


def test_relative_data_dir_is_made_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGW_DATA_DIR", "state")
    settings = load_settings()
    assert settings.data_dir == Path.cwd() / "state"
    assert settings.database_url == f"sqlite:///{Path.cwd() / 'state' / 'cgw.db'}"


def test_explicit_database_url_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGW_DATABASE_URL", "postgresql+psycopg://u:pw@db.example/cgw")
    assert load_settings().database_url == "postgresql+psycopg://u:pw@db.example/cgw"


@pytest.mark.parametrize(
    ("name", "value", "attribute", "expected"),
    [
        ("CGW_MAX_MESSAGE_SIZE", "1048576", "max_message_size", 1_048_576),
        ("CGW_MAX_RECIPIENTS", "7", "max_recipients", 7),
        ("CGW_QUEUE_LIFETIME", "12h", "queue_lifetime", timedelta(hours=12)),
        ("CGW_QUARANTINE_RETENTION", "14d", "quarantine_retention", timedelta(days=14)),
        ("CGW_TIMEZONE", "Europe/Berlin", "timezone", "Europe/Berlin"),
        ("CGW_UNKNOWN_EXTERNAL", "quarantine", "unknown_external", "quarantine"),
        ("CGW_DENIAL_MODE", "bounce", "denial_mode", "bounce"),
        ("CGW_PROTECT_SUBJECT", "false", "protect_subject", False),
        (
            "CGW_SUBMISSION_LISTEN",
            "0.0.0.0:587",
            "submission_listen",
            ListenAddress("0.0.0.0", 587),
        ),
        ("CGW_SUBMISSION_LISTEN", "[::1]:2587", "submission_listen", ListenAddress("::1", 2587)),
        ("CGW_SMTPS_LISTEN", "", "smtps_listen", None),
        ("CGW_SMTPS_LISTEN", "  ", "smtps_listen", None),
        ("CGW_DELIVERY", "mx", "delivery", DeliveryTarget(kind="mx")),
        (
            "CGW_DELIVERY",
            "smtp://relay.example",
            "delivery",
            DeliveryTarget(kind="smtp", host="relay.example", port=587, tls="starttls"),
        ),
        ("CGW_AUTH_LOCKOUT", "3", "auth_lockout", 3),
        ("CGW_RETRY_BACKOFF", "90", "retry_backoff", timedelta(seconds=90)),
    ],
    ids=lambda value: str(value),
)
def test_environment_values(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, attribute: str, expected: object
) -> None:
    monkeypatch.setenv(name, value)
    assert getattr(load_settings(), attribute) == expected


def test_practice_domains_are_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGW_PRACTICE_DOMAINS", " PRAXIS.Example. , bücher.de,,Praxis.example ")
    assert load_settings().practice_domains == frozenset({"praxis.example", "xn--bcher-kva.de"})


def test_toml_file_named_by_cgw_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "etc" / "gateway.toml"
    config.parent.mkdir()
    config.write_text(
        'practice_domains = ["Praxis.Example", "bücher.de"]\n'
        "max_recipients = 12\n"
        'queue_lifetime = "15m"\n'
        'delivery = "smtp://relay.example:2525"\n'
    )
    monkeypatch.setenv("CGW_CONFIG", str(config))
    settings = load_settings()
    assert settings.practice_domains == frozenset({"praxis.example", "xn--bcher-kva.de"})
    assert settings.max_recipients == 12
    assert settings.queue_lifetime == timedelta(minutes=15)
    assert settings.delivery == DeliveryTarget(kind="smtp", host="relay.example", port=2525)


def test_default_cgw_toml_in_working_directory() -> None:
    Path("cgw.toml").write_text('max_message_size = 1000\ndenial_mode = "bounce"\n')
    settings = load_settings()
    assert settings.max_message_size == 1000
    assert settings.denial_mode == "bounce"


def test_cgw_config_overrides_default_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    Path("cgw.toml").write_text("max_recipients = 1\n")
    other = tmp_path / "other.toml"
    other.write_text("max_recipients = 2\n")
    monkeypatch.setenv("CGW_CONFIG", str(other))
    assert load_settings().max_recipients == 2


def test_environment_beats_toml(monkeypatch: pytest.MonkeyPatch) -> None:
    Path("cgw.toml").write_text('max_recipients = 12\ntimezone = "Europe/Berlin"\n')
    monkeypatch.setenv("CGW_MAX_RECIPIENTS", "34")
    settings = load_settings()
    assert settings.max_recipients == 34
    assert settings.timezone == "Europe/Berlin"  # not overridden: still from the file


def test_keyword_arguments_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGW_MAX_RECIPIENTS", "34")
    assert load_settings(max_recipients=5).max_recipients == 5


def test_missing_cgw_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CGW_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(SettingsError, match=r"^CGW_CONFIG: file .*absent\.toml does not exist$"):
        load_settings()


def test_toml_that_does_not_parse() -> None:
    Path("cgw.toml").write_text("max_recipients = \n")
    with pytest.raises(SettingsError, match=r"^invalid configuration: "):
        load_settings()


def test_unknown_toml_key() -> None:
    Path("cgw.toml").write_text('practise_domains = "a.org"\n')
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value) == "invalid setting CGW_PRACTISE_DOMAINS: unknown setting"


def test_bad_toml_value_names_the_setting() -> None:
    Path("cgw.toml").write_text("max_recipients = 0\n")
    with pytest.raises(SettingsError, match=r"^invalid setting CGW_MAX_RECIPIENTS: "):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value", "detail"),
    [
        ("MAX_MESSAGE_SIZE", "abc", "valid integer"),
        ("MAX_MESSAGE_SIZE", "0", "greater than 0"),
        ("MAX_MESSAGE_SIZE", "-1", "greater than 0"),
        ("MAX_RECIPIENTS", "0", "greater than 0"),
        ("DELIVERY", "ftp://x", "must be 'outbox', 'mx' or smtp://"),
        ("DELIVERY", "smtp://h:25?tls=none", "tls= must be 'starttls' or 'implicit'"),
        ("DELIVERY", "smtp://h:25?foo=1", "unknown option 'foo'"),
        ("DELIVERY", "smtp://h:99999", "invalid port"),
        ("DELIVERY", "smtp://:25", "must be 'outbox'"),
        ("PRACTICE_DOMAINS", "a.org,bad_domain", "'bad_domain' is not a valid host name"),
        ("QUEUE_LIFETIME", "5x", "'5x' is not a duration"),
        ("QUEUE_LIFETIME", "-5s", "is not a duration"),
        ("QUARANTINE_RETENTION", "0s", "CGW_QUARANTINE_RETENTION: must be longer than 0s"),
        ("TIMEZONE", "Mars/Base", "'Mars/Base' is not a known time zone"),
        ("SUBMISSION_LISTEN", "nohost", "is not host:port"),
        ("SUBMISSION_LISTEN", "1.2.3.4:99999", "port 99999 is out of range"),
        ("SMTPS_LISTEN", "::1:465", "is not host:port"),
        ("UNKNOWN_EXTERNAL", "maybe", "'allow', 'quarantine' or 'bounce'"),
        ("DENIAL_MODE", "x", "'reject' or 'bounce'"),
        ("STORAGE_KEY", "not-base64", "must be base64"),
        ("STORAGE_KEY", base64.b64encode(bytes(16)).decode(), "must be 32 bytes"),
        ("TLS_CERT", "/nonexistent/cert.pem", "file /nonexistent/cert.pem does not exist"),
        ("PROTECT_SUBJECT", "maybe", "valid boolean"),
        ("HOSTNAME", "   ", "must not be empty"),
    ],
    ids=lambda value: str(value)[:30],
)
def test_bad_values_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, detail: str
) -> None:
    monkeypatch.setenv(f"CGW_{name}", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"invalid setting CGW_{name}: ")
    assert detail in message
    assert "\n" not in message  # one line


def test_unknown_environment_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGW_PRACTISE_DOMAINS", "praxis.example")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value) == "invalid setting CGW_PRACTISE_DOMAINS: unknown setting"


def test_tls_cert_and_key_must_come_together(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    monkeypatch.setenv("CGW_TLS_CERT", str(cert))
    with pytest.raises(
        SettingsError, match="invalid setting CGW_TLS_CERT: must be set together with CGW_TLS_KEY"
    ):
        load_settings()
    key = tmp_path / "key.pem"
    key.write_text("y")
    monkeypatch.setenv("CGW_TLS_KEY", str(key))
    settings = load_settings()
    assert (settings.tls_cert, settings.tls_key) == (cert, key)


# --- parse_delivery ---------------------------------------------------------------------------


def test_parse_delivery_with_encoded_credentials() -> None:
    target = parse_delivery("smtp://user%40x:p%40ss@relay.example:2525?tls=implicit")
    assert target == DeliveryTarget(
        kind="smtp",
        host="relay.example",
        port=2525,
        tls="implicit",
        username="user@x",
        password="p@ss",
    )
    assert target.password == "p@ss"


@pytest.mark.parametrize(
    ("url", "port", "tls"),
    [
        ("smtp://relay.example", 587, "starttls"),
        ("smtp://relay.example?tls=starttls", 587, "starttls"),
        ("smtp://relay.example?tls=implicit", 465, "implicit"),
        ("smtp://relay.example:25", 25, "starttls"),
        ("smtp://relay.example:2465?tls=implicit", 2465, "implicit"),
    ],
)
def test_parse_delivery_default_ports(url: str, port: int, tls: str) -> None:
    target = parse_delivery(url)
    assert (target.kind, target.host, target.port, target.tls) == (
        "smtp",
        "relay.example",
        port,
        tls,
    )
    assert target.username is None
    assert target.password is None


@pytest.mark.parametrize("text", ["outbox", "mx", " outbox "])
def test_parse_delivery_keywords(text: str) -> None:
    assert parse_delivery(text) == DeliveryTarget(kind=text.strip())  # type: ignore[arg-type]


def test_delivery_target_repr_and_describe_hide_the_password() -> None:
    target = parse_delivery("smtp://mailer:hunter2-secret@relay.example:2525")
    assert "hunter2-secret" not in repr(target)
    assert "hunter2-secret" not in str(target)
    assert target.describe() == "smtp://mailer:****@relay.example:2525?tls=starttls"


def test_describe_without_credentials() -> None:
    assert parse_delivery("smtp://relay.example").describe() == (
        "smtp://relay.example:587?tls=starttls"
    )
    assert parse_delivery("outbox").describe() == "outbox"


# --- durations and listen addresses -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("12h", timedelta(hours=12)),
        ("5d", timedelta(days=5)),
        ("90", timedelta(seconds=90)),
        ("1.5h", timedelta(minutes=90)),
        (" 2 m ", timedelta(minutes=2)),
        ("0s", timedelta(0)),
        (45, timedelta(seconds=45)),
        (timedelta(hours=1), timedelta(hours=1)),
    ],
    ids=repr,
)
def test_parse_duration(text: object, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["5x", "", "m", "-1s", "1w", "5 days", "1e3"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CGW_QUEUE_LIFETIME", "30s"),
        ("CGW_QUEUE_LIFETIME", "15m"),
        ("CGW_QUEUE_LIFETIME", "12h"),
        ("CGW_QUEUE_LIFETIME", "5d"),
        ("CGW_QUEUE_LIFETIME", "90"),
    ],
)
def test_durations_from_environment(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    assert load_settings().queue_lifetime == parse_duration(value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:2587", ListenAddress("127.0.0.1", 2587)),
        ("[::1]:2587", ListenAddress("::1", 2587)),
        ("[::]:25", ListenAddress("::", 25)),
        ("localhost:65535", ListenAddress("localhost", 65535)),
        ("", None),
        (None, None),
    ],
)
def test_parse_listen(text: str | None, expected: ListenAddress | None) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("address", "text"),
    [(ListenAddress("::1", 2587), "[::1]:2587"), (ListenAddress("10.0.0.1", 25), "10.0.0.1:25")],
)
def test_listen_address_str(address: ListenAddress, text: str) -> None:
    assert str(address) == text


# --- masking ----------------------------------------------------------------------------------


def test_masked_settings_hides_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGW_DATABASE_URL", "postgresql+psycopg://u:secret@h/db")
    monkeypatch.setenv("CGW_DELIVERY", "smtp://mailer:topsecret@relay.example:2525")
    monkeypatch.setenv("CGW_STORAGE_KEY", KEY_32)
    shown = masked_settings(load_settings())
    assert shown["CGW_DATABASE_URL"] == "postgresql+psycopg://u:****@h/db"
    assert shown["CGW_DELIVERY"] == "smtp://mailer:****@relay.example:2525?tls=starttls"
    assert shown["CGW_STORAGE_KEY"] == "****"
    everything = "\n".join(shown.values())
    assert "secret" not in everything
    assert "topsecret" not in everything
    assert KEY_32 not in everything


def test_masked_settings_formats_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGW_PRACTICE_DOMAINS", "b.example,a.example")
    monkeypatch.setenv("CGW_QUEUE_LIFETIME", "36h")
    monkeypatch.setenv("CGW_SMTPS_LISTEN", "")
    shown = masked_settings(load_settings())
    assert set(shown) == {"CGW_" + name.upper() for name in type(load_settings()).model_fields}
    assert shown["CGW_PRACTICE_DOMAINS"] == "a.example,b.example"
    assert shown["CGW_QUEUE_LIFETIME"] == "36h"
    assert shown["CGW_SMTPS_LISTEN"] == ""
    assert shown["CGW_STORAGE_KEY"] == ""
    assert shown["CGW_PROTECT_SUBJECT"] == "true"
    assert shown["CGW_RETRY_BACKOFF_MAX"] == "4000s"
    assert shown["CGW_SUBMISSION_LISTEN"] == "127.0.0.1:2587"


# --- regressions found by review -------------------------------------------------------------


def test_delivery_port_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="port"):
        parse_delivery("smtp://relay.example:0")


def test_lower_case_unknown_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("cgw_practise_domains", "praxis.example")
    with pytest.raises(SettingsError, match="unknown setting"):
        load_settings()


def test_lower_case_known_variable_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    # Documents the case-insensitive reading the xfail above contrasts with.
    monkeypatch.setenv("cgw_max_recipients", "9")
    assert load_settings().max_recipients == 9
