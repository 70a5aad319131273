"""DeltaStore against real Delta tables under tmp_path."""

import glob
import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from nextbest.ingest.events import Event
from nextbest.settings import Settings
from storage.delta.schemas import DECISIONS_SCHEMA, EVENTS_SCHEMA
from storage.delta.store import (
    DeadLetter,
    DeltaStore,
    dead_letters_to_table,
    decisions_to_table,
    events_to_table,
)

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def make_events(n: int, *, start: int = 0, user: str = "u1", day: int = 0) -> list[Event]:
    return [
        Event(
            event_id=f"e{start + i}",
            type="view",
            user_id=user,
            item_id=f"i{i % 7}",
            ts=T0 + timedelta(days=day, seconds=i),
            context={"session_id": "s1", "device": "web"},  # type: ignore[arg-type]
            properties={"k": i},
        )
        for i in range(n)
    ]


def batch(n: int, *, start: int = 0, user: str = "u1", day: int = 0) -> pa.Table:
    events = make_events(n, start=start, user=user, day=day)
    return events_to_table(events, partition=0, offsets=list(range(start, start + n)))


@pytest.fixture
def store(tmp_path: Path) -> DeltaStore:
    s = DeltaStore(str(tmp_path / "delta"), storage_options={})
    s.ensure_tables()
    return s


def test_layout_schema_and_partitions(store: DeltaStore, settings: Settings) -> None:
    store.ensure_tables()  # idempotent
    for name in ("events", "dead_letters", "decisions"):
        assert store.exists(name)
        assert store.version(name) == 0
        assert store.count(name) == 0
    ev = DeltaTable(store.uri("events"))
    assert ev.metadata().partition_columns == ["event_date"]
    assert DeltaTable(store.uri("decisions")).metadata().partition_columns == ["event_date"]
    assert DeltaTable(store.uri("dead_letters")).metadata().partition_columns == []
    assert store.read("events").schema.names == EVENTS_SCHEMA.names
    stats_cols = ev.metadata().configuration["delta.dataSkippingStatsColumns"]
    assert "user_id" not in stats_cols.split(",")

    from_settings = DeltaStore.from_settings(settings)
    assert from_settings.root == settings.delta_root
    assert from_settings.uri("events") == f"{settings.delta_root}/events"
    with pytest.raises(ValueError):
        store.uri("../escape")


def test_events_to_table_rows(store: DeltaStore) -> None:
    events = make_events(3)
    t = events_to_table(events, partition=2, offsets=[10, 11, 12])
    assert t.schema == EVENTS_SCHEMA
    row = t.to_pylist()[1]
    assert row["event_date"] == "2024-05-01"
    assert (row["source_partition"], row["source_offset"]) == (2, 11)
    assert json.loads(row["properties"]) == {"k": 1}
    assert row["session_id"] == "s1"
    with pytest.raises(ValueError):
        events_to_table(events, partition=0, offsets=[1])

    assert store.append("events", t, app_id="p2", batch_version=12)
    back = store.read("events").sort_by("source_offset")
    assert back.column("event_id").to_pylist() == ["e0", "e1", "e2"]
    assert back.column("ts").type == pa.timestamp("us", tz="UTC")
    assert back.column("ts").to_pylist()[0] == T0
    files = DeltaTable(store.uri("events")).file_uris()
    assert files and all("/event_date=2024-05-01/" in f for f in files)


def test_retried_batch_written_once(store: DeltaStore) -> None:
    data = batch(5)
    assert store.append("events", data, app_id="stream-p0", batch_version=4) is True
    assert store.append("events", data, app_id="stream-p0", batch_version=4) is False
    assert store.append("events", data, app_id="stream-p0", batch_version=3) is False
    assert store.count("events") == 5
    assert store.transaction_version("events", "stream-p0") == 4

    assert store.append("events", batch(5, start=5), app_id="stream-p0", batch_version=9)
    assert store.count("events") == 10
    assert store.transaction_version("events", "stream-p0") == 9

    # another app id has its own sequence
    assert store.append("events", batch(2, start=100), app_id="stream-p1", batch_version=4)
    assert not store.append("events", batch(2, start=100), app_id="stream-p1", batch_version=4)
    assert store.count("events") == 12
    assert store.transaction_version("events", "stream-p0") == 9
    assert store.transaction_version("events", "nobody") is None


def test_retry_after_checkpoint_still_deduplicated(store: DeltaStore) -> None:
    assert store.append("events", batch(3), app_id="a", batch_version=1)
    store.checkpoint("events")
    assert glob.glob(f"{store.uri('events')}/_delta_log/*.checkpoint.parquet")
    assert not store.append("events", batch(3), app_id="a", batch_version=1)
    assert store.count("events") == 3


def test_same_batch_from_two_racing_writers_lands_once(store: DeltaStore) -> None:
    """A zombie and its replacement retrying the same batch: exactly one commit."""
    results: list[bool] = []
    barrier = threading.Barrier(4)

    def go() -> None:
        s = DeltaStore(store.root, storage_options={})
        barrier.wait()
        results.append(s.append("events", batch(4), app_id="dup", batch_version=7))

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert store.count("events") == 4


def test_concurrent_appends_from_threads_lose_nothing(store: DeltaStore) -> None:
    writers, batches, rows = 4, 5, 3
    errors: list[BaseException] = []

    def go(w: int) -> None:
        try:
            for b in range(batches):
                data = batch(rows, start=(w * batches + b) * rows, user=f"w{w}")
                assert store.append("events", data, app_id=f"t{w}", batch_version=b)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ids = store.read("events", columns=["event_id"]).column("event_id").to_pylist()
    assert len(ids) == writers * batches * rows == len(set(ids))
    for w in range(writers):
        assert store.transaction_version("events", f"t{w}") == batches - 1


_CHILD = """
import sys
from storage.delta.store import DeltaStore, events_to_table
from tests.storage.test_storage_delta import make_events
root, w = sys.argv[1], int(sys.argv[2])
store = DeltaStore(root, storage_options={})
for b in range(4):
    ev = make_events(5, start=(w * 4 + b) * 5, user=f"p{w}")
    t = events_to_table(ev, partition=w, offsets=list(range(b * 5, b * 5 + 5)))
    assert store.append("events", t, app_id=f"proc{w}", batch_version=b)
    # a retry of the same batch right after must be a no-op
    assert not store.append("events", t, app_id=f"proc{w}", batch_version=b)
"""


def test_concurrent_appends_from_processes_lose_nothing(store: DeltaStore) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, store.root, str(w)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    ids = store.read("events", columns=["event_id"]).column("event_id").to_pylist()
    assert len(ids) == 3 * 4 * 5 == len(set(ids))
    assert {store.transaction_version("events", f"proc{w}") for w in range(3)} == {3}


def _wait_past(ms: int) -> None:
    """Poll until the wall clock is past `ms`, so the next commit gets a later timestamp."""
    deadline = time.monotonic() + 5
    while time.time() * 1000 <= ms + 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_time_travel_by_version_and_timestamp(store: DeltaStore) -> None:
    store.append("events", batch(3), app_id="a", batch_version=0)
    v1 = store.version("events")
    ts1 = store.history("events", limit=1)[0]["timestamp"]
    _wait_past(ts1 + 100)
    store.append("events", batch(4, start=3), app_id="a", batch_version=1)
    ts2 = store.history("events", limit=1)[0]["timestamp"]
    assert store.count("events") == 7

    assert store.read("events", version=v1).num_rows == 3
    assert store.count("events", version=0) == 0
    # Between the two commits. Not exactly ts1: delta-rs may resolve a timestamp by the
    # log file's modification time, a few ms after the commit's own timestamp (this
    # flaked under load in CI).
    as_of = datetime.fromtimestamp((ts1 + ts2) / 2000, UTC)
    old = store.read("events", as_of=as_of, columns=["event_id"])
    assert sorted(old.column("event_id").to_pylist()) == ["e0", "e1", "e2"]
    assert store.count("events", as_of=datetime.now(UTC)) == 7
    with pytest.raises(ValueError):
        store.read("events", as_of=datetime(2024, 1, 1))  # naive
    hist = store.history("events")
    assert [h["version"] for h in hist] == [2, 1, 0]
    assert hist[0]["operation"] == "WRITE"


def test_read_with_filters(store: DeltaStore) -> None:
    store.append("events", batch(3, user="a"), app_id="x", batch_version=0)
    store.append("events", batch(2, start=3, user="b", day=1), app_id="x", batch_version=1)
    only_b = store.read("events", filters=[("user_id", "=", "b")])
    assert only_b.column("event_id").to_pylist() == ["e3", "e4"]
    day0 = store.read("events", filters=[("event_date", "=", "2024-05-01")], columns=["user_id"])
    assert set(day0.column("user_id").to_pylist()) == {"a"}


def test_compact_reduces_files_and_keeps_rows(store: DeltaStore) -> None:
    for b in range(6):
        store.append("events", batch(2, start=b * 2), app_id="c", batch_version=b)
    assert store.file_count("events") == 6
    before = store.read("events").sort_by("event_id")
    metrics = store.compact("events")
    assert metrics["numFilesRemoved"] == 6
    assert metrics["numFilesAdded"] == 1
    assert store.file_count("events") == 1
    assert store.read("events").sort_by("event_id").equals(before)


def test_delete_then_vacuum_erases_old_versions(store: DeltaStore) -> None:
    store.append("events", batch(3, user="alice"), app_id="d", batch_version=0)
    store.append("events", batch(2, start=3, user="bob"), app_id="d", batch_version=1)
    pre = store.version("events")
    m = store.delete("events", "user_id = 'alice'")
    assert m["num_deleted_rows"] == 3
    assert set(store.read("events").column("user_id").to_pylist()) == {"bob"}
    # the old version still holds alice until vacuum
    assert store.count("events", version=pre) == 5

    with pytest.raises(Exception, match="retention"):
        store.vacuum("events", retention_hours=0)  # enforced minimum retention
    planned = store.vacuum(
        "events", retention_hours=0, dry_run=True, enforce_retention_duration=False
    )
    assert len(planned) == 1
    removed = store.vacuum("events", retention_hours=0, enforce_retention_duration=False)
    assert removed == planned
    assert not list(Path(store.uri("events")).rglob(Path(removed[0]).name))
    try:
        old = store.read("events", version=pre)
    except (FileNotFoundError, OSError):
        pass
    else:
        assert "alice" not in old.column("user_id").to_pylist()
    # alice leaves no trace in any data file or log stats
    for f in Path(store.uri("events")).rglob("*"):
        if f.is_file() and f.suffix in (".parquet",) and "_delta_log" not in f.parts:
            assert b"alice" not in f.read_bytes()
        if f.is_file() and f.suffix == ".json":
            for line in f.read_text().splitlines():
                action = json.loads(line)
                assert "alice" not in json.dumps(action.get("add", {}))


def test_checkpoint_creates_file(store: DeltaStore) -> None:
    store.append("events", batch(2), app_id="k", batch_version=0)
    v = store.checkpoint("events")
    assert v == store.version("events") == 1
    log = Path(store.uri("events")) / "_delta_log"
    assert (log / f"{v:020d}.checkpoint.parquet").exists()
    assert (log / "_last_checkpoint").exists()


def test_maintain_returns_plain_metrics(store: DeltaStore) -> None:
    for b in range(3):
        store.append("events", batch(2, start=b * 2), app_id="m", batch_version=b)
    out = store.maintain("events", retention_hours=0, enforce_retention_duration=False)
    assert out["compact"]["numFilesRemoved"] == 3
    assert out["vacuumed_files"] == 3
    assert out["files"] == 1
    assert out["checkpoint_version"] == store.version("events")
    json.dumps(out)  # plain, serialisable
    assert store.count("events") == 6


def test_dead_letters_and_decisions(store: DeltaStore) -> None:
    dl = dead_letters_to_table(
        [
            DeadLetter(raw=b"\xff\x00", error="not utf-8", source="kafka", source_partition=1),
            DeadLetter(raw="{bad json", error="json", source_offset=42),
        ]
    )
    assert store.append("dead_letters", dl, app_id="dl-p1", batch_version=42)
    rows = store.read("dead_letters").to_pylist()
    assert {r["raw"] for r in rows} == {b"\xff\x00", b"{bad json"}

    dec = decisions_to_table(
        [
            {
                "decision_id": "d1",
                "user_id": "u1",
                "ts": T0,
                "served_from": "realtime",
                "model_version": "m3",
                "actions": [{"item_id": "i1", "score": 0.9}],
                "candidates": ["i1", "i2"],
                "features": {"views_1h": 3},
            }
        ]
    )
    assert dec.schema == DECISIONS_SCHEMA
    assert store.append("decisions", dec, app_id="api-1", batch_version=1)
    row = store.read("decisions").to_pylist()[0]
    assert row["event_date"] == "2024-05-01"
    assert json.loads(row["actions"]) == [{"item_id": "i1", "score": 0.9}]


def test_append_conforms_and_rejects_unknown_columns(store: DeltaStore) -> None:
    loose = pa.table(
        {
            "decision_id": pa.array(["d9"], pa.large_string()),
            "user_id": ["u9"],
            "ts": pa.array([T0], pa.timestamp("us", tz="UTC")),
            "served_from": ["cached"],
            "event_date": ["2024-05-01"],
        }
    )
    assert store.append("decisions", loose, app_id="x", batch_version=0)
    assert store.read("decisions").column("model_version").to_pylist() == [None]
    with pytest.raises(ValueError, match="not in the table schema"):
        store.append(
            "decisions", loose.append_column("oops", pa.array([1])), app_id="x", batch_version=1
        )


def test_write_derived_table(store: DeltaStore) -> None:
    t = pa.table({"user_id": ["a", "b"], "n": [1, 2], "day": ["d1", "d2"]})
    assert store.write("silver/user_counts", t, mode="overwrite", partition_by=["day"]) == 0
    t2 = pa.table({"user_id": ["a"], "n": [5], "day": ["d1"]})
    store.write("silver/user_counts", t2, mode="overwrite", predicate="day = 'd1'")
    got = {r["user_id"]: r["n"] for r in store.read("silver/user_counts").to_pylist()}
    assert got == {"a": 5, "b": 2}


def test_ambiguous_failure_is_not_rewritten(
    store: DeltaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit lands but the client sees an I/O error (e.g. a timed-out PUT)."""
    import storage.delta.store as delta_mod

    real = delta_mod.write_deltalake
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        real(*args, **kwargs)
        if len(calls) == 1:
            raise OSError("connection reset after commit")

    monkeypatch.setattr(delta_mod, "write_deltalake", flaky)
    assert store.append("events", batch(3), app_id="amb", batch_version=5) is False
    assert len(calls) == 1  # the retry saw txn 5 and did not write again
    assert store.count("events") == 3
    assert store.transaction_version("events", "amb") == 5


def test_erase_leaves_no_trace_in_any_file(store: DeltaStore) -> None:
    subject = "o'neil-secret-subject"
    store.append("events", batch(3, user=subject), app_id="e", batch_version=0)
    store.append("events", batch(600, start=3, user="bob"), app_id="e", batch_version=1)
    store.append("events", batch(2, start=603, user=subject, day=2), app_id="e", batch_version=2)
    store.checkpoint("events")
    out = store.erase("events", column="user_id", value=subject, key_column="event_id")
    assert out["deleted_rows"] == 5
    assert out["vacuumed_files"] >= 2
    assert store.count("events") == 600
    assert store.erase("events", column="user_id", value=subject, key_column="event_id") == {
        "deleted_rows": 0,
        "vacuumed_files": 0,
    }
    needle = subject.encode()
    for f in Path(store.uri("events")).rglob("*"):
        if f.is_file():
            assert needle not in f.read_bytes(), f


def test_filtered_read_after_a_delete_rewrote_files(store: DeltaStore) -> None:
    """delete() rewrites surviving rows with string_view columns (delta-io/delta-rs#4579);
    filtered reads must keep working and return plain strings afterwards (the erasure
    test hit pyarrow's missing string/string_view kernel on such files)."""
    both = pa.concat_tables([batch(3, user="gone"), batch(4, start=3, user="kept")])
    store.append("events", both, app_id="a", batch_version=0)
    store.delete("events", "user_id = 'gone'")
    kept = store.read("events", filters=[("user_id", "=", "kept")], columns=["event_id"])
    assert sorted(kept.column("event_id").to_pylist()) == [f"e{i}" for i in range(3, 7)]
    assert kept.schema.field("event_id").type == pa.string()
    assert store.read("events", filters=[("user_id", "=", "gone")]).num_rows == 0
