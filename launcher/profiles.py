"""The scale-out profile's processes, built in one place.

`scale_services` returns every long-running process of the scale-out topology (name,
command, environment). `nextbest up --profile scale` runs exactly these on one machine
(launcher/scale.py) and tests/repo/test_deploy.py checks that deploy/compose.yaml runs
the same commands with the same environment variable names, so the compose file cannot
drift from what `up` runs. Only hosts, ports and values differ between the two; they
come in through `Topology`.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from launcher.supervisor import prepare_dagster_home
from nextbest.settings import Settings

CODE_LOCATION = "definitions"

PROFILE_ENV = (
    "NEXTBEST_HOME",
    "NEXTBEST_SPEC",
    "NEXTBEST_KAFKA_BOOTSTRAP",
    "NEXTBEST_KAFKA_TOPIC",
    "NEXTBEST_PARTITIONS",
    "NEXTBEST_ONLINE_URL",
    "NEXTBEST_DELTA_URI",
    "NEXTBEST_LANCE_URI",
    "NEXTBEST_MODELS_URI",
    "NEXTBEST_STORAGE_OPTIONS",
)
"""What every process of the profile reads: the same stores, the same topic."""


@dataclass(frozen=True)
class Topology:
    """Where each process listens and how the others reach it.

    `bind` is the address servers listen on (127.0.0.1 on one machine, 0.0.0.0 in a
    container); `stream_addresses` are the Bytewax cluster's "host:port", one per
    process, in process-id order; `code_host` is how the Dagster webserver and daemon
    reach the code server."""

    bind: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = 2
    stream_addresses: tuple[str, ...] = ("127.0.0.1:2101", "127.0.0.1:2102")
    code_host: str = "127.0.0.1"
    code_port: int = 4000
    dagster_port: int = 3000
    dagster_home: str = "/opt/dagster"


COMPOSE = Topology(
    bind="0.0.0.0",
    stream_addresses=("stream-0:2101", "stream-1:2101"),
    code_host="dagster-code-server",
)
"""deploy/compose.yaml's hosts and ports (one container per service, named as the
service); tests/repo/test_deploy.py builds the profile with it and compares."""


@dataclass(frozen=True)
class Service:
    """One process: `command[0]` is the program (`nextbest`, `dagster`, ...)."""

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str | None = None
    """An HTTP path on `port` that answers once the service serves."""
    port: int | None = None


def profile_env(settings: Settings) -> dict[str, str]:
    """The NEXTBEST_* variables every process of the profile gets (PROFILE_ENV)."""
    if not settings.kafka_bootstrap or not settings.online_url:
        raise ValueError("the scale profile needs kafka_bootstrap and online_url")
    env = {
        "NEXTBEST_HOME": str(settings.home_dir),
        "NEXTBEST_SPEC": str(settings.spec),
        "NEXTBEST_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "NEXTBEST_KAFKA_TOPIC": settings.kafka_topic,
        "NEXTBEST_PARTITIONS": str(settings.partitions),
        "NEXTBEST_ONLINE_URL": settings.online_url,
        "NEXTBEST_DELTA_URI": settings.delta_root,
        "NEXTBEST_LANCE_URI": settings.lance_root,
        "NEXTBEST_MODELS_URI": settings.models_root,
        "NEXTBEST_STORAGE_OPTIONS": json.dumps(settings.storage_options),
    }
    assert tuple(env) == PROFILE_ENV
    return env


def dagster_pg_url(online_url: str) -> str:
    """The Dagster instance's URL: the online store's database, psycopg2 dialect.

    dagster-postgres needs psycopg2 named explicitly (see definitions/dagster.yaml)."""
    return re.sub(r"^[a-z0-9+]+://", "postgresql+psycopg2://", online_url)


def scale_setup(settings: Settings) -> list[Service]:
    """One-shot steps before the services: `nextbest init` (stores, tables, the
    pseudonymization key in the data home)."""
    return [Service("init", ["nextbest", "init"], profile_env(settings))]


def scale_services(
    settings: Settings, topology: Topology, *, dagster_url: str | None = None
) -> list[Service]:
    """Every process of the scale-out topology, in start order.

    Two Bytewax processes (one cluster), the API with `api_workers` server processes,
    a Dagster code server and the webserver and daemon reading from it, all on the
    same Kafka topic, PostgreSQL online store and object-storage roots. Dagster's
    database is `dagster_url`, else the online store's."""
    common = profile_env(settings)
    dagster_env = {
        **common,
        "DAGSTER_HOME": topology.dagster_home,
        "NEXTBEST_DAGSTER_PG_URL": dagster_url or dagster_pg_url(common["NEXTBEST_ONLINE_URL"]),
    }
    cluster = [arg for address in topology.stream_addresses for arg in ("-a", address)]
    streams = [
        Service(f"stream-{i}", ["nextbest", "stream", "-i", str(i), *cluster], dict(common))
        for i in range(len(topology.stream_addresses))
    ]
    api_env = {
        **common,
        "NEXTBEST_API_HOST": topology.bind,
        "NEXTBEST_API_PORT": str(topology.api_port),
    }
    api = Service(
        "api",
        ["nextbest", "api", "--workers", str(topology.api_workers)],
        api_env,
        ready_path="/health",
        port=topology.api_port,
    )
    # A workspace file, not --grpc-host/--grpc-port: it names the location (CODE_LOCATION)
    # so schedules, sensors and runs keep it whatever port the code server has.
    grpc = ["-w", f"{topology.dagster_home}/{WORKSPACE}"]
    code = Service(
        "dagster-code-server",
        ["dagster", "code-server", "start", "-h", topology.bind, "-p", str(topology.code_port),
         "-m", "definitions", "--location-name", CODE_LOCATION],
        dict(dagster_env),
        port=topology.code_port,
    )  # fmt: skip
    web = Service(
        "dagster-webserver",
        ["dagster-webserver", "-h", topology.bind, "-p", str(topology.dagster_port), *grpc],
        dict(dagster_env),
        ready_path="/server_info",
        port=topology.dagster_port,
    )
    daemon = Service("dagster-daemon", ["dagster-daemon", "run", *grpc], dict(dagster_env))
    return [*streams, api, code, web, daemon]


WORKSPACE = "workspace.yaml"


def write_dagster_files(settings: Settings, topology: Topology) -> None:
    """DAGSTER_HOME's dagster.yaml (PostgreSQL) and workspace.yaml (the code server);
    `up --profile scale` writes them at start, deploy/Dockerfile into the image."""
    home = Path(topology.dagster_home)
    write_dagster_yaml(settings, home)
    (home / WORKSPACE).write_text(
        "# written by launcher/profiles.py: the code server of the scale profile\n"
        "load_from:\n"
        "  - grpc_server:\n"
        f"      host: {topology.code_host}\n"
        f"      port: {topology.code_port}\n"
        f"      location_name: {CODE_LOCATION}\n"
    )


def write_dagster_yaml(settings: Settings, dagster_home: Path) -> Path:
    """DAGSTER_HOME/dagster.yaml with the PostgreSQL storage block of the shipped file.

    The shipped dagster.yaml keeps PostgreSQL storage as a commented `BEGIN postgres`
    block; this swaps it in for the SQLite `storage:` section, so the scale profile and
    the Docker image (deploy/Dockerfile calls this) run the same instance settings."""
    shipped = prepare_dagster_home(settings)  # the file shipped in `definitions`
    text = shipped.read_text()
    block = re.search(r"# BEGIN postgres\n(.*?)# END postgres", text, re.S)
    storage = re.search(r"^storage:\n(?:  .*\n)+", text, re.M)
    if block is None or storage is None:
        raise RuntimeError(f"{shipped}: no storage section or PostgreSQL block to swap in")
    postgres = "".join(line[2:] + "\n" for line in block.group(1).splitlines())
    target = dagster_home / "dagster.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text.replace(storage.group(0), postgres, 1))
    return target
