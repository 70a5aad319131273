"""Erasure end to end: the API (in process) and the stream (`python -m pipelines`, with
recovery) erase one user from every store, and no file under the data home keeps a
byte of them afterwards; old Delta and LanceDB versions no longer yield them."""

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from nextbest.demo import DemoConfig
from nextbest.settings import Settings
from nextbest.spec_loader import load_spec
from serving.app import create_app
from storage.delta import DeltaStore
from storage.online import OnlineStore
from storage.vectors import VectorStore
from tests.stream_helpers import write_catalog
from tests.test_serving_world import train_and_promote
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
TAG = uuid.uuid4().hex[:10]
USER = f"canary-user-{TAG}"
ANON = f"canary-anon-{TAG}"
PROP = f"canary-ref-{TAG}"
OTHER = f"other-user-{TAG}"
CANARIES = [USER.encode(), ANON.encode(), PROP.encode()]
STORES = (
    "online",
    "cached_decisions",
    "eventlog",
    "lance_users",
    "stream_state",
    "delta_events",
    "delta_decisions",
    "delta_feedback",
)


def _stream(settings: Settings) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXTBEST_", "BYTEWAX_"))}
    env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-m", "pipelines", "--home", str(settings.home_dir)]
    argv += ["--spec", str(settings.spec), "--epoch-ms", "200"]
    logs = settings.home_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stream.log", "ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=out)


@pytest.fixture
def stack(settings: Settings) -> Iterator[tuple[TestClient[Any], subprocess.Popen[bytes]]]:
    spec = load_spec(settings.spec)
    cfg = DemoConfig.small()
    write_catalog(settings, spec, cfg, vectors=True)
    store = OnlineStore.from_settings(settings)
    train_and_promote(settings, spec, store, cfg)
    store.dispose()
    app = create_app(settings, require_keys=False, rate_limit_per_s=None, refresh_interval_s=0.2)
    with TestClient(app) as client:
        proc = _stream(settings)
        try:
            yield client, proc
        finally:
            proc.kill()
            proc.wait(timeout=20)


def _events(user: str, *, anon: str | None, items: list[str]) -> list[dict[str, Any]]:
    ts = int(time.time()) - 60
    out: list[dict[str, Any]] = []
    if anon is not None:
        base = {"anonymous_id": anon, "context": {"session_id": f"s-{anon}"}}
        out.append({"type": "view", "item_id": items[0], "ts": ts, **base})
        out.append({"type": "identify", "user_id": user, "ts": ts + 1, **base})
    for n, item in enumerate(items[1:]):
        out.append(
            {
                "type": "view",
                "user_id": user,
                "item_id": item,
                "ts": ts + 2 + n,
                "context": {"session_id": f"s-{user}"},
                "properties": {"referrer": PROP if user == USER else "search"},
            }
        )
    for n, e in enumerate(out):
        e["event_id"] = f"{user}-e{n}" if user != USER else f"ev-{TAG}-{n}"
    return out


def _rows(delta: DeltaStore, table: str, user: str, version: int | None = None) -> int:
    if not delta.exists(table):
        return 0
    return delta.read(table, version=version, filters=[("user_id", "=", user)]).num_rows


def _old_rows(delta: DeltaStore, table: str, version: int) -> int:
    """The canary's rows at an old version; reading vacuumed files fails, which is 0."""
    try:
        return _rows(delta, table, USER, version=version)
    except OSError:  # FileNotFoundError / delta-rs "Generic LocalFileSystem error"
        return 0


def _scan(home: Path) -> list[str]:
    hits = []
    for path in sorted(home.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path.relative_to(home)}: {c.decode()}" for c in CANARIES if c in data]
    return hits


def test_erasure_leaves_no_trace_in_any_file(
    settings: Settings, stack: tuple[TestClient[Any], subprocess.Popen[bytes]]
) -> None:
    client, proc = stack
    spec = load_spec(settings.spec)
    items = [f"i{n:05d}" for n in range(5)]
    for user, anon in ((USER, ANON), (OTHER, f"anon-{OTHER}")):
        r = client.post("/v1/events", json={"events": _events(user, anon=anon, items=items)})
        assert r.status_code == 202 and r.json()["accepted"] == 6, r.text
    delta = DeltaStore.from_settings(settings)
    types = {n: a.type for n, a in spec.entities.item.attributes.items()}
    vectors = VectorStore.from_settings(settings, dim=spec.model.dim, item_attributes=types)  # type: ignore[arg-type]

    def streamed() -> bool:
        assert proc.poll() is None, (settings.home_dir / "logs" / "stream.log").read_text()
        return _rows(delta, "events", USER) == 5 and _rows(delta, "events", OTHER) == 5

    wait_until(streamed, timeout=20, what="events in Delta")
    decisions = {}
    for user in (USER, OTHER):
        r = client.post("/v1/decide", json={"user_id": user, "k": 3})
        assert r.status_code in (200, 201), r.text
        decisions[user] = r.json()
        feedback = {"decision_id": r.json()["decision_id"], "user_id": user, "outcome": "click"}
        assert client.post("/v1/feedback", json=feedback).status_code == 202
    wait_until(
        lambda: (
            all(_rows(delta, t, u) for t in ("decisions", "feedback") for u in (USER, OTHER))
            and vectors.get_user(USER) is not None
        ),
        timeout=20,
        what="decisions, feedback and the user vector",
    )
    assert client.get(f"/v1/users/{USER}/features").status_code == 200
    old_delta = {t: delta.version(t) for t in ("events", "decisions", "feedback")}
    old_lance = vectors.version("users")
    assert _scan(settings.home_dir), "the canaries should be on disk before erasure"

    r = client.delete(f"/v1/users/{USER}")
    assert r.status_code == 202, r.text

    last: list[Any] = []

    def finished() -> dict[str, Any] | None:
        job = client.get(f"/v1/users/{USER}/erasure").json()
        last[:] = [job]
        return job if job["status"] in ("done", "failed") else None

    try:
        job = wait_until(finished, timeout=30, what="the erasure job")
    except AssertionError:
        log = (settings.home_dir / "logs" / "stream.log").read_text(errors="replace")
        raise AssertionError(f"{last}\n{_scan(settings.home_dir)}\n{log[-3000:]}") from None
    assert job["status"] == "done", job["stores"]
    assert set(job["stores"]) == set(STORES) and all(
        v.startswith("done") for v in job["stores"].values()
    ), job

    # Nothing of the canary user in any file: Parquet, Lance, SQLite (+WAL), log, recovery.
    assert _scan(settings.home_dir) == []
    # Time travel: older Delta versions had their files vacuumed, old Lance versions are gone.
    for table, version in old_delta.items():
        assert _old_rows(delta, table, version) == 0, table
    assert old_lance not in vectors.list_versions("users")
    for v in vectors.list_versions("users"):
        assert USER not in vectors.checkout("users", v).to_arrow().column("user_id").to_pylist()
    # Everyone else is intact.
    assert _rows(delta, "events", OTHER) == 5
    assert _rows(delta, "decisions", OTHER) == 1 and _rows(delta, "feedback", OTHER) == 1
    assert vectors.get_user(OTHER) is not None and vectors.get_user(USER) is None
    assert client.get(f"/v1/users/{OTHER}/features").status_code == 200
    assert client.get(f"/v1/users/{USER}/features").status_code == 404
