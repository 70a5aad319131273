"""Every store on a real S3-compatible object store (SeaweedFS, tests/support/s3.py).

With `delta_uri`/`lance_uri` on `s3://` and one set of `storage_options`, the Delta
tables the stream and Dagster write, LanceDB `items`/`users` and the model artifacts
live in the bucket and nothing of them under the local data home. The premise of safe
concurrent commits, an atomic put-if-absent, is checked on the server itself.
"""

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import obstore
import pyarrow as pa
import pytest
from obstore.exceptions import AlreadyExistsError, PreconditionError
from obstore.store import ObjectStore

from nextbest.ingest.events import Event
from nextbest.learn.model import ItemModel
from nextbest.settings import Settings
from storage.artifacts import ArtifactStore
from storage.delta.erasure import DERIVED_TABLES, erase_derived
from storage.delta.locks import LOCK_FILE, ObjectLease
from storage.delta.store import (
    TABLES,
    DeadLetter,
    DeltaStore,
    dead_letters_to_table,
    decisions_to_table,
    events_to_table,
    feedback_to_table,
)
from storage.objectstore import delta_options, lance_options, open_store
from storage.vectors import VectorStore
from tests.support.s3 import S3Server

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def s3_settings(s3_server: S3Server, tmp_path: Path) -> Settings:
    return s3_server.settings(tmp_path / "home")


def _local_store_dirs(settings: Settings) -> list[str]:
    """What of Delta, LanceDB or models exists under the local data home."""
    home = settings.home_dir
    return [str(p) for p in home.rglob("*")] if home.exists() else []


def test_options_written_once_are_spelled_per_library() -> None:
    given = {"endpoint": "http://h:1", "access_key_id": "k", "secret_access_key": "s",
             "region": "r", "allow_http": "true"}  # fmt: skip
    delta = delta_options("s3://b/delta", given)
    assert delta["AWS_ENDPOINT_URL"] == "http://h:1" and delta["AWS_ALLOW_HTTP"] == "true"
    assert delta["conditional_put"] == "etag"  # safe commits, stated explicitly
    assert (
        delta_options("s3://b/d", {**given, "AWS_S3_LOCKING_PROVIDER": "dynamodb"}).get(
            "conditional_put"
        )
        is None
    )  # a user's DynamoDB lock is kept as chosen
    lance = lance_options("s3://b/lance", given)
    assert lance is not None and lance["aws_endpoint"] == "http://h:1"
    assert lance["allow_http"] == "true" and lance["aws_region"] == "r"
    # Already-spelled options (as DeltaStore passes them on) translate to themselves.
    assert delta_options("s3://b/delta", delta) == delta
    assert Settings(delta_uri="s3://b/nb/delta", _env_file=None).models_root == "s3://b/nb/models"  # type: ignore[call-arg]


def _race(store: ObjectStore, key: str, *, writers: int) -> tuple[int, int]:
    """`writers` threads create `key` at once: (won, refused)."""
    start, wins, refused = threading.Barrier(writers), [], []

    def create(i: int) -> None:
        start.wait()
        try:
            wins.append(obstore.put(store, key, f"w{i}".encode(), mode="create"))
        except AlreadyExistsError:
            refused.append(i)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(wins), len(refused)


def test_seaweedfs_put_if_absent_admits_exactly_one_writer(s3_server: S3Server) -> None:
    """delta-rs commits version N by creating `_delta_log/N.json` with If-None-Match; the
    Lance and the compaction lease rely on the same. Six racing creators: one wins."""
    store = open_store(s3_server.uri(), s3_server.options)
    # SeaweedFS serializes racing conditional puts on one key: a loser may wait a second
    # or more for its 412 (a commit's latency under contention, never a wrong answer).
    for trial in range(2):
        assert _race(store, f"race-{trial}", writers=6) == (1, 5)
    first = obstore.put(store, "cas", b"a")
    obstore.put(store, "cas", b"b", mode={"e_tag": first["e_tag"]})
    with pytest.raises(PreconditionError):  # a stale ETag is refused
        obstore.put(store, "cas", b"c", mode={"e_tag": first["e_tag"]})


def test_delta_tables_of_stream_and_dagster_live_in_the_bucket(
    s3_server: S3Server, s3_settings: Settings
) -> None:
    store = DeltaStore.from_settings(s3_settings)
    store.ensure_tables()
    events = [
        Event(event_id=f"e{i}", type="view", user_id=f"u{i % 3}", item_id=f"i{i}",
              ts=T0 + timedelta(hours=i))
        for i in range(6)
    ]  # fmt: skip
    data = events_to_table(events, partition=0, offsets=list(range(6)))
    assert store.append("events", data, app_id="bronze-p0", batch_version=5)
    assert not store.append("events", data, app_id="bronze-p0", batch_version=5)  # replay
    store.append(
        "decisions",
        decisions_to_table([{"decision_id": "d1", "user_id": "u0", "ts": T0,
                             "served_from": "model", "actions": [{"action_id": "i1"}]}]),
        app_id="decisions-p0", batch_version=0,
    )  # fmt: skip
    store.append(
        "feedback",
        feedback_to_table([{"decision_id": "d1", "user_id": "u0", "outcome": "click",
                            "item_id": "i1", "ts": T0}]),
        app_id="feedback-p0", batch_version=0,
    )  # fmt: skip
    store.append(
        "dead_letters",
        dead_letters_to_table([DeadLetter(raw=b"{", error="bad json", source_offset=9)]),
        app_id="dead-p0", batch_version=9,
    )  # fmt: skip
    for table, columns in DERIVED_TABLES.items():  # what the Dagster assets write
        rows = pa.table({columns[0]: ["u0", "u1", "u2"], "n": [1, 2, 3]})
        store.write(table, rows, mode="overwrite", based_on=store.pin(table))
    store.merge("items", pa.table({"item_id": ["i1", "i2"], "price": [1.0, 2.0]}), key="item_id")

    assert store.count("events") == 6
    assert [store.count(t) for t in ("decisions", "feedback", "dead_letters")] == [1, 1, 1]
    # Erasure and maintenance on the bucket: delete + vacuum, compaction under the lease.
    assert store.erase("events", column="user_id", value="u1", key_column="event_id") == {
        "deleted_rows": 2, "vacuumed_files": 1
    }  # fmt: skip
    assert erase_derived(store.uri("gold/interactions"), ["u2"], ["user_id"],
                         storage_options=store.storage_options) == 1  # fmt: skip
    store.append("events", data.slice(0, 2), app_id="bronze-p1", batch_version=1)
    report = store.maintain("events", retention_hours=0, enforce_retention_duration=False)
    assert report["compact"]["numFilesRemoved"] >= 2 and report["files"] == 1
    assert store.count("events") == 6
    assert store.read("gold/interactions").column("user_id").to_pylist() == ["u0", "u1"]

    keys = s3_server.keys(s3_settings.delta_root)
    for table in [*TABLES, *DERIVED_TABLES, "items"]:
        assert any(k.startswith(f"{table}/_delta_log/") for k in keys), table
    assert not any(k.endswith(LOCK_FILE) for k in keys)  # the lease is released
    assert _local_store_dirs(s3_settings) == []


def test_lancedb_items_and_users_live_in_the_bucket(
    s3_server: S3Server, s3_settings: Settings
) -> None:
    writer = VectorStore.from_settings(s3_settings, dim=4, item_attributes={"category": "string"})
    writer.ensure_tables()
    vecs = np.eye(4, dtype=np.float32)
    writer.upsert_items(
        [{"item_id": f"i{i}", "vector": vecs[i], "category": "c"} for i in range(4)],
        model_version="m1",
    )
    writer.upsert_users([{"user_id": "u1", "vector": vecs[2], "event_ts": T0}])
    writer.upsert_users([{"user_id": "u1", "vector": vecs[3], "event_ts": T0}])  # an update
    writer.upsert_users([{"user_id": "u2", "vector": vecs[0], "event_ts": T0}])

    reader = VectorStore.from_settings(s3_settings, dim=4, item_attributes={"category": "string"})
    assert [h["item_id"] for h in reader.search_items(vecs[1], k=1)] == ["i1"]
    assert np.allclose(reader.get_user_vector("u1"), vecs[3])  # type: ignore[arg-type]
    assert reader.count("users") == 2
    assert writer.delete_user("u1") == 1
    assert reader.get_user_vector("u1") is None
    writer.optimize("users", cleanup_older_than=timedelta(0))

    keys = s3_server.keys(s3_settings.lance_root)
    assert any(k.startswith("items.lance/") for k in keys)
    assert any(k.startswith("users.lance/") for k in keys)
    assert _local_store_dirs(s3_settings) == []


def _model(version: str) -> ItemModel:
    rng = np.random.default_rng(0)
    return ItemModel(
        item_ids=["a", "b", "c"],
        vectors=rng.normal(size=(3, 4)).astype(np.float32),
        weights=np.eye(3, dtype=np.float32),
        popularity=np.array([3.0, 2.0, 1.0]),
        version=version,
        params={},
    )


def test_model_artifacts_save_and_load_from_the_bucket(
    s3_server: S3Server, s3_settings: Settings
) -> None:
    models = ArtifactStore.from_settings(s3_settings)
    assert models.root == s3_settings.models_root.rstrip("/")
    assert models.root.startswith("s3://") and models.root.endswith("/models")
    uri = models.save("m1.npz", _model("m1").save)
    assert uri == f"{models.root}/m1.npz"
    (models / "candidate.json").write_text('{"version": "m1"}')
    assert models.read_json("candidate.json") == {"version": "m1"}
    assert models.read_json("missing.json") is None and not (models / "missing.json").exists()

    # Another process (the API) knows only the URI the registry recorded.
    loaded = ArtifactStore.from_settings(s3_settings).load(uri, ItemModel.load)
    assert loaded.item_ids == ["a", "b", "c"] and loaded.n_items == 3
    assert np.allclose(loaded.vectors, _model("m1").vectors)
    assert ArtifactStore.from_settings(s3_settings).available(uri)
    assert sorted(s3_server.keys(models.root)) == ["candidate.json", "m1.npz"]
    assert _local_store_dirs(s3_settings) == []


def test_compaction_lease_excludes_and_survives_a_dead_holder(s3_server: S3Server) -> None:
    store = open_store(s3_server.uri(), s3_server.options)
    first, second = ObjectLease(store, LOCK_FILE), ObjectLease(store, LOCK_FILE)
    first.acquire()
    with pytest.raises(TimeoutError):
        second.acquire(timeout=0.3)
    first.release()
    second.acquire(timeout=5)
    second.release()
    assert s3_server.keys(s3_server.uri()) == [] or LOCK_FILE not in [
        k.rsplit("/", 1)[-1] for k in s3_server.keys(s3_server.uri())
    ]

    # A holder that died without releasing: its lease expires, then one taker gets it.
    dead = ObjectLease(store, "dead.lock", lease_s=0.5)
    assert dead._try_acquire()  # pyright: ignore[reportPrivateUsage]  (no renewal thread)
    taker = ObjectLease(store, "dead.lock")
    with pytest.raises(TimeoutError):
        taker.acquire(timeout=0.2)
    started = time.monotonic()
    taker.acquire(timeout=10)
    assert time.monotonic() - started < 10
    taker.release()

    # A holder that stays alive renews past its lease length.
    alive = ObjectLease(store, f"{uuid.uuid4().hex}.lock", lease_s=0.6)
    alive.acquire()
    rival = ObjectLease(store, alive.key)
    with pytest.raises(TimeoutError):
        rival.acquire(timeout=1.5)
    assert not alive.lost
    alive.release()


def test_delta_commits_from_racing_writers_lose_and_duplicate_nothing(
    s3_server: S3Server,
) -> None:
    """Put-if-absent commits on S3: three writers, each with its own table handle (as
    separate processes have), append to one table at once, each commit racing the others
    for the next log entry; then four writers retrying one batch under one app id (a
    zombie and its replacement) commit it once."""
    root = f"{s3_server.uri()}/delta"
    store = DeltaStore(root, storage_options=s3_server.options)
    store.ensure_tables()
    errors: list[BaseException] = []

    def append(w: int) -> None:
        try:
            writer = DeltaStore(root, storage_options=s3_server.options)
            for b in range(4):
                events = [
                    Event(event_id=f"w{w}-{b}-{i}", type="view", user_id=f"p{w}",
                          item_id="i", ts=T0)
                    for i in range(5)
                ]  # fmt: skip
                data = events_to_table(events, partition=w, offsets=[b * 5 + i for i in range(5)])
                assert writer.append("events", data, app_id=f"proc{w}", batch_version=b)
                assert not writer.append("events", data, app_id=f"proc{w}", batch_version=b)
        except BaseException as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ids = store.read("events", columns=["event_id"]).column("event_id").to_pylist()
    assert len(ids) == 3 * 4 * 5 == len(set(ids))
    assert {store.transaction_version("events", f"proc{w}") for w in range(3)} == {3}
    assert store.version("events") == 12  # one log entry per batch, none overwritten

    results: list[bool] = []
    start = threading.Barrier(4)

    def retry() -> None:
        writer = DeltaStore(root, storage_options=s3_server.options)
        batch = events_to_table(
            [Event(event_id=f"z{i}", type="view", user_id="z", item_id="i", ts=T0)
             for i in range(4)],
            partition=9, offsets=[0, 1, 2, 3],
        )  # fmt: skip
        start.wait()
        results.append(writer.append("events", batch, app_id="zombie", batch_version=3))

    threads = [threading.Thread(target=retry) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert store.count("events") == 64
