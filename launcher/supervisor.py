"""`nextbest up`: run every component as a child process and keep them running.

Components are separate processes (`nextbest api`, `nextbest stream`, the Dagster
webserver and daemon, optionally the simulator), each in its own process group so a
stop reaches their children too. A component that dies is restarted with backoff; on
Ctrl-C or SIGTERM every group gets SIGTERM, then SIGKILL after a grace period. This
module only launches processes and speaks HTTP: it imports no other layer, and no other
launcher module (`launcher.stack`, the order of `nextbest up`, builds on it, never the
reverse).
"""

import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from nextbest.locks import EXIT_LOCKED
from nextbest.logs import readable
from nextbest.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
GRACE_SECONDS = 15.0
TAIL_LINES = 10
RESTARTS_PER_MINUTE = 5


@dataclass
class Component:
    name: str
    argv: list[str]
    ready_url: str | None = None
    restart: bool = True
    process: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)
    fatal_exits: frozenset[int] = frozenset({EXIT_LOCKED})
    """Exit codes a restart cannot fix (another instance holds the home, broken
    recovery state): the supervisor reports them and gives up at once."""
    env: dict[str, str] | None = None
    """This component's environment; None: the supervisor's (`child_env`)."""


def child_env(settings: Settings) -> dict[str, str]:
    """Every child sees the same absolute home and spec, whatever its cwd."""
    env = dict(os.environ)
    env["NEXTBEST_HOME"] = str(settings.home_dir)
    env["NEXTBEST_SPEC"] = str(settings.spec.resolve())
    env["NEXTBEST_API_PORT"] = str(settings.api_port)
    env["NEXTBEST_DAGSTER_PORT"] = str(settings.dagster_port)
    env["DAGSTER_HOME"] = str(settings.dagster_home)
    if settings.api_key:
        env["NEXTBEST_API_KEY"] = settings.api_key.get_secret_value()
    return env


def nextbest_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher", *args]


def dagster_commands(settings: Settings, *, workspace: Path | None = None) -> list[Component]:
    """Webserver and daemon; with `workspace` (a workspace.yaml naming a running code
    server, `launcher.stack`) they load the code from it instead of each their own."""
    prepare_dagster_home(settings)
    bin_dir = Path(sys.executable).parent
    target = ["-w", str(workspace)] if workspace is not None else ["-m", "definitions"]
    web = [
        str(bin_dir / "dagster-webserver"),
        "-h",
        "127.0.0.1",
        "-p",
        str(settings.dagster_port),
        *target,
    ]
    daemon = [str(bin_dir / "dagster-daemon"), "run", *target]
    url = f"http://127.0.0.1:{settings.dagster_port}/server_info"
    return [Component("dagster-webserver", web, ready_url=url), Component("dagster-daemon", daemon)]


def prepare_dagster_home(settings: Settings) -> Path:
    """DAGSTER_HOME is the data home's dagster/ folder, with the dagster.yaml shipped in
    the `definitions` package (package data, so a wheel install has it). Without it
    Dagster would run on its defaults: no run queue, so no `nextbest/writer` limit of
    one writer run at a time. So a missing or uncopyable file raises, never skips.
    Located with `find_spec`, which does not import the package (nor Dagster)."""
    spec = importlib.util.find_spec("definitions")
    folders = list(spec.submodule_search_locations or []) if spec else []
    sources = [Path(folder) / "dagster.yaml" for folder in folders]
    source = next((s for s in sources if s.is_file()), None)
    target = settings.dagster_home / "dagster.yaml"
    if source is None:
        raise RuntimeError(
            f"dagster.yaml is missing from the nextbest installation (looked in "
            f"{', '.join(map(str, sources)) or 'no definitions package'}); reinstall "
            "nextbest: without it Dagster would drop the one-writer-run limit"
        )
    try:
        settings.dagster_home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    except OSError as exc:
        raise RuntimeError(f"cannot install {source} as {target}: {exc}") from exc
    return target


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.env = child_env(settings)
        self.components: list[Component] = []
        self.stopping = threading.Event()
        self.logs = settings.home_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def start(self, component: Component) -> None:
        log = open(self.logs / f"{component.name}.log", "ab")  # noqa: SIM115 - child owns it
        component.process = subprocess.Popen(
            component.argv,
            env=self.env if component.env is None else component.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        if component not in self.components:
            self.components.append(component)

    def wait_ready(self, component: Component, *, timeout: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping.is_set():
            if component.process is not None and component.process.poll() is not None:
                return False
            if component.ready_url is None:
                return True
            try:
                if httpx.get(component.ready_url, timeout=2).status_code < 500:
                    return True
            except httpx.HTTPError:
                pass
            self.stopping.wait(0.25)
        return False

    def log_tail(self, component: Component, lines: int = TAIL_LINES) -> list[str]:
        """The last lines of a component's log, indented, for a person to read."""
        path = self.logs / f"{component.name}.log"
        try:
            with open(path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 16_384))
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            return []
        return [f"    | {readable(line)}" for line in text.splitlines()[-lines:]]  # JSON logs

    def watch_once(self) -> list[str]:
        """Restart dead components (at most RESTARTS_PER_MINUTE each); returns what
        happened, with the tail of the dead component's log."""
        events = []
        for c in self.components:
            if c.process is None or c.process.poll() is None or not c.restart:
                continue
            code = c.process.returncode
            log = self.logs / f"{c.name}.log"
            now = time.monotonic()
            c.restarts = [t for t in c.restarts if now - t < 60]
            if code in c.fatal_exits:
                c.restart = False
                events.append(
                    f"{c.name} exited with {code} and cannot be restarted; last lines of {log}:"
                )
                events.extend(self.log_tail(c))
                continue
            if len(c.restarts) >= RESTARTS_PER_MINUTE:
                c.restart = False
                events.append(
                    f"{c.name} died {len(c.restarts) + 1} times within a minute "
                    f"(last exit {code}); giving up on it. Last lines of {log}:"
                )
                events.extend(self.log_tail(c))
                continue
            c.restarts.append(now)
            events.append(f"{c.name} exited with {code}; restarting. Last lines of {log}:")
            events.extend(self.log_tail(c))
            self.start(c)
        return events

    def gave_up(self) -> list[Component]:
        """Components that are dead for good."""
        return [
            c
            for c in self.components
            if not c.restart and c.process is not None and c.process.poll() is not None
        ]

    def stop(self) -> None:
        self.stopping.set()
        for c in reversed(self.components):
            _signal_group(c.process, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        for c in self.components:
            if c.process is None:
                continue
            try:
                c.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(c.process, signal.SIGKILL)
                c.process.wait()
        for c in self.components:  # grandchildren left in a group
            _signal_group(c.process, signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child: get SIGTERM if `up` itself dies, even by SIGKILL (Linux prctl), so
    no component outlives its supervisor."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the normal stop path still applies
        pass


_PR_SET_PDEATHSIG = 1


def _signal_group(process: subprocess.Popen[bytes] | None, sig: int) -> None:
    if process is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def run_step(settings: Settings, *args: str) -> None:
    """A one-shot `nextbest` command; a failure stops `up` with its output."""
    result = subprocess.run(
        nextbest_argv(*args), env=child_env(settings), cwd=ROOT, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"nextbest {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    if result.stdout.strip():
        print(result.stdout.rstrip())


def status(settings: Settings) -> dict[str, object]:
    out = subprocess.run(
        nextbest_argv("status", "--json"),
        env=child_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else {}


def run_foreground(settings: Settings, components: Sequence[Component]) -> int:
    """Run components until Ctrl-C/SIGTERM (used by `nextbest dagster`)."""
    sup = Supervisor(settings)
    install_signals(sup)
    for c in components:
        sup.start(c)
    try:
        while not sup.stopping.wait(1.0):
            for line in sup.watch_once():
                print(line, flush=True)
    finally:
        sup.stop()
    return 0


def install_signals(sup: Supervisor) -> None:
    """SIGTERM and Ctrl-C set `sup.stopping`; the caller's loop then stops every group."""

    def handler(signum: int, frame: object) -> None:
        sup.stopping.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
