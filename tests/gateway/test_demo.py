"""``cgw demo``: the tour runs as an admin runs it, whatever the caller's
settings say, tells the whole story, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from gateway.demo import run_demo
from tests.cli import CGW

AUDITED = ("message.accepted", "message.denied", "message.quarantined", "message.delivered")


def _demo(
    tmp_path: Path, *args: str, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CGW_")}
    return subprocess.run(
        [CGW, "demo", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, **(extra or {})},
        cwd=tmp_path,
    )


def _directory(output: str) -> Path:
    found = re.search(r"^Consent Gateway demo, in (.+)$", output, re.MULTILINE)
    assert found, output
    return Path(found.group(1))


def _gateway_port(output: str) -> int:
    found = re.search(r"^  gateway   127\.0\.0\.1:(\d+) ", output, re.MULTILINE)
    assert found, output
    return int(found.group(1))


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_demo_shows_every_outcome_and_removes_its_directory(tmp_path: Path) -> None:
    result = _demo(tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    # Anna: accepted, delivered encrypted, and opened with her key.
    assert "RCPT TO  250 2.1.5 <anna@example.org>" in out
    assert "Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m" in out
    assert "    Subject: Encrypted message" in out
    assert "    Subject: Your blood test results" in out
    assert "| your blood test of Monday is normal; the TSH value is 2.1 mU/l." in out
    # Bob: refused at RCPT with the physician's sentence.
    assert (
        "RCPT TO  550 5.7.1 <bob@example.org>: There is no documented consent from this "
        "patient to e-mail at this address." in out
    )
    # Eve: held, in the quarantine, and Dr Smith was told.
    assert "1 recipient(s) held for review" in out
    assert re.search(r"dr\.smith@praxis\.example\s+eve@example\.org\s+NO_SECURE_CHANNEL", out)
    assert "Subject: Message held for review (not yet delivered)" in out
    # The audit trail, and its chain.
    for action in AUDITED:
        assert re.search(rf"^  \d+\s+{re.escape(action)}\s", out, re.MULTILINE), action
    assert "audit log intact" in out
    assert not _directory(out).exists()
    assert list(tmp_path.iterdir()) == []  # nothing in the working directory either


def test_the_demo_ignores_the_callers_settings_and_keeps_its_directory_when_asked(
    tmp_path: Path,
) -> None:
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    (tmp_path / "cgw.toml").write_text('denial_mode = "bounce"\nno_such_setting = 1\n')
    hostile = {
        "CGW_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/nowhere",
        "CGW_DATA_DIR": str(read_only),
        "CGW_CONFIG": str(tmp_path / "missing.toml"),
        "CGW_DENIAL_MODE": "bounce",
        "CGW_PROTECT_SUBJECT": "false",
        "CGW_SPOOL": "database",
        "CGW_TLS_CERT": "/nonexistent/cert.pem",
        "CGW_SUBMISSION_LISTEN": "not an address",
        "CGW_NO_SUCH_SETTING": "1",
    }

    result = _demo(tmp_path, "--keep", extra=hostile)

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "RCPT TO  550 5.7.1 <bob@example.org>: There is no documented consent" in out
    assert "    Subject: Encrypted message" in out
    assert "audit log intact" in out
    directory = _directory(out)
    try:
        assert f"Kept {directory}" in out
        assert (directory / "data" / "cgw.db").is_file()
        assert (directory / "next-hop" / "anna.eml").is_file()
        assert list(read_only.iterdir()) == []
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _interrupted_demo(tmp_path: Path) -> tuple[int, str, str, str]:
    """``cgw demo``, sent SIGINT once its gateway runs: exit code, what it
    printed before the signal, and the rest of stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CGW_")}
    with subprocess.Popen(
        [CGW, "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    ) as demo:
        assert demo.stdout is not None
        seen = []
        for line in demo.stdout:  # interrupt once the gateway runs
            seen.append(line)
            if line.startswith("  gateway "):
                demo.send_signal(signal.SIGINT)
                break
        out, err = demo.communicate(timeout=30)
    return demo.returncode, "".join(seen), out, err


def test_ctrl_c_stops_the_demo_with_one_line_and_removes_its_directory(tmp_path: Path) -> None:
    # The tour takes about a second: on a loaded machine it can finish
    # before the signal lands, so a few tries are allowed for one to land.
    for _ in range(5):
        code, printed, out, err = _interrupted_demo(tmp_path)
        if code != 0:
            break
        assert err == "", err  # finished first, cleanly
    assert code == 1, printed + out
    assert err == "cgw: error: interrupted; the demo stopped and removed its directory\n"
    assert not _directory(printed).exists()
    assert _refuses_connections(_gateway_port(printed))


async def test_the_tour_stops_everything_and_cleans_up_when_it_fails() -> None:
    lines: list[str] = []

    def out(line: str) -> None:
        lines.append(line)
        if line.startswith("3."):
            raise RuntimeError("the terminal went away")

    with pytest.raises(RuntimeError, match="terminal went away"):
        await run_demo(out)

    printed = "\n".join(lines)
    assert not _directory(printed).exists()
    assert _refuses_connections(_gateway_port(printed))


async def test_a_cancelled_tour_stops_everything_and_cleans_up() -> None:
    lines: list[str] = []
    tour: asyncio.Task[Path] | None = None

    def out(line: str) -> None:
        lines.append(line)
        if line.startswith("  To Bob") and tour is not None:
            tour.cancel()  # in the middle of the SMTP session

    tour = asyncio.create_task(run_demo(out))
    with pytest.raises(asyncio.CancelledError):
        await tour

    printed = "\n".join(lines)
    assert not _directory(printed).exists()
    assert _refuses_connections(_gateway_port(printed))
