"""The scale-out profile's processes for tests: `nextbest api --workers N` and a Bytewax
cluster of `nextbest stream -i I -a ... -a ...` processes, all on one data home with the
settings passed through the environment (as an operator would), plus a PostgreSQL
database of their own (the session's `pg_url` is shared with other tests' rows)."""

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

import httpx

from tests.support.common import ROOT, free_port


def child_env(settings_env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without the developer's NEXTBEST_/BYTEWAX_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXTBEST_", "BYTEWAX_"))}
    return {**env, "PYTHONPATH": str(ROOT), **settings_env}


def nextbest(env: Mapping[str, str], *args: str, log: Path) -> subprocess.Popen[bytes]:
    """`nextbest <args>` (as `python -m launcher`) in its own process group, output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "launcher", *args],
            cwd=ROOT,
            env=dict(env),
            stdout=out,
            stderr=out,
            start_new_session=True,  # its own group: uvicorn's workers go down with it
        )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal the process group, then kill it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def start_cluster(env: Mapping[str, str], logs: Path, n: int = 2) -> list[subprocess.Popen[bytes]]:
    """`nextbest stream -i I -a A0 -a A1 ...` for I in 0..n-1, on fresh loopback ports."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(n)]
    cluster = [a for addr in addresses for a in ("-a", addr)]
    return [
        nextbest(env, "stream", "-i", str(i), *cluster, log=logs / f"stream{i}.log")
        for i in range(n)
    ]


def api_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    """The API answers /health (asserting its process did not exit)."""
    assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class DurableTansu:
    """Tansu keeping its topics in an S3 bucket (SeaweedFS), so it can be SIGKILLed and
    restarted on the same port with nothing lost -- the in-memory broker of
    tests/support/broker.py forgets every topic when it stops."""

    def __init__(self, binary: Path, s3_endpoint: str, bucket: str, credentials: dict[str, str],
                 log: Path) -> None:  # fmt: skip
        self.binary, self.log, self.port = binary, log, free_port()
        self.env = child_env({}) | {
            "AWS_ENDPOINT": s3_endpoint,
            "AWS_ACCESS_KEY_ID": credentials["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": credentials["secret_access_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }
        self.storage = f"s3://{bucket}/tansu-{uuid.uuid4().hex[:8]}/"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        from confluent_kafka.admin import AdminClient

        url = f"tcp://{self.bootstrap}"
        argv = [str(self.binary), "broker", "--listener-url", url]
        argv += ["--advertised-listener-url", url, "--storage-engine", self.storage]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=out)
        admin = AdminClient({"bootstrap.servers": self.bootstrap})

        def answers() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            with contextlib.suppress(Exception):
                admin.list_topics(timeout=0.5)
                return True
            return False

        from tests.support.waiting import wait_until

        wait_until(answers, timeout=30, what="tansu answering")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
