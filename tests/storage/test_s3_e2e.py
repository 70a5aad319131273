"""The object-storage profile end to end: a real stream process and a full Dagster
materialization with Delta, LanceDB and model artifacts on S3 (SeaweedFS).

Events imported by the CLI's importer land in Delta `events` in the bucket; `materialize`
trains, registers and promotes a model whose artifact is an `s3://` object (the API's
loader reads it back) and writes LanceDB `items`; then `python -m pipelines` reads more
events from the embedded log into Delta `events` (each once) and LanceDB `users`. Only the
event log, recovery state, Dagster's instance and the online store stay in the home.
"""

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from definitions.batch.importer import import_events, import_items
from definitions.runs import materialize
from nextbest.demo.shop import DemoConfig, write_demo
from nextbest.learn.model import ItemModel
from nextbest.settings import Settings
from nextbest.spec.models import Spec
from storage.artifacts import ArtifactStore
from storage.delta.store import DeltaStore
from storage.online.store import OnlineStore
from storage.vectors import VectorStore
from tests.support.common import ROOT
from tests.support.s3 import S3Server
from tests.support.stream_helpers import append_log, demo_events
from tests.support.waiting import wait_until

HISTORY = DemoConfig(n_users=60, n_items=80, n_events=1200, days=5)
LIVE = 200  # events the stream process reads from the embedded log


def _stream(settings: Settings, env: dict[str, str]) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NEXTBEST_", "BYTEWAX_"))}
    argv = [sys.executable, "-m", "pipelines", "--home", str(settings.home_dir)]
    argv += ["--spec", str(settings.spec), "--epoch-ms", "200"]
    logs = settings.home_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stream.log", "ab") as out:
        return subprocess.Popen(
            argv, cwd=ROOT, env={**clean, **env, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=out
        )


def _vectors(settings: Settings, spec: Spec) -> VectorStore:
    types = {n: a.type for n, a in spec.entities.item.attributes.items()}
    return VectorStore.from_settings(settings, dim=spec.model.dim, item_attributes=types)  # type: ignore[arg-type]


def _users(settings: Settings, spec: Spec) -> int:
    try:
        return _vectors(settings, spec).count("users")
    except LookupError:  # not created before the first session vector
        return 0


@pytest.mark.slow
def test_stream_and_dagster_keep_every_table_and_model_in_the_bucket(
    s3_server: S3Server, spec: Spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = s3_server.settings(tmp_path / "home")
    monkeypatch.setenv("NEXTBEST_STORAGE_OPTIONS", json.dumps(s3_server.options))  # Dagster's
    write_demo(tmp_path / "demo", HISTORY)
    import_items(settings, spec, tmp_path / "demo" / "items.jsonl")
    imported = import_events(settings, spec, tmp_path / "demo" / "events.jsonl", progress=False)
    assert imported.written == HISTORY.n_events

    assert materialize(settings) is True
    online = OnlineStore.from_settings(settings)
    try:
        promoted = online.promoted_model()
    finally:
        online.dispose()
    assert promoted is not None and promoted.artifact_path is not None
    assert promoted.artifact_path.startswith(f"{settings.models_root}/")
    model = ArtifactStore.from_settings(settings).load(promoted.artifact_path, ItemModel.load)
    assert model.n_items > 0 and _vectors(settings, spec).count("items") == model.n_items

    _, live = demo_events(
        LIVE, seed=31, n_users=60, n_items=80, days=1, start=HISTORY.start + timedelta(days=5)
    )
    assert append_log(settings, live) == LIVE
    delta = DeltaStore.from_settings(settings)
    stream = _stream(settings, s3_server.env(settings))
    try:
        total = HISTORY.n_events + LIVE
        wait_until(
            lambda: stream.poll() is not None
            or (delta.count("events") >= total and _users(settings, spec) > 0),
            timeout=120, every=0.5, what="the stream's bronze appends and user vectors on S3",
        )  # fmt: skip
        assert stream.poll() is None, (settings.home_dir / "logs" / "stream.log").read_text()
    finally:
        stream.terminate()
        stream.wait(timeout=30)
    ids = delta.read("events", columns=["event_id"]).column("event_id").to_pylist()
    assert len(ids) == len(set(ids)) == total

    models = s3_server.keys(settings.models_root)
    assert "candidate.json" in models and any(k.endswith(".npz") for k in models)
    tables = {k.split("/_delta_log/")[0] for k in s3_server.keys(settings.delta_root)
              if "/_delta_log/" in k}  # fmt: skip
    assert {"events", "items", "silver/sessions", "gold/interactions", "gold/training_set",
            "gold/user_features"} <= tables  # fmt: skip
    home = settings.home_dir
    assert not any((home / name).exists() for name in ("delta", "lance", "models"))
    assert not list(home.rglob("*.npz")) and not list(home.rglob("_delta_log"))
    assert not list(home.rglob("*.lance"))
