"""Fixtures shared by the gateway tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from consent_registry.users import add_user
from gateway.settings import Settings
from tests.conftest import DOMAIN, PASSWORD
from tests.practice import Practice, now
from tests.runner import GatewayThread
from tests.sink import Sink


@pytest.fixture
def practice_gateway(
    sink: Sink,
    ca_file: Path,
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
) -> Callable[..., tuple[GatewayThread, Practice]]:
    def start(**overrides: object) -> tuple[GatewayThread, Practice]:
        settings = make_settings(
            delivery=f"smtp://127.0.0.1:{sink.port}",
            delivery_ca_file=ca_file,
            timezone="UTC",
            **overrides,
        )
        running = start_gateway(settings)
        practice = Practice(settings)
        with practice.session() as session:
            for name in ("drjones", "nurse"):
                role = "staff" if name == "nurse" else "clinician"
                add_user(session, name, [f"{name}@{DOMAIN}"], role, PASSWORD, "test", now())
        # Anna: Dr Smith's patient, consented for TLS delivery (the sink offers verified TLS).
        practice.patient("Anna Muster", "anna@example.org", "A-1")
        practice.relate("A-1", "drsmith")
        practice.consent("A-1", "anna@example.org", delivery="tls")
        # Bob: another consented patient of Dr Smith's.
        practice.patient("Bob Beispiel", "bob@example.org", "B-2")
        practice.relate("B-2", "drsmith")
        practice.consent("B-2", "bob@example.org", delivery="tls")
        return running, practice

    return start
