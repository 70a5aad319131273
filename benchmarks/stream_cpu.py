"""Stream CPU per event: the whole flow in this process over a fixed demo event list.

    .venv/bin/python -m benchmarks.stream_cpu [--events 50000] [--decisions 0] [--batch 20]
        [--profile out.prof]

Wall-clock throughput is noisy on a shared machine; process CPU time per event is not
(much). The same deterministic demo events are appended to the embedded log, then the
real flow (log source, recovery on, 1 s epochs, Delta + online store + LanceDB sinks)
runs to the log's end in-process. CPU = `time.process_time()` across the run, which
counts every thread of the process (the sinks' background writers included), and
the worker thread's own CPU (`time.thread_time()`, what limits one worker's rate);
`--profile` adds a cProfile of the worker thread (sorted by cumulative time, top 40).
`--decisions N` interleaves N decision records shaped like the API's (10 actions, 20
arms, a 50-item pool: ~4.8 kB each) with the events, as `/v1/decide` traffic puts them
in the log; the difference to a run without them is the stream's cost per decision.
"""

import argparse
import cProfile
import json
import pstats
import random
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bytewax.recovery import RecoveryConfig
from bytewax.run import cli_main

from nextbest.demo.shop import DemoConfig, iter_event_dicts
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from pipelines.flow import build_flow
from pipelines.gctune import tune_for_stream
from pipelines.run import ensure_recovery_dir
from pipelines.sources import DEFAULT_BATCH, EventLogSource
from storage.delta.store import DeltaStore
from tests.support.stream_helpers import append_log, write_catalog

ROOT = Path(__file__).resolve().parents[1]


def decision_record(rng: random.Random, user: str, items: list[str]) -> dict[str, Any]:
    """A decision-log record with the layout and size `serving.decisions` logs."""
    shown = rng.sample(items, 20)
    pool = rng.sample(items, 50)
    return {
        "record": "decision",
        "decision_id": f"{rng.getrandbits(128):032x}",
        "user_id": user,
        "ts": datetime.now(UTC).isoformat(),
        "served_from": "realtime",
        "model_version": "bench",
        "actions": [
            {
                "action_id": "recommend",
                "item_id": i,
                "score": round(rng.random(), 6),
                "source": "model",
                "propensity": 1.0,
            }
            for i in shown[:10]
        ],
        "candidates": [
            {
                "action_id": "recommend",
                "item_id": i,
                "score": round(rng.random(), 6),
                "propensity": 0.0,
            }
            for i in shown
        ],
        "features": {
            "values": {f"f{n}": float(n) for n in range(5)},
            "feature_age_ms": 2000,
            "surface": "default",
            "context": {},
            "requested_user_id": user,
            "sources": ["model", "history"],
            "degraded": [],
            "pool": {
                "item_id": pool,
                "score": [round(rng.random(), 6) for _ in pool],
                "parts": {"model": [round(rng.random(), 6) for _ in pool]},
            },
            "exploration": {"strategy": "none", "epsilon": 0.0, "seed": 1},
        },
    }


def with_decisions(events: list[dict[str, Any]], n: int, items: list[str]) -> Iterator[Any]:
    """The events with `n` decision records spread evenly among them (keyed by user)."""
    rng = random.Random(3)
    total = max(len(events), 1)
    for i, event in enumerate(events):
        yield event
        user = event["user_id"] or f"anon:{event['anonymous_id']}"
        for _ in range((i + 1) * n // total - i * n // total):
            yield decision_record(rng, user, items)


def run(
    home: Path,
    n_events: int,
    profile: str | None,
    epoch_ms: int,
    *,
    default_gc: bool,
    batch: int,
    decisions: int = 0,
) -> dict[str, float]:
    settings = Settings(home=home, _env_file=None)  # type: ignore[call-arg]
    spec = load_spec(ROOT / "nextbest.yaml")
    cfg = DemoConfig.medium(n_events=n_events)
    catalog = write_catalog(settings, spec, cfg, vectors=True)
    events = list(iter_event_dicts(cfg))
    append_log(settings, with_decisions(events, decisions, sorted(catalog)), chunk=5000)
    source = EventLogSource(
        settings.eventlog_dir, partitions=settings.partitions, tail=False, batch_size=batch
    )
    flow = build_flow(settings, spec, source=source, tail=False)
    recovery = RecoveryConfig(ensure_recovery_dir(settings.recovery_dir))
    if not default_gc:
        tune_for_stream()  # as `pipelines.run.run_stream` does
    profiler = cProfile.Profile() if profile else None
    cpu0, wall0, worker0 = time.process_time(), time.perf_counter(), time.thread_time()
    if profiler is not None:
        profiler.enable()
    cli_main(
        flow,
        workers_per_process=1,
        epoch_interval=timedelta(milliseconds=epoch_ms),
        recovery_config=recovery,
    )
    if profiler is not None:
        profiler.disable()
    worker = time.thread_time() - worker0  # one worker: it runs on this thread
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    bronze = DeltaStore.from_settings(settings).count("events")
    assert bronze == n_events, f"bronze holds {bronze} of {n_events}"
    logged = DeltaStore.from_settings(settings).count("decisions") if decisions else 0
    assert logged == decisions, f"decisions holds {logged} of {decisions}"
    if profiler is not None and profile:
        profiler.dump_stats(profile)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    return {
        "events": n_events,
        "decisions": decisions,
        "cpu_s": cpu,
        "wall_s": wall,
        "cpu_us_per_event": cpu / n_events * 1e6,
        "worker_cpu_us_per_event": worker / n_events * 1e6,
        "events_per_cpu_s": n_events / cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--decisions", type=int, default=0, help="decision records among them")
    parser.add_argument("--epoch-ms", type=int, default=1000)
    parser.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH,
        help="records per source read; small (e.g. 20) mimics a live stream, where each "
        "key sees about one event per activation and per-key costs dominate",
    )
    parser.add_argument("--profile", help="write a cProfile here and print the top")
    parser.add_argument(
        "--default-gc", action="store_true", help="skip `pipelines.gctune` (to compare)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nb-stream-cpu-") as tmp:
        result = run(
            Path(tmp),
            args.events,
            args.profile,
            args.epoch_ms,
            default_gc=args.default_gc,
            batch=args.batch,
            decisions=args.decisions,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
