"""The order of `nextbest up`: stores, a local key, stream and API, the demo history on
first run (through the API, so the stream builds online state from it), the first
training, then Dagster and the optional simulator, and a live status line."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from pydantic import SecretStr

from launcher.supervisor import (
    ROOT,
    Component,
    Supervisor,
    child_env,
    dagster_commands,
    install_signals,
    nextbest_argv,
    run_step,
    status,
)
from nextbest.client import read_jsonl, send_events
from nextbest.locks import EXIT_LOCKED, AlreadyRunning, InstanceLock, running
from nextbest.settings import Settings
from nextbest.spec.models import Spec

_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)$")


def ensure_local_key(settings: Settings) -> str:
    """One admin key per data home, kept in `api_key` (mode 0600) and printed."""
    path = settings.home_dir / "api_key"
    if path.exists():
        return path.read_text().strip()
    out = subprocess.run(
        nextbest_argv("keys", "create", "--scope", "ingest,decide,admin"),
        env=child_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    key = out.stdout.strip().splitlines()[-1]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


CODE_LOCATION = "definitions"
"""The code location's name, as `-m definitions` named it: runs, schedules and sensor
states recorded before the code server keep pointing at the same location."""


def dagster_components(settings: Settings) -> tuple[list[Component], int]:
    """A persistent Dagster code server, then the webserver and daemon reading from it.

    Why: with `-m definitions` each of them manages its own code server, and the
    daemon replaces its one every 60 s (`dagster._daemon.controller`,
    RELOAD_WORKSPACE_INTERVAL), importing the whole code location again: about half a
    core while everything is idle. From a `grpc_server` workspace entry the daemon
    only asks the running server for its snapshot (same server id: nothing reloads).
    The port is a free loopback port picked now and written to the workspace.yaml in
    DAGSTER_HOME (the code server keeps it across restarts by the supervisor).
    Returns [code server, webserver, daemon] and the code server's port.
    """
    port = free_port()
    workspace = write_workspace(settings, port)
    bin_dir = Path(sys.executable).parent
    code = Component(
        "dagster-code-server",
        [
            str(bin_dir / "dagster"),
            "code-server",
            "start",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-m",
            "definitions",
            "--location-name",
            CODE_LOCATION,
        ],
    )
    return [code, *dagster_commands(settings, workspace=workspace)], port


def write_workspace(settings: Settings, port: int) -> Path:
    """DAGSTER_HOME/workspace.yaml: the one code location, served on `port`."""
    path = settings.dagster_home / "workspace.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# written by `nextbest up` (launcher/stack.py): the code server it runs\n"
        "load_from:\n"
        "  - grpc_server:\n"
        "      host: 127.0.0.1\n"
        f"      port: {port}\n"
        f"      location_name: {CODE_LOCATION}\n"
    )
    return path


def wait_code_server(
    sup: Supervisor, component: Component, port: int, *, timeout_s: float = 180.0
) -> bool:
    """Until the code server answers gRPC health checks (it serves only once the code
    location has loaded); False when it exits, or on timeout or stop."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not sup.stopping.is_set():
        if component.process is not None and component.process.poll() is not None:
            return False
        if grpc_serving(port):
            return True
        sup.stopping.wait(0.5)
    return False


def grpc_serving(port: int, *, timeout_s: float = 2.0) -> bool:
    """The standard gRPC health check Dagster's servers answer (service DagsterApi)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(  # pyright: ignore[reportAttributeAccessIssue] (generated stub)
                health_pb2.HealthCheckRequest(service="DagsterApi"), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_demo(settings: Settings, sup: Supervisor) -> None:
    """First run: the demo shop's catalog into Delta, its history through the API."""
    demo = settings.home_dir / "demo"
    run_step(settings, "demo", "--out", str(demo), "--size", "small")
    run_step(settings, "import", "items", str(demo / "items.jsonl"))
    report = send_events(settings, read_jsonl(demo / "events.jsonl"), rate=5000, batch_size=200)
    print(f"demo history: {report.line()}", flush=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not sup.stopping.is_set():
        if int(str(status(settings).get("delta_events") or 0)) >= report.accepted:
            break
        sup.stopping.wait(1.0)
    print("training the first model (nextbest materialize) ...", flush=True)
    run_step(settings, "materialize")
    (settings.home_dir / ".demo_loaded").write_text("ok\n")


def scrape(url: str) -> dict[str, float]:
    """Sum Prometheus samples by metric name (labels folded)."""
    totals: dict[str, float] = {}
    try:
        text = httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return totals
    for line in text.splitlines():
        match = _METRIC.match(line.strip())
        if match:
            totals[match.group(1)] = totals.get(match.group(1), 0.0) + float(match.group(3))
    return totals


def status_line(previous: dict[str, float], current: dict[str, float], seconds: float) -> str:
    """events/s, decisions/s and event-to-online freshness over the last interval."""

    def delta(name: str) -> float:
        return max(0.0, current.get(name, 0.0) - previous.get(name, 0.0))

    lag_n = delta("nextbest_event_to_online_lag_seconds_count")
    lag = delta("nextbest_event_to_online_lag_seconds_sum")
    fresh = f"{1000 * lag / lag_n:6.0f} ms" if lag_n else "     n/a"
    span = max(seconds, 1e-9)
    return (
        f"events/s {delta('nextbest_events_accepted_total') / span:7.1f} | "
        f"decisions/s {delta('nextbest_decisions_total') / span:7.1f} | freshness {fresh}"
    )


RECOVERY_BROKEN = 3
"""`nextbest stream`'s exit code for recovery state it cannot resume (pipelines.run)."""


def take_home(settings: Settings) -> list[InstanceLock] | None:
    """The `up` and `dagster` locks of the home, after checking nothing else of this
    home runs (a lone `nextbest api` or `stream` included); None after saying who does."""
    home = settings.home_dir
    locks: list[InstanceLock] = []
    try:
        locks.append(InstanceLock(home, "up").acquire())
        others = running(home)
        others.pop("up", None)
        if others:
            for role, held in others.items():
                print(
                    f"nextbest {role} is already running on {home} ({held.describe()})",
                    flush=True,
                )
            print("stop it first, or use another data home (--home / NEXTBEST_HOME)", flush=True)
            raise _Taken
        locks.append(InstanceLock(home, "dagster").acquire())
    except AlreadyRunning as exc:
        print(exc, flush=True)
    except _Taken:
        pass
    else:
        return locks
    for lock in locks:
        lock.release()
    return None


class _Taken(Exception):
    pass


def bring_up(settings: Settings, spec: Spec, *, simulate: bool, rate: float) -> int:
    locks = take_home(settings)
    if locks is None:
        return EXIT_LOCKED
    try:
        return _bring_up(settings, spec, simulate=simulate, rate=rate)
    finally:
        for lock in locks:
            lock.release()


def _bring_up(settings: Settings, spec: Spec, *, simulate: bool, rate: float) -> int:
    sup = Supervisor(settings)
    install_signals(sup)
    print(f"nextbest up: spec {spec.name}, data home {settings.home_dir}", flush=True)
    try:
        run_step(settings, "init")
        key = ensure_local_key(settings)
        settings = settings.model_copy(update={"api_key": SecretStr(key)})
        sup.settings = settings
        sup.env = child_env(settings)
        stream = Component(
            "stream",
            nextbest_argv("stream"),
            fatal_exits=frozenset({EXIT_LOCKED, RECOVERY_BROKEN}),
        )
        api_argv = nextbest_argv("api", "--workers", str(settings.api_workers))
        api = Component("api", api_argv, ready_url=f"{settings.api_url}/health")
        sup.start(stream)
        sup.start(api)
        if not sup.wait_ready(api):
            print(f"the API did not start; last lines of {sup.logs / 'api.log'}:", flush=True)
            print("\n".join(sup.log_tail(api)), flush=True)
            return 1
        if not (settings.home_dir / ".demo_loaded").exists():
            load_demo(settings, sup)
        (code, web, daemon), port = dagster_components(settings)
        sup.start(code)
        if not wait_code_server(sup, code, port):
            print(
                f"the Dagster code server is not serving; see {sup.logs / f'{code.name}.log'}",
                flush=True,
            )
        for component in (web, daemon):
            sup.start(component)
        sup.wait_ready(web)
        if simulate:
            sup.start(Component("simulator", nextbest_argv("simulate", "--rate", str(rate))))
        _banner(settings, key, sup.logs)
        # On a terminal one line is redrawn in place; in a log, one line every 10 s.
        tty = sys.stdout.isatty()
        interval = 2.0 if tty else 10.0
        previous, last = scrape(f"{settings.api_url}/metrics"), time.monotonic()
        while not sup.stopping.wait(interval):
            for line in sup.watch_once():
                print(("\n" if tty else "") + line, flush=True)
            dead = [c.name for c in sup.gave_up() if c.name in ("api", "stream")]
            if dead:
                print(
                    f"nextbest up: {' and '.join(dead)} cannot run (see above); stopping",
                    flush=True,
                )
                return 1
            current, now = scrape(f"{settings.api_url}/metrics"), time.monotonic()
            line = status_line(previous, current, now - last)
            print(f"\r{line}" if tty else line, end="" if tty else "\n", flush=True)
            previous, last = current, now
    except RuntimeError as exc:
        print(exc, flush=True)
        return 1
    finally:
        sup.stop()
        print("nextbest up: every component stopped", flush=True)
    return 0


def _banner(settings: Settings, key: str, logs: Path) -> None:
    api = settings.api_url
    print(
        "\n".join(
            [
                "",
                f"  API          {api}   (docs: {api}/docs)",
                f"  Dagster UI   http://127.0.0.1:{settings.dagster_port}",
                f"  metrics      {api}/metrics",
                f"  API key      {key}   (also in {settings.home_dir / 'api_key'})",
                f"  logs         {logs}",
                "  stop with Ctrl-C",
                "",
            ]
        ),
        flush=True,
    )
