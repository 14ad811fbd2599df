"""``CGW_WORKERS``: several ``cgw serve`` processes behind one port, one database.

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


def _children(pid: int, role: str = "--worker") -> list[int]:
    """The child processes of ``pid`` whose command line has ``role``: the
    workers, or (``--writes-fds``) the writer process they share on SQLite."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    children = [int(child) for child in found.stdout.split()]
    return [c for c in children if role in Path(f"/proc/{c}/cmdline").read_text().split("\0")]


def _gone(pid: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not Path(f"/proc/{pid}").exists()


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
        children = _children(serve.process.pid) + _children(serve.process.pid, "--writes-fds")
        for pid in [*children, serve.process.pid]:
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
    writers = _children(serve.process.pid, "--writes-fds")
    # On SQLite one writer process commits for both (``consent_registry.writes``).
    assert len(writers) == (1 if settings.database_url.startswith("sqlite") else 0)
    pids = [serve.process.pid, worker]
    # Each new connection goes to the process with the fewest open (``gateway.spread``).
    opened = [_logged_in(serve.port, cafile) for _ in range(6)]
    owners = [_owner(_server_inode(client, serve.port), pids) for client in opened]
    assert sorted(owners) == sorted(pids * 3), "six connections are not three each"
    served_by = {owner: client for owner, client in zip(owners, opened, strict=True)}

    for pid, client in served_by.items():
        assert client.sendmail(SENDER, [f"colleague@{DOMAIN}"], _message(f"from {pid}")) == {}
    for client in opened:
        client.quit()

    received = sink.wait_for(2)
    subjects = sorted(m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in received)
    assert subjects == sorted(f"from {pid}".encode() for pid in pids)
    assert serve.stop() == 0  # SIGTERM to the first process stops both
    assert not Path(f"/proc/{worker}").exists()
    assert all(_gone(writer) for writer in writers)
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
    writers = _children(serve.process.pid, "--writes-fds")
    serve.kill()
    assert _gone(worker)
    assert "the first cgw serve process is gone: stopping" in "".join(serve.output)
    assert all(_gone(writer) for writer in writers)  # its last connection closed with the worker


def test_a_writer_process_that_dies_stops_the_gateway_with_an_error(
    two_workers: tuple[Settings, ServeProcess, Sink],
) -> None:
    settings, serve, sink = two_workers
    if not settings.database_url.startswith("sqlite"):
        pytest.skip("the workers share a writer process on SQLite only")
    (worker,) = _children(serve.process.pid)
    (writer,) = _children(serve.process.pid, "--writes-fds")
    os.kill(writer, signal.SIGTERM)  # ignored: it ends after the workers, not before
    client = _logged_in(serve.port, settings.tls_dir / "dev-cert.pem")
    assert client.sendmail(SENDER, [f"colleague@{DOMAIN}"], _message("still written")) == {}
    client.quit()
    sink.wait_for(1)
    os.kill(writer, signal.SIGKILL)
    assert serve.process.wait(60) == 1
    serve.stop()
    output = "".join(serve.output)
    assert "cgw: error: stopped: the writer process exited (code -9)\n" in output, output
    assert _gone(worker)
