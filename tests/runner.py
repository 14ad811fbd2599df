"""Run a real Gateway on its own event loop in a thread, and talk to it."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import threading
from pathlib import Path

from gateway.app import Gateway
from gateway.cli.serve import new_event_loop
from gateway.settings import Settings


def free_port() -> int:
    """A port nothing listens on now (for a process that binds it itself, or for none)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class GatewayThread:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.gateway = Gateway(settings)
        self.loop = new_event_loop()  # cgw serve's
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> GatewayThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.gateway.start(), self.loop).result(60)
        return self

    def stop(self) -> None:
        """Stop the gateway; a test may stop it early, the fixture again at teardown."""
        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.gateway.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def wake(self) -> None:
        """Tell the gateway that work was queued elsewhere (say, by a CLI release)."""
        self.loop.call_soon_threadsafe(self.gateway.wake)

    def port(self, implicit: bool = False) -> int:
        label = "implicit TLS" if implicit else "STARTTLS"
        for listener in self.gateway.listeners:
            if label in listener.label:
                return listener.address.port
        raise LookupError(label)

    @property
    def cafile(self) -> Path:
        return self.settings.tls_dir / "dev-cert.pem"

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cafile))

    def smtp(self, timeout: float = 30) -> smtplib.SMTP:
        """A client that has done EHLO and STARTTLS, not yet AUTH."""
        client = smtplib.SMTP("127.0.0.1", self.port(), timeout=timeout)
        client.starttls(context=self.client_context())
        client.ehlo("client.test")
        return client

    def logged_in(self, login: str, password: str) -> smtplib.SMTP:
        client = self.smtp()
        client.login(login, password)
        return client

    def raw(self, timeout: float = 30, starttls: bool = True) -> RawClient:
        return RawClient(self, timeout, starttls)


class RawClient:
    """Bytes on a socket, for protocol abuse tests: on TLS after STARTTLS, or
    (``starttls=False``) still in the clear after EHLO, for tests that do
    STARTTLS their own way."""

    def __init__(self, gateway: GatewayThread, timeout: float, starttls: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", gateway.port()), timeout=timeout)
        self.buffer = b""
        self.expect("220")
        self.send(b"EHLO raw.test\r\n")
        self.expect("250 ")
        if starttls:
            self.send(b"STARTTLS\r\n")
            self.expect("220")
            self.sock = gateway.client_context().wrap_socket(self.sock, server_hostname="127.0.0.1")
            self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> str:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffer {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line.decode()

    def reply(self) -> str:
        """One whole (possibly multi-line) reply; returns its last line."""
        while True:
            line = self.line()
            if line[3:4] != "-":
                return line

    def expect(self, prefix: str) -> str:
        reply = self.reply()
        assert reply.startswith(prefix), reply
        return reply

    def login(self, username: str, password: str) -> None:
        import base64

        token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
        self.send(f"EHLO raw.test\r\nAUTH PLAIN {token}\r\n".encode())
        self.expect("250 ")
        self.expect("235 2.7.0")

    def close(self) -> None:
        self.sock.close()
