"""Several ``cgw serve`` processes on one set of listening sockets (``CGW_WORKERS``).

Why: one Python process computes on one core at a time (the GIL), and the
gateway is CPU-bound (TLS, parsing, S/MIME, SQL). The first process binds
the ports and starts ``workers - 1`` more; it accepts every connection and
hands each to the process serving the fewest (``gateway.spread``), over a
socket pair per worker. Each process is a whole gateway instance (intake, delivery,
retention sweep) under its own instance name (``<name>.2``, ``<name>.3``...),
and they share the database and the spool as several instances on several
machines do. On SQLite one more process, the writer (``WriterProcess``),
commits every worker's transactions, several under one commit
(``consent_registry.writes``); on PostgreSQL each worker commits its own,
and claims skip each other's locked rows.

Lifetimes, as Postfix's master runs its daemons:

- the first process tells the others to stop (SIGTERM) when it stops;
- a worker whose first process is gone (killed) sees its lifeline (a socket
  pair) close and stops by itself, finishing what it has in flight;
- a worker that exits (dies, or is stopped on its own) is not replaced: the
  first process stops them all and exits with an error, so that the service
  manager restarts the gateway whole (a half-running gateway would look
  healthy to ``cgw status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.spread import ConnectionSpread, connection_pair

log = logging.getLogger(__name__)

# How long a worker may take from its start to serving (it migrates nothing:
# the first process did; it loads keys and opens the database).
READY_SECONDS = 60.0


class WorkerFailed(RuntimeError):
    """A worker did not start, or exited while the gateway ran."""


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    lifeline: socket.socket  # this process's end; the worker holds the other
    connections: socket.socket  # this process's end of the pair that hands it connections
    joined: bool = False  # ``connections`` belongs to the spread (which closes it) once ready
    # Over ``lifeline`` once it said it is ready: kept, because a stream that
    # is dropped closes its socket, which tells the worker this process is gone.
    stream: asyncio.StreamWriter | None = None


def worker_command(
    index: int,
    connections_fd: int,
    lifeline_fd: int,
    options: Sequence[str],
    writes_fd: int | None = None,
) -> list[str]:
    """The command line of worker ``index`` (2, 3...): ``cgw serve`` in worker mode,
    with the first process's ``options`` (log level and format)."""
    writes = ["--writes-fd", str(writes_fd)] if writes_fd is not None else []
    return [
        *_serve_command(options),
        "--worker",
        str(index),
        "--connections-fd",
        str(connections_fd),
        "--lifeline-fd",
        str(lifeline_fd),
        *writes,
    ]


def _serve_command(options: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "gateway.cli.main", "serve", *options]


class Workers:
    """The other worker processes of a running first process."""

    def __init__(
        self,
        count: int,
        spread: ConnectionSpread,
        options: Sequence[str],
        stop_seconds: float,
        writes: Sequence[socket.socket] = (),
    ) -> None:
        """``spread``: the first process's listeners, which each worker joins once
        it is ready. ``writes``: a connection to the writer process for each
        worker, if one runs."""
        self.count = count
        self.stop_seconds = stop_seconds  # a worker's own stop: grace, then its stages
        self.spread = spread
        self.options = options
        self.writes = list(writes)
        self._workers: list[_Worker] = []

    async def start(self) -> None:
        """Start workers 2..count and wait until each serves; stop them all if one fails."""
        try:
            for index in range(2, self.count + 1):
                self._workers.append(await self._spawn(index))
            readiness = [asyncio.ensure_future(self._ready(w)) for w in self._workers]
            try:
                async with asyncio.timeout(READY_SECONDS):
                    for ready in asyncio.as_completed(readiness):
                        await ready
            except TimeoutError:
                raise WorkerFailed(f"a worker did not start in {READY_SECONDS:.0f} s") from None
            finally:
                for ready in readiness:
                    ready.cancel()
        except BaseException:
            await self.stop()
            raise

    async def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair()
        connections, handed = connection_pair()
        # Handed to the worker, and closed here: the writer process ends
        # when every worker's connection is closed.
        writes = self.writes.pop(0) if self.writes else None
        passed = [theirs, handed] + ([writes] if writes is not None else [])
        try:
            command = worker_command(
                index,
                handed.fileno(),
                theirs.fileno(),
                self.options,
                writes.fileno() if writes is not None else None,
            )
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=[s.fileno() for s in passed],
            )
        except BaseException:
            ours.close()
            connections.close()
            raise
        finally:
            for fd_holder in passed:
                fd_holder.close()
        return _Worker(index, process, ours, connections)

    async def _ready(self, worker: _Worker) -> None:
        reader, worker.stream = await asyncio.open_connection(sock=worker.lifeline)
        line = await reader.readline()
        if line != b"ready\n":
            code = await worker.process.wait()
            raise WorkerFailed(f"worker {worker.index} did not start (exit code {code})")
        self.spread.add_worker(worker.connections)
        worker.joined = True

    async def exited(self) -> str:
        """Returns (a sentence) when a worker exits: it was not asked to."""
        waits = {asyncio.ensure_future(w.process.wait()): w for w in self._workers}
        if not waits:
            await asyncio.Event().wait()  # none to exit: wait for ever (until cancelled)
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        worker = waits[next(iter(done))]
        return f"worker {worker.index} exited (code {worker.process.returncode})"

    async def stop(self) -> None:
        """SIGTERM to every worker; wait for them all (killed after ``stop_seconds``)."""
        for unused in self.writes:  # of workers that were never started
            unused.close()
        self.writes.clear()
        for worker in self._workers:
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        await asyncio.gather(*(self._stopped(worker) for worker in self._workers))

    async def _stopped(self, worker: _Worker) -> None:
        try:
            await asyncio.wait_for(worker.process.wait(), self.stop_seconds)
        except TimeoutError:
            log.error("worker %d did not stop in %.0f s: killed", worker.index, self.stop_seconds)
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            await worker.process.wait()
        if worker.stream is not None:
            worker.stream.close()
        worker.lifeline.close()
        if not worker.joined:
            worker.connections.close()


class WriterProcess:
    """The one writer of a machine's workers on SQLite (``consent_registry.writes``).

    It ignores SIGINT and SIGTERM and ends when the last connection to it
    closes: after every worker, so that nothing they commit on their way
    out is refused. A connection per process: ``connections[0]`` for the
    first process, the rest for the workers (handed over by ``Workers``).
    """

    def __init__(self, process: asyncio.subprocess.Process, connections: list[socket.socket]):
        self.process = process
        self.connections = connections

    @classmethod
    async def start(cls, count: int, options: Sequence[str]) -> WriterProcess:
        pairs = [socket.socketpair() for _ in range(count)]
        theirs = [pair[1] for pair in pairs]
        fds = ",".join(str(s.fileno()) for s in theirs)
        try:
            process = await asyncio.create_subprocess_exec(
                *_serve_command(options),
                "--writes-fds",
                fds,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=[s.fileno() for s in theirs],
            )
        except BaseException:
            for ours, _ in pairs:
                ours.close()
            raise
        finally:
            for handed in theirs:
                handed.close()
        return cls(process, [pair[0] for pair in pairs])

    async def exited(self) -> str:
        """Returns (a sentence) when the writer process exits."""
        code = await self.process.wait()
        return f"the writer process exited (code {code})"

    async def stop(self, seconds: float) -> None:
        """Wait for it to end (every connection closed by now); killed after ``seconds``."""
        for connection in self.connections:
            connection.close()
        try:
            await asyncio.wait_for(self.process.wait(), seconds)
        except TimeoutError:
            log.error("the writer process did not stop in %.0f s: killed", seconds)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


async def announce_ready(fd: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Tell the first process this worker serves, over the lifeline ``fd``.

    The reader's ``read()`` returns (b"") when the first process is gone:
    the worker then stops as on SIGTERM. Keep the writer: dropping it
    closes the lifeline.
    """
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    writer.write(b"ready\n")
    await writer.drain()
    return reader, writer
