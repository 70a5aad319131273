"""The recovery part of an erasure (`pipelines.erasure_recovery`, issue 12): the gate
ends a running dataflow cleanly and the next run resumes exactly where it stopped (the
stream restarts around the scrub without losing or repeating a record), and the scrub
leaves no byte of an erased id in a recovery partition: not in a sink's pending
batches, not in free pages, not in the WAL."""

import pickle
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, run_main

from nextbest.settings import Settings
from pipelines.erasure_recovery import SCRUB_ATTEMPTS, ScrubGate, scrub_recovery
from pipelines.records import Erase
from pipelines.recovery_scrub import NOTHING_PENDING, scrub_all
from pipelines.run import ensure_recovery_dir

N = 12
STOP_AFTER = 5
REQUEST = Erase(user_id="u-gone", job_id="job-1", anonymous_ids=())


class _Counting(StatefulSourcePartition[int, int]):
    """Emits next, next+1, ... up to N; past `fire_at`, says an erasure is ready (as the
    lake sink's writer does once the stream's stores are erased)."""

    def __init__(self, gate: ScrubGate, start: int, fire_at: int | None) -> None:
        self._gate = gate
        self._next = start
        self._fire_at = fire_at

    def next_batch(self) -> list[int]:
        if self._next >= N:
            raise StopIteration()
        if self._next == self._fire_at:
            self._gate.ready(Settings(_env_file=None), REQUEST)  # type: ignore[call-arg]
        self._next += 1
        return [self._next - 1]

    def next_awake(self) -> datetime | None:
        return datetime.now(UTC) + timedelta(milliseconds=5)

    def snapshot(self) -> int:
        return self._next


class _Source(FixedPartitionedSource[int, int]):
    def __init__(self, gate: ScrubGate, fire_at: int | None) -> None:
        self._gate = gate
        self._fire_at = fire_at

    def list_parts(self) -> list[str]:
        return ["p0"]

    def build_part(self, step_id: str, for_part: str, resume: int | None) -> _Counting:
        return _Counting(self._gate, resume or 0, self._fire_at)


def _run(gate: ScrubGate, recovery: RecoveryConfig, fire_at: int | None) -> list[int]:
    out: list[int] = []
    flow = Dataflow("gated")
    items = op.input("in", flow, gate.wrap(_Source(gate, fire_at)))
    op.output("out", op.map("same", items, lambda x: x), TestingSink(out))
    run_main(flow, epoch_interval=timedelta(milliseconds=20), recovery_config=recovery)
    return out


def test_the_gate_ends_the_run_and_the_next_resumes_where_it_stopped(tmp_path: Path) -> None:
    gate = ScrubGate()
    gate.enabled = True
    init_db_dir(tmp_path, 1)
    recovery = RecoveryConfig(tmp_path)
    first = _run(gate, recovery, fire_at=STOP_AFTER)
    assert gate.take() == [REQUEST]
    assert first and first[-1] < N - 1, "the gate should have ended the run early"
    second = _run(gate, recovery, fire_at=None)
    assert first + second == list(range(N))  # nothing lost, nothing read twice
    assert gate.take() == []


def _part(path: Path) -> Path:
    init_db_dir(path, 1)
    return path / "part-0.sqlite3"


def test_the_scrub_leaves_no_byte_of_the_id_in_a_partition(tmp_path: Path) -> None:
    part = _part(tmp_path)
    pending = pickle.dumps([{"user_id": "u-gone", "rows": 3}, {"user_id": "u-other"}])
    untouched = pickle.dumps([{"user_id": "u-other"}])
    insert = "INSERT INTO snaps (step_id, state_key, snap_epoch, ser_change) VALUES (?, ?, ?, ?)"
    with sqlite3.connect(part) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(insert, ("flow.sink_lake", "lake000", 3, pending))
        db.execute(insert, ("flow.sink_lake", "lake001", 3, untouched))
        db.execute(insert, ("flow.state_user", "k1", 2, b"old state of u-gone" * 50))
        db.execute("DELETE FROM snaps WHERE state_key = 'k1'")  # what Bytewax's GC leaves
    db.close()
    assert any(b"u-gone" in p.read_bytes() for p in tmp_path.iterdir() if p.is_file())

    out = scrub_all(str(tmp_path), {"job-1": [b"u-gone"]}, {"sink_lake"})

    assert out == {"parts": 1, "changed": 1, "holders": {"job-1": []}}
    with sqlite3.connect(f"file:{part}?mode=ro", uri=True) as db:
        snaps = dict(db.execute("SELECT state_key, ser_change FROM snaps").fetchall())
    db.close()
    assert snaps == {"lake000": NOTHING_PENDING, "lake001": untouched}


def test_a_burst_of_erasures_ends_the_run_once_per_interval() -> None:
    gate = ScrubGate(min_interval_s=3600)
    gate.enabled = True
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    gate.ready(settings, REQUEST)
    assert gate.stopping  # the first ends the run at once
    assert gate.take() == [REQUEST] and not gate.stopping
    later = REQUEST._replace(job_id="job-2")
    gate.ready(settings, later)
    assert not gate.stopping  # queued: the stream is not restarted again right away
    assert gate.take() == [later]


def test_a_scrub_that_leaves_an_id_is_tried_again_then_left_pending(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", _env_file=None)  # type: ignore[call-arg]
    ensure_recovery_dir(settings.recovery_dir, partitions=1)
    (settings.recovery_dir / "stray").write_bytes(b"held by u-gone")  # no scrub removes it
    gate = ScrubGate(min_interval_s=0)
    gate.enabled = True
    scrubs = 0
    requests = [REQUEST]
    while requests:
        scrub_recovery(settings, requests, gate)
        scrubs += 1
        requests = gate.take()
    assert scrubs == SCRUB_ATTEMPTS
