"""The container image's entry point works, run as the image runs it, in a clean virtualenv.

No Docker engine is needed. The test reads the Dockerfile, copies what its
builder stage copies (honouring .dockerignore) into a build context of its
own, installs that into a new virtualenv with pip (dependencies included, from
the package index), then runs ENTRYPOINT + CMD with the runtime stage's ENV
and WORKDIR, as the user who runs the tests rather than uid 10001. Only what
cannot work here is replaced: the data directory (a temporary one) and the
listen addresses (free ports on 127.0.0.1 instead of 0.0.0.0:587 and :465);
the virtualenv's path takes the place of the image's. It waits for the
gateway's banner, runs the HEALTHCHECK command (exit 0), stops the gateway
with the STOPSIGNAL (exit 0 within 30 s), and runs the health check again
(exit 1 now, one line on stderr).

It is skipped only when no virtualenv can be made, or pip cannot install
because the package index is unreachable; any other failure fails it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest

from tests.runner import free_port

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BANNER = "Consent Gateway is running."
STOP_WITHIN = 30.0  # seconds from the stop signal to the exit
# python:3.11-slim's PATH, what the image's ENV PATH=...:$PATH extends
BASE_IMAGE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
START_WITHIN = 90.0  # seconds from the start to the banner (migrations, a dev certificate)


# --- reading a Dockerfile --------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"the Dockerfile's stage {self.name or self.base} has no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages and their instructions; comments dropped, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # a comment, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending.strip(), "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
            continue
        assert stages, f"{keyword} before the first FROM"
        stages[-1].instructions.append(Instruction(keyword, args))
    assert stages, "the Dockerfile has no FROM"
    return stages


def exec_form(args: str, what: str) -> list[str]:
    """A JSON array of strings (exec form: no shell, signals reach the process)."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        value = None
    assert isinstance(value, list) and value and all(isinstance(v, str) for v in value), (
        f"{what} must be in exec form (a JSON array of strings), not {args!r}"
    )
    return value


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(value: str, env: dict[str, str]) -> str:
    return _VARIABLE.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


def stage_env(stage: Stage, base: dict[str, str]) -> dict[str, str]:
    """The stage's ENV, each instruction expanded against the values before it."""
    env = dict(base)
    for instruction in stage.all("ENV"):
        words = shlex.split(instruction.args)
        if "=" in words[0]:
            pairs = [w.split("=", 1) for w in words]
        else:  # the legacy form: ENV KEY value with spaces
            pairs = [[words[0], " ".join(words[1:])]]
        before = dict(env)
        for key, value in pairs:
            env[key] = expand(value, before)
    return env


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK's options (--timeout=10s, ...) and its command."""
    match = re.fullmatch(r"((?:--[\w-]+=\S+\s+)*)CMD\s+(.+)", stage.last("HEALTHCHECK").args)
    assert match, "HEALTHCHECK must be 'HEALTHCHECK [--option=value ...] CMD [...]'"
    options = dict(o[2:].split("=", 1) for o in match.group(1).split())
    return options, exec_form(match.group(2), "HEALTHCHECK CMD")


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert match, f"not a Dockerfile duration: {duration!r}"
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]


# --- .dockerignore ------------------------------------------------------------------


def ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, pattern) per line, in order: the last match decides."""
    patterns: list[tuple[bool, re.Pattern[str]]] = []
    if not DOCKERIGNORE.exists():
        return patterns
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = str(PurePosixPath(line.lstrip("!").strip().lstrip("/")))
        patterns.append((not negated, re.compile(_glob_regex(line))))
    return patterns


def _glob_regex(glob: str) -> str:
    """Docker's matching: * and ? within one path element, ** across elements."""
    out, i = "", 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif glob.startswith("**", i):
            out, i = out + ".*", i + 2
        elif glob[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif glob[i] == "?":
            out, i = out + "[^/]", i + 1
        elif glob[i] == "[" and "]" in glob[i:]:
            end = glob.index("]", i)
            out, i = out + glob[i : end + 1], end + 1
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return out


def ignored(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether a context path is left out: it or one of its parent folders matches."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for exclude, pattern in patterns:
        if any(pattern.fullmatch(c) for c in candidates):
            result = exclude
    return result


# --- the build, without Docker ------------------------------------------------------


def copy_like_builder(builder: Stage, root: Path) -> Path:
    """Carry out the builder stage's COPY lines from the repository into ``root``
    (the builder's file system); return its WORKDIR there."""
    patterns = ignore_patterns()
    workdir = PurePosixPath("/")
    for instruction in builder.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = workdir / instruction.args
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(instruction.args)
        assert not any(w.startswith("--") for w in words), f"unsupported: {instruction.args}"
        *sources, dest = words
        target = root / (workdir / dest).relative_to("/")
        as_folder = dest.endswith("/") or len(sources) > 1
        for source in sources:
            relative = str(PurePosixPath(source))
            origin = REPO / relative
            assert origin.exists(), f"COPY {source}: not in the build context"
            assert not ignored(relative, patterns), f"COPY {source}: excluded by .dockerignore"
            if origin.is_dir():
                for path in sorted(origin.rglob("*")):
                    inner = path.relative_to(REPO).as_posix()
                    if path.is_file() and not ignored(inner, patterns):
                        place = target / path.relative_to(origin)
                        place.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(path, place)
            else:
                place = target / origin.name if as_folder else target
                place.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, place)
    return root / workdir.relative_to("/")


def _index_address() -> tuple[str, int]:
    index = os.environ.get("PIP_INDEX_URL", "")
    if not index:
        config = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
            capture_output=True,
            text=True,
            check=False,
        )
        index = config.stdout.strip() if config.returncode == 0 else ""
    url = urlsplit(index or "https://pypi.org/simple")
    return url.hostname or "pypi.org", url.port or (443 if url.scheme == "https" else 80)


def _index_unreachable() -> str | None:
    host, port = _index_address()
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as exc:
        return f"the package index {host}:{port} is unreachable ({exc})"
    return None


def clean_virtualenv(where: Path, project: Path) -> Path:
    """A new virtualenv with the project and its dependencies really installed."""
    made = subprocess.run(
        [sys.executable, "-m", "venv", str(where)], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"cannot create a virtualenv here: {made.stderr.strip()[-500:]}")
    host_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CGW_"))}
    installed = subprocess.run(
        [str(where / "bin" / "pip"), "install", "--timeout", "60", str(project)],
        capture_output=True,
        text=True,
        env=host_env,
        check=False,
        timeout=600,
    )
    if installed.returncode != 0:
        unreachable = _index_unreachable()
        if unreachable:
            pytest.skip(f"pip cannot install the project: {unreachable}")
        pytest.fail(f"pip install failed:\n{installed.stdout[-3000:]}\n{installed.stderr[-3000:]}")
    return where


def json_object(line: str) -> dict[str, object] | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def announces_start(line: str) -> bool:
    """The banner line, as text or (with --log-format json) as a log record's message."""
    record = json_object(line)
    return line == BANNER or (record is not None and record.get("message") == BANNER)


class Output:
    """A child's stdout or stderr, read as it comes, without ever blocking it."""

    def __init__(self, stream: Iterator[str]) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: Iterator[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


# --- the test -----------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_the_images_entry_point_runs_from_a_clean_virtualenv(tmp_path: Path) -> None:
    took: dict[str, float] = {}
    clock = time.monotonic()
    stages = parse_dockerfile(DOCKERFILE.read_text())
    runtime = stages[-1]
    image_env = stage_env(runtime, {"PATH": BASE_IMAGE_PATH})

    # What the image declares, before anything runs.
    user = runtime.last("USER").args.split(":")[0]
    assert user not in ("", "root", "0"), f"the image runs as root (USER {user})"
    data_dir = image_env.get("CGW_DATA_DIR")
    assert data_dir, "the image sets no CGW_DATA_DIR"
    volumes = [
        v
        for i in runtime.all("VOLUME")
        for v in (json.loads(i.args) if i.args.startswith("[") else i.args.split())
    ]
    assert data_dir in volumes, f"CGW_DATA_DIR {data_dir} is not a VOLUME ({volumes})"
    exposed = {p.split("/")[0] for i in runtime.all("EXPOSE") for p in i.args.split()}
    assert {"587", "465"} <= exposed, f"EXPOSE {sorted(exposed)}: 587 and 465 expected"
    assert image_env.get("CGW_SUBMISSION_LISTEN", "").endswith(":587")
    assert image_env.get("CGW_SMTPS_LISTEN", "").endswith(":465")
    assert image_env.get("PYTHONUNBUFFERED") == "1", "logs would wait in a buffer"
    entrypoint = exec_form(runtime.last("ENTRYPOINT").args, "ENTRYPOINT")
    command = exec_form(runtime.last("CMD").args, "CMD")
    health_options, health_command = healthcheck(runtime)
    stop_signal = runtime.last("STOPSIGNAL").args if runtime.all("STOPSIGNAL") else "SIGTERM"
    workdir = runtime.last("WORKDIR").args

    # The venv the runtime stage copies from the builder, and that builder.
    copied = [shlex.split(i.args) for i in runtime.all("COPY") if i.args.startswith("--from=")]
    assert len(copied) == 1, "expected one COPY --from=<builder> of the virtualenv"
    builder_name, image_venv, image_venv_target = (
        copied[0][0].removeprefix("--from="),
        copied[0][1],
        copied[0][2],
    )
    assert image_venv == image_venv_target, "a virtualenv only works at the path it was made at"
    builder = next(s for s in stages if s.name == builder_name)

    # Build: the builder's COPY lines, then a real pip install into a new venv.
    project = copy_like_builder(builder, tmp_path / "builder")
    venv = clean_virtualenv(tmp_path / "venv", project)
    took["venv + pip install"] = time.monotonic() - clock
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import gateway; print(gateway.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
        check=False,
    )
    assert where.returncode == 0, f"the installed venv cannot import gateway: {where.stderr}"
    assert Path(where.stdout.strip()).is_relative_to(venv), f"gateway from {where.stdout}"

    # The container's environment: the image's ENV with only these overrides.
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    submission, smtps = free_port(), free_port()
    env = {
        name: value.replace(f"{image_venv}/bin", str(venv / "bin"))
        for name, value in image_env.items()
    }
    assert str(venv / "bin") in env["PATH"].split(":"), "the image's PATH lacks its venv"
    env.update(
        HOME=str(tmp_path / "home"),
        LANG="C.UTF-8",
        CGW_DATA_DIR=str(data),
        CGW_SUBMISSION_LISTEN=f"127.0.0.1:{submission}",
        CGW_SMTPS_LISTEN=f"127.0.0.1:{smtps}",
    )
    cwd = data if workdir == data_dir else tmp_path
    program = shutil.which(entrypoint[0], path=env["PATH"])
    assert program and Path(program).is_relative_to(venv), f"{entrypoint[0]} is {program}"

    clock = time.monotonic()
    gateway = subprocess.Popen(
        entrypoint + command,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert gateway.stdout is not None and gateway.stderr is not None
    stdout, stderr = Output(gateway.stdout), Output(gateway.stderr)
    try:
        deadline = time.monotonic() + START_WITHIN
        while not any(announces_start(line) for line in stdout.lines):
            assert gateway.poll() is None, (
                f"{shlex.join(entrypoint + command)} exited with {gateway.returncode}:\n"
                f"{stdout.text}\n{stderr.text}"
            )
            assert time.monotonic() < deadline, f"no {BANNER!r} within {START_WITHIN}s"
            time.sleep(0.05)
        took["start to banner"] = time.monotonic() - clock

        clock = time.monotonic()
        healthy = subprocess.run(
            health_command,
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=max(seconds(health_options.get("timeout", "30s")), 30),
            check=False,
        )
        took["health check"] = time.monotonic() - clock
        assert healthy.returncode == 0, (
            f"HEALTHCHECK {shlex.join(health_command)} exited {healthy.returncode}: "
            f"{healthy.stdout}{healthy.stderr}"
        )
        assert gateway.poll() is None, "the gateway stopped during the health check"

        clock = time.monotonic()
        gateway.send_signal(signal.Signals[stop_signal])
        code = gateway.wait(timeout=STOP_WITHIN)
        took["stop signal to exit"] = time.monotonic() - clock
        assert code == 0, f"exit {code} after {stop_signal}:\n{stdout.text}\n{stderr.text}"
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
    stdout.thread.join(5)
    stderr.thread.join(5)

    # With the gateway gone, the health check must say so: exit 1, one line.
    clock = time.monotonic()
    down = subprocess.run(
        health_command, env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    took["health check, gateway down"] = time.monotonic() - clock
    assert down.returncode == 1, f"HEALTHCHECK with no gateway: exit {down.returncode}"
    assert len(down.stderr.strip().splitlines()) == 1, f"not one line: {down.stderr!r}"

    # With --log-format json every line the gateway writes is one JSON object.
    pairs = itertools.pairwise(command)
    if "--log-format=json" in command or ("--log-format", "json") in pairs:
        for line in filter(None, stdout.lines + stderr.lines):
            assert json_object(line) is not None, f"a log line that is not JSON: {line!r}"

    print("timings:", ", ".join(f"{step} {spent:.1f}s" for step, spent in took.items()))
