"""``cgw queue list`` and ``cgw queue retry``, against a running gateway."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from pathlib import Path

from gateway.settings import Settings
from tests.cli import cgw_env, in_process
from tests.conftest import DOMAIN, PASSWORD
from tests.gateway.test_durability import _recipients, _wait
from tests.runner import GatewayThread
from tests.sink import Sink

SENDER = f"dr.smith@{DOMAIN}"


def test_list_shows_a_deferred_message_and_retry_delivers_it_now(
    make_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], GatewayThread],
    ca_file: Path,
    sink_tls: ssl.SSLContext,
) -> None:
    hop = Sink(sink_tls, data_replies=["451 4.3.0 busy, try later"]).start()
    try:
        # The next retry would be an hour away: only 'cgw queue retry' brings it forward.
        settings = make_settings(
            delivery=f"smtp://127.0.0.1:{hop.port}",
            delivery_ca_file=ca_file,
            retry_backoff="1h",
            retry_backoff_max="2h",
        )
        running = start_gateway(settings)
        client = running.logged_in("drsmith", PASSWORD)
        client.sendmail(SENDER, [f"team@{DOMAIN}"], f"From: {SENDER}\r\n\r\nrota\r\n".encode())
        client.quit()
        _wait(lambda: _recipients(settings)[0].state == "deferred", "the deferral")
        cgw = in_process(
            cgw_env(CGW_DATA_DIR=str(settings.data_dir), CGW_DATABASE_URL=settings.database_url)
        )

        (row,) = json.loads(cgw("queue", "list", "--json").stdout)
        assert (row["recipient"], row["state"], row["attempts"]) == (
            f"team@{DOMAIN}",
            "deferred",
            1,
        )
        assert row["last_error"] == "451 4.3.0 busy, try later"
        assert "rota" not in json.dumps(row)  # never the body
        table = cgw("queue", "list").stdout
        assert table.splitlines()[0].split()[:3] == ["ID", "RECEIVED", "FROM"]
        missing = cgw("queue", "retry", "NOSUCHID")
        assert missing.returncode == 1
        assert missing.stderr.strip() == (
            "cgw: error: no deferred recipients of message 'NOSUCHID' in the queue"
        )
        retried = cgw("queue", "retry", row["message_id"])
        assert retried.returncode == 0, retried.stderr
        assert retried.stdout.startswith(f"1 recipients of {row['message_id']} are due now")
        (received,) = hop.wait_for(1)
        assert received.rcpt_tos == (f"team@{DOMAIN}",)
        _wait(lambda: cgw("queue", "list").stdout.strip() == "the queue is empty", "an empty queue")
    finally:
        hop.stop()
