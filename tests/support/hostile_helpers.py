"""The hostile-input suite's parts (issue 12, item 5): the live stack it drives (API over
HTTP, `python -m pipelines` on the same data home), a client that counts every answer,
the named hostile cases of the issue, and the barrier that tells the stream caught up.

Kept apart from `tests/e2e/test_hostile.py` so the cases read as a list and the test reads
as the proof: no 5xx, the stream alive, online == batch, erasure leaves nothing.
"""

import contextlib
import json
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from nextbest.settings import Settings
from serving.app import create_app
from serving.keys import create_key
from storage.delta.store import DeltaStore
from storage.eventlog.log import EventLog, partition_for
from tests.serving.test_serving_world import (
    LiveServer,
    World,
    build_world,
    start_server,
    stop_server,
)
from tests.support.hostile_cases import dumps
from tests.support.stream_helpers import start_stream

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Answer:
    method: str
    path: str
    status: int
    sent: str  # what was sent, shortened: the reproduction of a 5xx
    said: str = ""  # what a 5xx answered (its body, shortened): why


@dataclass
class Tally:
    """Every request the suite sends and what came back."""

    answers: list[Answer] = field(default_factory=list)
    acknowledged: set[str] = field(default_factory=set)  # event ids answered with 202

    def record(self, method: str, path: str, status: int, sent: Any, said: str = "") -> None:
        text = sent if isinstance(sent, str) else repr(sent)
        self.answers.append(Answer(method, path, status, text[:300], said[:300]))

    @property
    def tried(self) -> int:
        return len(self.answers)

    @property
    def rejected(self) -> int:
        return sum(400 <= a.status < 500 for a in self.answers)

    @property
    def server_errors(self) -> list[Answer]:
        return [a for a in self.answers if a.status >= 500]


class Api:
    """httpx over the live server with the suite's key; every call lands in the tally."""

    def __init__(self, url: str, key: str, tally: Tally) -> None:
        self.url, self.key, self.tally = url, key, tally
        self.http = httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": key})

    def send(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        raw: bytes | None = None,
        key: str | None = None,
    ) -> httpx.Response:
        headers = {b"content-type": b"application/json"}
        if key is not None:  # raw bytes on the wire, as a hostile client sends them
            headers[b"x-api-key"] = key.encode("latin-1")
        content = raw if raw is not None else None if body is None else dumps(body)
        r = self.http.request(method, path, content=content, headers=headers)
        shown = body if raw is None else raw[:300]
        self.tally.record(
            method, path, r.status_code, shown, r.text if r.status_code >= 500 else ""
        )
        if method == "POST" and path == "/v1/events" and r.status_code == 202:
            self.tally.acknowledged.update(r.json()["event_ids"])
        return r

    def close(self) -> None:
        self.http.close()


@dataclass
class Stack:
    settings: Settings
    world: World
    server: LiveServer
    stream: subprocess.Popen[bytes]
    api: Api
    key_id: str

    @property
    def app(self) -> Any:
        return self.server.server.config.app

    def stream_log(self) -> str:
        path = self.settings.home_dir / "logs" / "stream.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def append_raw(self, records: Sequence[tuple[str, bytes]]) -> None:
        """Records a producer wrote straight to the log, past the API's validation."""
        self.app.state.runtime.sink.append(list(records))


@contextlib.contextmanager
def live_stack(home: Path) -> Iterator[Stack]:
    """A served world (catalog, promoted model) with keys on, the API over HTTP
    (uvicorn) and the stream process on the same data home. No per-key rate limit and a
    generous failed-authentication budget: the suite sends thousands of requests from
    one address, and a 429 there would hide what the door says (test_door covers both)."""
    settings = Settings(
        home=home,
        spec=ROOT / "nextbest.yaml",
        _env_file=None,  # type: ignore[call-arg]
        auth_failures_per_min=1e6,
    )
    world = build_world(settings)
    key = create_key(world.store, ["admin"])
    server = start_server(create_app(settings, rate_limit_per_s=None, refresh_interval_s=0.2))
    stream = start_stream(settings)
    api = Api(server.url, key, Tally())
    try:
        yield Stack(settings, world, server, stream, api, key.split("_")[1])
    finally:
        stream.kill()
        stream.wait(timeout=20)
        api.close()
        stop_server(server)
        world.store.dispose()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()


def canaries(tag: str, partitions: int) -> list[str]:
    """One user id per log partition: a canary applied on each proves every partition
    was read past everything sent before it."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < partitions:
        user = f"canary-{tag}-{n}"
        found.setdefault(partition_for(user, partitions), user)
        n += 1
    return [found[p] for p in range(partitions)]


def fresh_tag() -> str:
    return uuid.uuid4().hex[:10]


def logged_event_ids(settings: Settings) -> set[str]:
    """Event ids of every record in the embedded log (read beside the API's writer)."""
    ids = set()
    with EventLog.open(settings.eventlog_dir, partitions=settings.partitions, mode="reader") as log:
        for p in range(settings.partitions):
            for _, _, payload in log.read(p, 0, max_records=1_000_000):
                with contextlib.suppress(ValueError, AttributeError, RecursionError):
                    ids.add(json.loads(payload).get("event_id"))
    return ids - {None}


def dead_letter_count(settings: Settings) -> int:
    delta = DeltaStore.from_settings(settings)
    return delta.count("dead_letters") if delta.exists("dead_letters") else 0
