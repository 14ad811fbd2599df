"""Several ``cgw serve`` processes on one set of listening sockets (``CGW_WORKERS``).

Why: one Python process computes on one core at a time (the GIL), and the
gateway is CPU-bound (TLS, parsing, S/MIME, SQL). The first process binds
the ports and starts ``workers - 1`` more, which bind the same ports with
SO_REUSEPORT; the kernel spreads new connections over them by a hash of
the client's address and port. Each process is a whole gateway instance (intake, delivery,
retention sweep) under its own instance name (``<name>.2``, ``<name>.3``...),
and they share the database and the spool as several instances on several
machines do: SQLite writers take turns (``consent_registry.db.WriterTurn``),
PostgreSQL claims skip each other's locked rows.

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
    # Over ``lifeline`` once it said it is ready: kept, because a stream that
    # is dropped closes its socket, which tells the worker this process is gone.
    stream: asyncio.StreamWriter | None = None


def worker_command(
    index: int, ports: Sequence[int], lifeline_fd: int, options: Sequence[str]
) -> list[str]:
    """The command line of worker ``index`` (2, 3...): ``cgw serve`` in worker mode,
    with the first process's ``options`` (log level and format)."""
    return [
        sys.executable,
        "-m",
        "gateway.cli.main",
        "serve",
        "--worker",
        str(index),
        "--ports",
        ",".join(str(port) for port in ports),
        "--lifeline-fd",
        str(lifeline_fd),
        *options,
    ]


class Workers:
    """The other worker processes of a running first process."""

    def __init__(
        self, count: int, ports: Sequence[int], options: Sequence[str], stop_seconds: float
    ) -> None:
        self.count = count
        self.stop_seconds = stop_seconds  # a worker's own stop: grace, then its stages
        self.ports = ports
        self.options = options
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
        try:
            process = await asyncio.create_subprocess_exec(
                *worker_command(index, self.ports, theirs.fileno(), self.options),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return _Worker(index, process, ours)

    async def _ready(self, worker: _Worker) -> None:
        reader, worker.stream = await asyncio.open_connection(sock=worker.lifeline)
        line = await reader.readline()
        if line != b"ready\n":
            code = await worker.process.wait()
            raise WorkerFailed(f"worker {worker.index} did not start (exit code {code})")

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
