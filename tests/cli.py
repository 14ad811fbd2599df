"""``cgw`` for the tests, in the test process or as the real executable.

Most CLI tests are about what a command does and says, which is the same in
either. Starting the executable costs about a second per call (the
interpreter and imports), and the CLI tests make a few hundred calls, so
they run the command tree in-process with the same arguments, environment,
working directory, stdin and exit code. The tests of the admin's own path
(``--help``, ``cgw init``, a usage error, ``cgw demo``, ``cgw serve``) still
start the executable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from click.testing import CliRunner

from gateway.cli.main import cli

CGW = str(Path(sys.executable).with_name("cgw"))
Run = Callable[..., subprocess.CompletedProcess[str]]


def cgw_env(**settings: str) -> dict[str, str]:
    """The caller's environment without its CGW_* settings, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CGW_")}
    env.update(settings)
    return env


@contextmanager
def _process_state(env: dict[str, str], cwd: Path | None) -> Iterator[None]:
    """The environment and working directory a subprocess would have had, restored after."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def in_process(env: dict[str, str], cwd: Path | None = None) -> Run:
    """``cgw`` in this process; an unexpected exception goes to stderr with exit 1, as in Python."""

    def run(
        *args: str, stdin: str = "", extra: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        with _process_state({**env, **(extra or {})}, cwd):
            result = CliRunner().invoke(cli, list(args), input=stdin, prog_name="cgw")
        stderr = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            stderr += "".join(traceback.format_exception(result.exception))
        return subprocess.CompletedProcess([CGW, *args], result.exit_code, result.stdout, stderr)

    return run


def as_process(env: dict[str, str], cwd: Path | None = None) -> Run:
    """``cgw`` as the executable, the way an admin runs it."""

    def run(
        *args: str, stdin: str = "", extra: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CGW, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, **(extra or {})},
            cwd=cwd,
        )

    return run
