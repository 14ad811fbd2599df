"""New connections go to the process serving the fewest (``gateway.spread``):
real listening sockets and socket pairs, the workers' side in this process."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from gateway.app import bind_listeners
from gateway.settings import ListenAddress
from gateway.spread import ConnectionSpread, HandedConnections, connection_pair


@dataclass
class Served:
    """What one process was handed: the connections, and how to end each."""

    connections: list[tuple[socket.socket, Callable[[], None]]] = field(default_factory=list)

    def __call__(self, connection: socket.socket, ended: Callable[[], None]) -> None:
        self.connections.append((connection, ended))

    def end(self, count: int) -> None:
        for connection, ended in self.connections[:count]:
            connection.close()
            ended()
        del self.connections[:count]


@dataclass
class Rig:
    spread: ConnectionSpread
    port: int
    here: Served
    workers: list[Served]
    ends: list[socket.socket]  # the workers' ends of their pairs
    clients: list[socket.socket] = field(default_factory=list)

    async def connect(self, count: int) -> None:
        """``count`` clients, once each connection is served somewhere."""
        before = self.served()
        for _ in range(count):
            client = socket.create_connection(("127.0.0.1", self.port))
            self.clients.append(client)
        await until(lambda: self.served() == before + count)

    def served(self) -> int:
        return len(self.here.connections) + sum(len(w.connections) for w in self.workers)

    def counts(self) -> list[int]:
        return [len(self.here.connections)] + [len(w.connections) for w in self.workers]


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Let the event loop run until ``condition`` holds (the spread reads on readiness)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true"
        await asyncio.sleep(0.001)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    spread = ConnectionSpread()
    (listener,) = bind_listeners(ListenAddress("127.0.0.1", 0))
    here = Served()
    spread.listen(listener, here)
    workers, ends, handed = [], [], []
    for _ in range(2):
        ours, theirs = connection_pair()
        served = Served()
        workers.append(served)
        ends.append(theirs)
        handed.append(HandedConnections(theirs, [served]))
        spread.add_worker(ours)
    rig = Rig(spread, listener.getsockname()[1], here, workers, ends)
    yield rig
    for side in handed:
        side.close()
    spread.close()
    for client in rig.clients:
        client.close()
    for served in [here, *workers]:
        served.end(len(served.connections))


async def test_each_connection_goes_to_the_process_with_the_fewest(rig: Rig) -> None:
    await rig.connect(6)
    assert rig.counts() == [2, 2, 2]
    assert rig.spread.open_connections() == [2, 2, 2]

    rig.workers[0].end(2)  # the first worker's two sessions end
    await until(lambda: rig.spread.open_connections() == [2, 0, 2])
    await rig.connect(2)
    assert rig.counts() == [2, 2, 2], "the two new connections went to the emptied worker"


async def test_a_handed_connection_is_the_clients_own(rig: Rig) -> None:
    await rig.connect(2)
    connection, _ = rig.workers[0].connections[0]
    rig.clients[1].sendall(b"EHLO client\r\n")
    connection.settimeout(10)
    assert connection.recv(100) == b"EHLO client\r\n"
    connection.sendall(b"250 ok\r\n")
    rig.clients[1].settimeout(10)
    assert rig.clients[1].recv(100) == b"250 ok\r\n"


async def test_a_worker_that_is_gone_is_handed_nothing_more(rig: Rig) -> None:
    rig.ends[1].close()  # the second worker died
    await until(lambda: rig.spread.open_connections()[2] == -1)
    await rig.connect(4)
    assert rig.counts() == [2, 2, 0]


async def test_a_connection_for_a_listener_a_worker_lacks_is_closed_and_not_counted() -> None:
    """Settings that differ between processes (they should not): the worker
    closes what it cannot serve and says so, and the count stays true."""
    spread = ConnectionSpread()
    first = bind_listeners(ListenAddress("127.0.0.1", 0))
    here = Served()
    spread.listen(first[0], here)
    second = bind_listeners(ListenAddress("127.0.0.1", 0))
    spread.listen(second[0], here)
    ours, theirs = connection_pair()
    worker = Served()
    handed = HandedConnections(theirs, [worker])  # the first listener only
    spread.add_worker(ours)
    clients = []
    try:
        clients.append(socket.create_connection(("127.0.0.1", first[0].getsockname()[1])))
        await until(lambda: len(here.connections) == 1)
        clients.append(socket.create_connection(("127.0.0.1", second[0].getsockname()[1])))
        clients[1].setblocking(False)
        loop = asyncio.get_running_loop()
        # Handed to the worker (it had the fewest), which closed it...
        assert await asyncio.wait_for(loop.sock_recv(clients[1], 10), 10) == b""
        assert worker.connections == []
        await until(lambda: spread.open_connections() == [1, 0])  # ... and said so
    finally:
        handed.close()
        spread.close()
        for client in clients:
            client.close()
        here.end(len(here.connections))
