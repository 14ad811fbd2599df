"""``cgw demo``: the gateway's whole story in seconds, in a temporary directory."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click

from gateway import logs
from gateway.cli.output import CliError


@click.command()
@click.option("--keep", is_flag=True, help="Keep the temporary directory and print its path.")
def demo(keep: bool) -> None:
    """A self-contained tour: a practice, the gateway and a next hop, three messages.

    Reads no CGW_* settings and no cgw.toml, and touches nothing outside a
    temporary directory, which it removes at the end (unless --keep).
    """
    from gateway.demo import DemoError, run_demo  # the gateway loads only where it runs

    logs.configure("warning", "text")  # the tour's own output is the story
    try:
        asyncio.run(_until_terminated(run_demo(click.echo, keep=keep)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        left = "; its directory is kept" if keep else " and removed its directory"
        raise CliError(f"interrupted; the demo stopped{left}") from None
    except DemoError as exc:
        raise CliError(f"the demo failed: {exc}") from None
    except Exception as exc:  # whatever broke: one line, exit 1
        first_line = (str(exc).splitlines() or [""])[0]
        raise CliError(f"the demo failed: {type(exc).__name__}: {first_line}") from None


async def _until_terminated(tour: Coroutine[Any, Any, Path]) -> Path:
    """SIGTERM cancels the tour as Ctrl-C does, so it still cleans up."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
    return await tour
