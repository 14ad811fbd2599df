"""Settings (SPEC §2), read once at start-up and passed down; no globals.

Sources, highest first: keyword arguments (tests), ``CGW_*`` environment
variables, the TOML file named by ``CGW_CONFIG`` (default ``./cgw.toml`` if it
exists, keys are the setting names without the ``CGW_`` prefix, lower case),
then the defaults. A bad value stops start-up with one line naming the setting.
"""

from __future__ import annotations

import base64
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from consent_registry.addresses import AddressError, normalise_domain
from policies.facts import PolicySettings, StaffPatientMail, UnknownExternal

ENV_PREFIX = "CGW_"


class SettingsError(Exception):
    """A setting is missing or wrong; the message names it."""


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DeliveryTarget:
    """Where accepted mail goes next: a local outbox, a smarthost, or MX."""

    kind: Literal["outbox", "smtp", "mx"]
    host: str = ""
    port: int = 0
    tls: Literal["starttls", "implicit"] = "starttls"
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """The target with its password masked, for logs and ``config show``."""
        if self.kind != "smtp":
            return self.kind
        auth = f"{self.username}:****@" if self.username else ""
        return f"smtp://{auth}{self.host}:{self.port}?tls={self.tls}"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration such as 30s, 15m, 12h or 5d")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def parse_listen(value: Any) -> ListenAddress | None:
    if isinstance(value, ListenAddress) or value is None:
        return value
    text = str(value).strip()
    if not text:
        return None
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", text)
    if not match:
        raise ValueError(f"{text!r} is not host:port (use [addr]:port for IPv6)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ValueError(f"port {port} is out of range")
    return ListenAddress(host, port)


def parse_delivery(value: Any) -> DeliveryTarget:
    if isinstance(value, DeliveryTarget):
        return value
    text = str(value).strip()
    if text in ("outbox", "mx"):
        return DeliveryTarget(kind=text)  # type: ignore[arg-type]
    url = urlsplit(text)
    if url.scheme != "smtp" or not url.hostname:
        raise ValueError(
            "must be 'outbox', 'mx' or smtp://[user:pass@]host:port[?tls=starttls|implicit]"
        )
    query = parse_qs(url.query, keep_blank_values=True)
    unknown = set(query) - {"tls"}
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]!r} in the smtp:// URL")
    tls = query.get("tls", ["starttls"])[-1]
    if tls not in ("starttls", "implicit"):
        raise ValueError(
            "tls= must be 'starttls' or 'implicit' (plaintext next hops are not supported)"
        )
    try:
        port = url.port
    except ValueError:
        raise ValueError("the smtp:// URL has an invalid port") from None
    if port == 0:
        raise ValueError("the smtp:// URL has port 0")
    port = port or (465 if tls == "implicit" else 587)
    return DeliveryTarget(
        kind="smtp",
        host=url.hostname,
        port=port,
        tls=tls,  # type: ignore[arg-type]
        username=unquote(url.username) if url.username else None,
        password=unquote(url.password) if url.password else None,
    )


def parse_resolvers(value: Any) -> tuple[ListenAddress, ...]:
    """DNS servers as "ip" or "ip:port", comma-separated; empty means the system's."""
    if isinstance(value, tuple):
        return value
    items = value.split(",") if isinstance(value, str) else list(value or [])
    servers = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        if item.count(":") == 1 or item.startswith("["):
            parsed = parse_listen(item)
            assert parsed is not None
            servers.append(parsed)
        else:
            servers.append(ListenAddress(item, 53))
    return tuple(servers)


def parse_domains(value: Any) -> frozenset[str]:
    items = value.split(",") if isinstance(value, str) else list(value or [])
    domains = set()
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        try:
            domains.add(normalise_domain(item))
        except AddressError as exc:
            raise ValueError(str(exc)) from None
    return frozenset(domains)


Duration = Annotated[timedelta, NoDecode, BeforeValidator(parse_duration)]


class Settings(BaseSettings):
    """The effective configuration of one gateway instance."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    data_dir: Path = Path("./cgw-data")
    database_url: str = ""
    hostname: str = Field(default_factory=socket.getfqdn)
    submission_listen: Annotated[ListenAddress, NoDecode, BeforeValidator(parse_listen)] = (
        ListenAddress("127.0.0.1", 2587)
    )
    smtps_listen: Annotated[ListenAddress | None, NoDecode, BeforeValidator(parse_listen)] = (
        ListenAddress("127.0.0.1", 2465)
    )
    tls_cert: Path | None = None
    tls_key: Path | None = None
    practice_domains: Annotated[frozenset[str], NoDecode, BeforeValidator(parse_domains)] = (
        frozenset()
    )
    delivery: Annotated[DeliveryTarget, NoDecode, BeforeValidator(parse_delivery)] = DeliveryTarget(
        kind="outbox"
    )
    delivery_ca_file: Path | None = None
    unknown_external: Literal["allow", "quarantine", "bounce"] = "allow"
    denial_mode: Literal["reject", "bounce"] = "reject"
    protect_subject: bool = True
    max_message_size: int = Field(default=26_214_400, gt=0)
    max_recipients: int = Field(default=100, gt=0)
    queue_lifetime: Duration = timedelta(days=5)
    timezone: str = "UTC"
    staff_patient_mail: Literal["refuse", "on-behalf"] = "on-behalf"

    # Operational settings beyond SPEC §2 (documented in README "Settings").
    storage_key: SecretStr | None = None
    audit_key: SecretStr | None = None
    instance_name: str = Field(default_factory=socket.gethostname)
    smtp_idle_timeout: Duration = timedelta(minutes=5)
    smtp_session_timeout: Duration = timedelta(minutes=30)
    max_connections_per_client: int = Field(default=20, gt=0)
    auth_backoff: Duration = timedelta(seconds=1)
    auth_lockout: int = Field(default=10, gt=0)
    retry_backoff: Duration = timedelta(minutes=5)
    retry_backoff_max: Duration = timedelta(seconds=4000)
    delivery_timeout: Duration = timedelta(seconds=60)
    smime_archive_cert: Path | None = None
    smime_signing_cert: Path | None = None
    smime_signing_key: Path | None = None
    dns_resolvers: Annotated[
        tuple[ListenAddress, ...], NoDecode, BeforeValidator(lambda v: parse_resolvers(v))
    ] = ()
    mx_port: int = Field(default=25, gt=0, le=65535)
    quarantine_retention: Duration = timedelta(days=30)
    shutdown_grace: Duration = timedelta(seconds=30)
    spool: Literal["auto", "files", "database"] = "auto"
    claim_lease: Duration = timedelta(minutes=10)
    # Processes of ``cgw serve`` on the same ports (``gateway.workers``): one
    # per core uses the machine; 1 keeps one process.
    workers: int = Field(default=1, ge=1, le=64)

    @field_validator("hostname", "instance_name")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a known time zone (e.g. Europe/Berlin)") from None
        return value

    @field_validator("storage_key", "audit_key")
    @classmethod
    def _key_is_32_bytes(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                raw = base64.b64decode(value.get_secret_value(), validate=True)
            except ValueError:
                raise ValueError("must be base64") from None
            if len(raw) != 32:
                raise ValueError("must be 32 bytes, base64-encoded")
        return value

    @field_validator(
        "tls_cert",
        "tls_key",
        "delivery_ca_file",
        "smime_archive_cert",
        "smime_signing_cert",
        "smime_signing_key",
    )
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {value} does not exist")
        return value

    @model_validator(mode="after")
    def _derived(self) -> Settings:
        data_dir = self.data_dir.expanduser().absolute()
        object.__setattr__(self, "data_dir", data_dir)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{data_dir / 'cgw.db'}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("CGW_TLS_CERT: must be set together with CGW_TLS_KEY")
        if (self.smime_signing_cert is None) != (self.smime_signing_key is None):
            raise ValueError(
                "CGW_SMIME_SIGNING_CERT: must be set together with CGW_SMIME_SIGNING_KEY"
            )
        for name in (
            "queue_lifetime",
            "retry_backoff",
            "retry_backoff_max",
            "delivery_timeout",
            "smtp_idle_timeout",
            "smtp_session_timeout",
            "quarantine_retention",
            "claim_lease",
        ):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: must be longer than 0s")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = config_path()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def policy(self) -> PolicySettings:
        """What ``policies`` needs of these settings."""
        return PolicySettings(
            practice_domains=self.practice_domains,
            zone=self.zone,
            unknown_external=UnknownExternal(self.unknown_external),
            staff_patient_mail=StaffPatientMail(self.staff_patient_mail),
        )

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"


def config_path() -> Path | None:
    explicit = os.environ.get("CGW_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise SettingsError(f"CGW_CONFIG: file {path} does not exist")
        return path
    default = Path("cgw.toml")
    return default if default.is_file() else None


def _refuse_unknown_environment() -> None:
    # pydantic-settings reads CGW_* case-insensitively, so typos are checked so too.
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {"CGW_CONFIG"}
    for name in sorted(os.environ):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
            raise SettingsError(f"invalid setting {name}: unknown setting")


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment and TOML file, or SettingsError in one line."""
    _refuse_unknown_environment()
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = str(error["msg"]).removeprefix("Value error, ")
        if not error["loc"]:  # a check across settings names them in its message
            raise SettingsError(f"invalid setting {message}") from None
        name = ENV_PREFIX + str(error["loc"][0]).upper()
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        raise SettingsError(f"invalid setting {name}: {message}") from None
    except ValueError as exc:  # e.g. a TOML file that does not parse
        raise SettingsError(f"invalid configuration: {exc}") from None


def masked_settings(settings: Settings) -> dict[str, str]:
    """Every effective setting as text, with secrets masked."""
    shown: dict[str, str] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if name == "database_url":
            text = _mask_url_password(value)
        elif name == "delivery":
            text = value.describe()
        elif isinstance(value, SecretStr):
            text = "****"
        elif value is None:
            text = ""
        elif isinstance(value, frozenset):
            text = ",".join(sorted(value))
        elif isinstance(value, timedelta):
            text = format_duration(value)
        elif isinstance(value, tuple):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            text = str(value).lower()
        else:
            text = str(value)
        shown[ENV_PREFIX + name.upper()] = text
    return shown


def _mask_url_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1****@", url)


def format_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
