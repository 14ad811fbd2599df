"""``CGW_WORKERS``: several ``cgw serve`` processes on one port, one database.

Each test runs the real command and finds out which process serves a
connection from /proc (the process holding the server end of the socket).
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.app import initialise
from gateway.settings import Settings
from tests.conftest import DOMAIN, create_user
from tests.gateway.test_durability import SENDER, ServeProcess
from tests.gateway.test_shutdown import _logged_in
from tests.sink import Sink

Env = Callable[..., dict[str, str]]


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(child) for child in found.stdout.split()]


def _server_inode(client: smtplib.SMTP, port: int) -> str:
    """The inode of the gateway's end of ``client``'s connection (from /proc/net/tcp)."""
    client_port = client.sock.getsockname()[1]
    wanted_local, wanted_remote = f":{port:04X}", f":{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(wanted_local) and fields[2].endswith(wanted_remote):
            return fields[9]
    raise AssertionError(f"no server socket for client port {client_port}")


def _owner(inode: str, pids: list[int]) -> int:
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except FileNotFoundError:
                continue
    raise AssertionError(f"no process holds socket {inode}")


def _message(subject: str) -> bytes:
    return (
        f"From: {SENDER}\r\nTo: colleague@{DOMAIN}\r\nSubject: {subject}\r\n\r\nhello\r\n"
    ).encode()


@pytest.fixture
def two_workers(
    make_settings: Callable[..., Settings], serve_env: Env, sink_tls: ssl.SSLContext
) -> Iterator[tuple[Settings, ServeProcess, Sink]]:
    settings = make_settings()
    initialise(settings)
    create_user(settings, "drsmith", [SENDER])
    sink = Sink(sink_tls).start()
    env = serve_env(settings, f"smtp://127.0.0.1:{sink.port}")
    env.update(CGW_WORKERS="2", CGW_MAX_CONNECTIONS_PER_CLIENT="100")
    serve = ServeProcess(env)
    try:
        yield settings, serve, sink
    finally:
        for pid in [*_children(serve.process.pid), serve.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        serve.process.wait(30)
        sink.stop()


def test_both_workers_serve_the_port_and_each_message_is_delivered_once(
    two_workers: tuple[Settings, ServeProcess, Sink],
) -> None:
    settings, serve, sink = two_workers
    cafile = settings.tls_dir / "dev-cert.pem"
    (worker,) = _children(serve.process.pid)
    pids = [serve.process.pid, worker]
    served_by: dict[int, smtplib.SMTP] = {}
    opened = []
    for _ in range(40):  # the kernel spreads connections by a hash of the client's port
        client = _logged_in(serve.port, cafile)
        opened.append(client)
        served_by.setdefault(_owner(_server_inode(client, serve.port), pids), client)
        if len(served_by) == 2:
            break
    assert sorted(served_by) == sorted(pids), "one process served all 40 connections"

    for pid, client in served_by.items():
        assert client.sendmail(SENDER, [f"colleague@{DOMAIN}"], _message(f"from {pid}")) == {}
    for client in opened:
        client.quit()

    received = sink.wait_for(2)
    subjects = sorted(m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in received)
    assert subjects == sorted(f"from {pid}".encode() for pid in pids)
    assert serve.stop() == 0  # SIGTERM to the first process stops both
    assert not Path(f"/proc/{worker}").exists()
    time.sleep(0.5)
    assert len(sink.received) == 2  # and nothing was sent twice


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGKILL, -9), (signal.SIGTERM, 0)])
def test_a_worker_that_exits_unasked_stops_the_gateway_with_an_error(
    two_workers: tuple[Settings, ServeProcess, Sink], signum: int, code: int
) -> None:
    # Killed, or stopped on its own: either way a service manager with
    # Restart=on-failure must see a failure and restart the gateway whole.
    _, serve, _ = two_workers
    (worker,) = _children(serve.process.pid)
    os.kill(worker, signum)
    assert serve.process.wait(60) == 1
    serve.stop()
    output = "".join(serve.output)
    assert f"cgw: error: stopped: worker 2 exited (code {code})\n" in output, output


def test_a_worker_whose_first_process_was_killed_stops_by_itself(
    two_workers: tuple[Settings, ServeProcess, Sink],
) -> None:
    _, serve, _ = two_workers
    (worker,) = _children(serve.process.pid)
    serve.kill()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{worker}").exists()
    assert "the first cgw serve process is gone: stopping" in "".join(serve.output)
