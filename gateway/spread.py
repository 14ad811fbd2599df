"""New SMTP connections spread over the worker processes, the least busy first.

Why not SO_REUSEPORT, where every worker binds the port: the kernel then
picks a process by a hash of the client's address and port, blind to how
many sessions each already serves. Mail clients, and the benchmark's load
generator, keep a connection open for many messages; ten connections hashed
onto two workers put seven or more on one of them about one time in three,
and that worker then queues work while the other core idles (measured: 524
against 618 S/MIME messages/s, and more CPU per message).

So the first process alone listens. ``ConnectionSpread`` accepts each new
connection and hands it to the process with the fewest open connections,
itself included: over a socket pair to a worker (the descriptor passed with
SCM_RIGHTS, one datagram per connection, the listener's number as its one
octet), or to its own listener's ``serve``. A worker's ``HandedConnections``
serves what arrives and sends one octet back whenever one of those
connections ends, which is how the first process keeps count. Nothing about
a session crosses: the worker runs it whole, from the greeting on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

# Serves one accepted connection; ``ended`` is called once when it is over.
Serve = Callable[[socket.socket, Callable[[], None]], None]

# Connections accepted per readiness of a listener, as asyncio's own server does.
ACCEPT_BATCH = 100
# After EMFILE, ENFILE, ENOBUFS or ENOMEM: let descriptors and memory free up.
ACCEPT_PAUSE_SECONDS = 1.0
_ENDED = b"-"


def connection_pair() -> tuple[socket.socket, socket.socket]:
    """The pair over which the first process hands connections to one worker
    (datagrams: a descriptor never travels with another's octet)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class ConnectionSpread:
    """The first process's listeners, and who serves how many connections."""

    def __init__(self) -> None:
        self._serve: list[Serve] = []
        self._listeners: list[socket.socket] = []
        self._workers: list[socket.socket] = []
        # Open connections: [0] this process, [i] the worker on _workers[i - 1].
        self._open = [0]
        self._closed = False

    def listen(self, listener: socket.socket, serve: Serve) -> None:
        """Accept on ``listener`` (bound, listening) from now on; this process serves
        its share with ``serve``, the workers theirs on their listener of the same
        number (listeners are opened in the same order everywhere)."""
        number = len(self._listeners)
        listener.setblocking(False)
        self._listeners.append(listener)
        self._serve.append(serve)
        asyncio.get_running_loop().add_reader(listener, self._accept, number)

    def add_worker(self, connection: socket.socket) -> None:
        """A worker that is ready: it takes its share of new connections from now on."""
        connection.setblocking(False)
        self._workers.append(connection)
        self._open.append(0)
        asyncio.get_running_loop().add_reader(connection, self._ended, len(self._workers))

    def open_connections(self) -> list[int]:
        """Open connections by process, this one first (a worker that is gone: -1)."""
        return list(self._open)

    def close(self) -> None:
        """Stop accepting; close the listeners. Connections already handed over stay."""
        self._closed = True
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            loop.remove_reader(listener)
            listener.close()
        for worker in self._workers:
            if worker.fileno() != -1:
                loop.remove_reader(worker)
                worker.close()

    def _accept(self, number: int) -> None:
        listener = self._listeners[number]
        for _ in range(ACCEPT_BATCH):
            try:
                connection, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors or memory: pause, as asyncio does
                log.error("cannot accept connections (%s): pausing for a second", exc)
                loop = asyncio.get_running_loop()
                loop.remove_reader(listener)
                loop.call_later(ACCEPT_PAUSE_SECONDS, self._resume, number)
                return
            self._hand(number, connection)

    def _resume(self, number: int) -> None:
        if not self._closed:
            asyncio.get_running_loop().add_reader(self._listeners[number], self._accept, number)

    def _hand(self, number: int, connection: socket.socket) -> None:
        serving = [n for n in self._open if n >= 0]
        target = self._open.index(min(serving))
        self._open[target] += 1
        if target:
            try:
                socket.send_fds(self._workers[target - 1], [bytes([number])], [connection.fileno()])
            except OSError:  # its pair is full, or it is gone: serve the connection here
                self._open[target] -= 1
                self._open[0] += 1
                target = 0
            else:
                connection.close()  # the worker holds its own descriptor now
                return
        self._serve[number](connection, self._ended_here)

    def _ended_here(self) -> None:
        self._open[0] -= 1

    def _ended(self, index: int) -> None:
        worker = self._workers[index - 1]
        try:
            while data := worker.recv(64):
                self._open[index] -= len(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        # The worker is gone (it closed its end): hand it nothing more. The
        # first process stops the gateway when a worker exits (``Workers``).
        asyncio.get_running_loop().remove_reader(worker)
        worker.close()
        self._open[index] = -1


class HandedConnections:
    """A worker's side of ``ConnectionSpread``: serve each connection handed
    over, on the listener of its number; say when each one ends."""

    def __init__(self, connection: socket.socket, serve: Sequence[Serve]) -> None:
        self._connection = connection
        self._serve = list(serve)
        connection.setblocking(False)
        asyncio.get_running_loop().add_reader(connection, self._receive)

    def close(self) -> None:
        """Take no more connections; those being served stay."""
        if self._connection.fileno() != -1:
            asyncio.get_running_loop().remove_reader(self._connection)
            self._connection.close()

    def _receive(self) -> None:
        while True:
            try:
                numbers, fds, _, _ = socket.recv_fds(self._connection, 1, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                numbers, fds = b"", []
            if not numbers:  # the first process is gone: its lifeline stops this worker
                for fd in fds:
                    socket.socket(fileno=fd).close()
                self.close()
                return
            for fd in fds:
                connection = socket.socket(fileno=fd)
                if numbers[0] < len(self._serve):
                    self._serve[numbers[0]](connection, self._ended)
                else:  # a listener this worker does not have: settings differ
                    log.error("a connection for listener %d, which this worker lacks", numbers[0])
                    connection.close()
                    self._ended()

    def _ended(self) -> None:
        # A datagram of one octet on a pair that is read all the time: it
        # does not block; if the first process is gone, nobody counts.
        with contextlib.suppress(OSError):
            self._connection.send(_ENDED)
