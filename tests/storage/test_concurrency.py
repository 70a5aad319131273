"""Concurrent writers on Delta (issue 7, item 2; the online store: test_concurrency_online).

The stream's lake sink appends small batches to bronze from two partitions while the
Dagster `maintenance` job (executed by Dagster) compacts, vacuums and checkpoints the same
table several times: every row lands exactly once and every run succeeds. Overlapping
maintenances never duplicate rows, and the Dagster queue keeps writer runs apart.
Both run on a local folder and on S3 (SeaweedFS): put-if-absent commits and the
compaction lease (`storage.delta.locks`) instead of rename and flock.
"""

import json
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import obstore
import pytest
import yaml
from deltalake import DeltaTable

from definitions import build_definitions
from nextbest.ingest.events import Event
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from pipelines.records import Record
from pipelines.sinks import LakeSink
from storage.delta.store import DeltaStore, events_to_table
from storage.objectstore import open_store
from tests.support.s3 import S3Server
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

PARTS = 2  # source partitions = concurrent appending threads (one app id each)
BATCH_ROWS = 8  # rows per sealed batch = per Delta append
MAINTENANCE_RUNS = 3
NEW_FILES_PER_RUN = 6  # small files appended before each maintenance run


def _event(partition: int, offset: int) -> Event:
    return Event(
        event_id=f"p{partition}-o{offset}",
        type="view",
        user_id=f"u{partition}-{offset % 7}",
        item_id=f"i{offset % 11}",
        ts=T0 + timedelta(minutes=10 * offset),  # a day per 144 offsets: several partitions
    )


def _recorded(
    fn: Callable[[], None], errors: list[BaseException], stop: threading.Event | None = None
) -> Callable[[], None]:
    """`fn` for a thread: what it raises is kept for the test thread (and stops the load)."""

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # asserted in the test thread
            errors.append(exc)
            if stop is not None:
                stop.set()

    return run


@dataclass
class _Feeder:
    """The Bytewax worker's side of one lake sink partition: full batches in, a
    snapshot (epoch end) every few batches, a bounded backlog for the writer thread."""

    sink: LakeSink
    partition: int
    stop: threading.Event
    fed: list[str] = field(default_factory=list)

    def run(self) -> None:
        part = self.sink.build_part("sink_lake", f"lake{self.partition:03d}", None)
        offset = 0
        while not self.stop.is_set():
            records = [
                Record("event", self.partition, o, _event(self.partition, o))
                for o in range(offset, offset + BATCH_ROWS)
            ]
            part.write_batch(records)  # full buffer: sealed, appended in the background
            self.fed.extend(r.body.event_id for r in records)
            offset += BATCH_ROWS
            wait_until(lambda: len(part.snapshot()) <= 2, timeout=60, what="lake writer")
        part.close()  # seal and drain: every fed row is committed


def _allow_zero_retention(store: DeltaStore) -> None:
    """Let `retention_hours=0` vacuum pass delta-rs's retention check (default 7 days),
    so the files each compaction removed are deleted by the same maintenance run."""
    for name in ("events", "dead_letters", "decisions", "feedback"):
        DeltaTable(
            store.uri(name), storage_options=store.storage_options
        ).alter.set_table_properties({"delta.deletedFileRetentionDuration": "interval 0 seconds"})


@pytest.fixture(params=["local", "s3"])
def lake_settings(
    request: pytest.FixtureRequest, settings: Settings, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:  # fmt: skip
    """The data home's Delta folder, or a fresh prefix of the SeaweedFS bucket."""
    if request.param == "local":
        return settings
    server: S3Server = request.getfixturevalue("s3_server")
    # Dagster's resource reads credentials from the environment, never its own config.
    monkeypatch.setenv("NEXTBEST_STORAGE_OPTIONS", json.dumps(server.options))
    return server.settings(tmp_path / "home")


def _table(store: DeltaStore, name: str) -> DeltaTable:
    return DeltaTable(store.uri(name), storage_options=store.storage_options)


def _parquet_files(store: DeltaStore, name: str) -> set[str]:
    """Data files under the table's folder or prefix (not `_delta_log`), referenced or not."""
    uri = store.uri(name)
    if "://" not in uri:
        paths = [str(p.relative_to(uri)) for p in Path(uri).rglob("*.parquet")]
    else:
        listed = obstore.list(open_store(uri, store.storage_options))
        paths = [m["path"] for batch in listed for m in batch]
    return {
        p.rsplit("/", 1)[-1]
        for p in paths
        if p.endswith(".parquet") and not p.startswith("_delta_log/")
    }


def test_stream_appends_survive_concurrent_dagster_maintenance(
    lake_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = lake_settings
    n_runs = MAINTENANCE_RUNS if "://" not in settings.delta_root else 2  # S3: slower runs
    store = DeltaStore.from_settings(settings)
    store.ensure_tables()
    _allow_zero_retention(store)
    retries: Counter[str] = Counter()  # DeltaStore's own retry loops, by thread
    sleep = DeltaStore._sleep  # pyright: ignore[reportPrivateUsage]

    def counted_sleep(self: DeltaStore, attempt: int) -> None:
        retries[threading.current_thread().name] += 1
        sleep(self, attempt)

    monkeypatch.setattr(DeltaStore, "_sleep", counted_sleep)

    sink = LakeSink(settings, parts=PARTS, max_rows=BATCH_ROWS, max_delay_s=3600)
    stop = threading.Event()
    feeders = [_Feeder(sink, p, stop) for p in range(PARTS)]
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_recorded(f.run, errors)) for f in feeders]
    for t in threads:
        t.start()

    defs = build_definitions(settings, load_spec(settings.spec), retention_hours=0)
    maintenance = defs.resolve_job_def("maintenance")
    runs: list[dict[str, Any]] = []
    step_retries = 0
    try:
        with dg.instance_for_test() as instance:
            for _ in range(n_runs):
                floor = store.file_count("events") + NEW_FILES_PER_RUN
                wait_until(
                    lambda floor=floor: store.file_count("events") >= floor or stop.is_set(),
                    timeout=60,
                    what="new small files",
                )
                before = store.version("events")
                result = maintenance.execute_in_process(instance=instance, raise_on_error=False)
                after = store.version("events")
                assert result.success, [e.message for e in result.all_events if e.is_failure]
                step_retries += sum(
                    e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events
                )
                [output] = [
                    e
                    for e in result.all_events
                    if e.step_key == "delta_maintenance" and e.event_type_value == "STEP_OUTPUT"
                ]
                tables = output.event_specific_data.metadata["tables"].data  # type: ignore[union-attr]
                runs.append({"before": before, "after": after, **tables["events"]})
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert errors == []

    fed = [event_id for f in feeders for event_id in f.fed]
    # What any reader sees: a fresh snapshot of the table, not the writer's view.
    table = _table(store, "events").to_pyarrow_table(columns=["event_id"])
    ids = table.column("event_id").to_pylist()
    assert len(ids) == len(fed) == len(set(ids))
    assert set(ids) == set(fed)
    for f in feeders:
        assert store.transaction_version("events", f"bronze-p{f.partition}") == len(f.fed) - 1

    history = store.history("events")  # newest first
    optimizes = [h for h in history if h["operation"] == "OPTIMIZE"]
    appends = [h for h in history if h["operation"] == "WRITE"]
    assert len(optimizes) == n_runs  # every run found small files and compacted
    removed = sum(h["operationMetrics"]["numFilesRemoved"] for h in optimizes)
    added = sum(h["operationMetrics"]["numFilesAdded"] for h in optimizes)
    assert removed > added
    vacuumed = sum(r["vacuumed_files"] for r in runs)
    # Each run vacuums what its compaction removed (retention 0); at worst the last
    # run's tombstones are too fresh by a millisecond and wait for the next run.
    assert vacuumed >= removed - optimizes[0]["operationMetrics"]["numFilesRemoved"] > 0
    # Appends committed while a run was compacting/vacuuming: the runs overlapped the stream.
    during = sum(1 for h in appends for r in runs if r["before"] < h["version"] < r["after"])
    assert during > 0
    # Files on disk: the live ones, plus only what a failed (retried) append left behind.
    live = {u.rsplit("/", 1)[-1] for u in _table(store, "events").file_uris()}
    on_disk = _parquet_files(store, "events")
    assert live <= on_disk
    assert len(on_disk - live) <= sum(retries.values())

    # After the maintenance a restarted sink (no resume state) replays the last batch and
    # a client resends it under new offsets: neither adds a row; a new event still lands.
    part = sink.build_part("sink_lake", "lake000", None)
    last = len(feeders[0].fed)
    replay = [Record("event", 0, o, _event(0, o)) for o in range(last - BATCH_ROWS, last)]
    resent = [Record("event", 0, last + i, r.body) for i, r in enumerate(replay)]
    part.write_batch([*replay, *resent, Record("event", 0, last + BATCH_ROWS, _event(0, 10**6))])
    part.close()
    assert store.count("events") == len(fed) + 1

    rebased = sum(h["operationMetrics"].get("num_retries", 0) for h in appends)
    print(
        f"\ndelta: {len(fed)} rows in {len(appends)} appends from {PARTS} threads; "
        f"{len(runs)} maintenance runs, {removed} files compacted into {added}, "
        f"{vacuumed} vacuumed, {during} appends committed during runs; retries: "
        f"delta-rs commit {rebased}, DeltaStore {dict(retries)}, Dagster step {step_retries}"
    )


def test_overlapping_compactions_never_duplicate_rows(lake_settings: Settings) -> None:
    """Three maintenances at once (a scheduled run overlapping a manual one, say) while
    the stream appends: delta-rs alone commits every compaction of the same small files
    and each compacted row ends up in two or three files (`storage.delta.locks`)."""
    store = DeltaStore.from_settings(lake_settings)
    store.ensure_tables()
    _allow_zero_retention(store)

    def append(partition: int, batches: int) -> None:
        for b in range(batches):
            offsets = list(range(b * BATCH_ROWS, (b + 1) * BATCH_ROWS))
            events = [_event(partition, o) for o in offsets]
            data = events_to_table(events, partition=partition, offsets=offsets)
            store.append("events", data, app_id=f"bronze-p{partition}", batch_version=offsets[-1])

    append(0, 20)  # twenty small files for the first compactions to fight over
    start = threading.Barrier(4)
    results: list[dict[str, Any]] = []

    def maintain() -> None:
        start.wait()
        for _ in range(2):
            results.append(store.maintain("events", retention_hours=0))

    def stream() -> None:
        start.wait()
        append(1, 20)

    errors: list[BaseException] = []
    threads = [threading.Thread(target=_recorded(f, errors)) for f in (*[maintain] * 3, stream)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    ids = _table(store, "events").to_pyarrow_table(columns=["event_id"]).column(0)
    assert len(ids) == len(set(ids.to_pylist())) == 40 * BATCH_ROWS
    assert sum(r["compact"]["numFilesRemoved"] for r in results) >= 20
    assert sum(r["vacuumed_files"] for r in results) > 0


def test_maintenance_runs_wait_for_other_writer_runs(settings: Settings) -> None:
    """The queue in dagster.yaml starts one `nextbest/writer` run at a time; maintenance
    (Delta compaction, LanceDB `items`) and retraining (Delta gold, LanceDB `items`,
    cached decisions) must both carry the tag, or a schedule and a manual launch overlap."""
    config = yaml.safe_load((ROOT / "definitions" / "dagster.yaml").read_text())
    limits = config["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert {"key": "nextbest/writer", "limit": 1} in limits
    defs = build_definitions(settings, load_spec(settings.spec))
    for name in ("retrain", "maintenance"):
        assert "nextbest/writer" in defs.resolve_job_def(name).run_tags, name
