"""Stream benchmark: sustained events/s through the flow, and event-to-online freshness.

    .venv/bin/python -m benchmarks.stream [--events 100000] [--rate 2000] [--seconds 15]

1. Throughput: N demo events are appended to the embedded log first, then the flow
   (log -> parse -> stitching -> state -> Delta bronze + online store + LanceDB users)
   runs as `python -m pipelines --stop-at-end` with recovery on; events/s = N / wall
   time of that process (start-up included, reported separately).
2. Freshness: a tailing `python -m pipelines` process; events are appended at a fixed
   offered rate with ts = now; a poller reads `UserState.event_ts_ms` of sampled users
   from the online store until it reaches the sampled event's ts. Freshness = time seen
   in the store - time the append returned (durable in the log).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from nextbest.demo.shop import DemoConfig, iter_event_dicts
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from storage.delta.store import DeltaStore
from storage.eventlog.log import EventLog
from storage.online.store import OnlineStore
from tests.support.stream_helpers import encode, write_catalog

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXTBEST_", "BYTEWAX_"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


EPOCH_MS: list[int] = []  # set by --epoch-ms; empty: the stream's default


def _stream(home: Path, *args: str) -> subprocess.Popen[bytes]:
    epoch = [f"--epoch-ms={EPOCH_MS[0]}"] if EPOCH_MS else []
    argv = [
        sys.executable,
        "-m",
        "pipelines",
        "--home",
        str(home),
        "--spec",
        str(ROOT / "nextbest.yaml"),
        *epoch,
    ]
    return subprocess.Popen([*argv, *args], cwd=ROOT, env=_env())


def throughput(home: Path, n_events: int) -> dict[str, float]:
    settings = Settings(home=home, _env_file=None)  # type: ignore[call-arg]
    spec = load_spec(ROOT / "nextbest.yaml")
    cfg = DemoConfig.medium(n_events=n_events)
    write_catalog(settings, spec, cfg, vectors=True)
    with EventLog.from_settings(settings, mode="writer") as log:
        batch = []
        for event in iter_event_dicts(cfg):
            batch.append(encode(event))
            if len(batch) == 5000:
                log.append(batch)
                batch = []
        if batch:
            log.append(batch)
    # Start-up cost alone: the same command on an empty log.
    empty = Path(tempfile.mkdtemp(prefix="nb-empty-"))
    t0 = time.perf_counter()
    _stream(empty, "--stop-at-end").wait()
    startup = time.perf_counter() - t0

    t0 = time.perf_counter()
    code = _stream(home, "--stop-at-end").wait()
    wall = time.perf_counter() - t0
    assert code == 0, f"stream exited {code}"
    bronze = DeltaStore.from_settings(settings).count("events")
    assert bronze == n_events, f"bronze holds {bronze} of {n_events}"
    return {
        "events": n_events,
        "wall_s": wall,
        "startup_s": startup,
        "events_per_s": n_events / wall,
        "events_per_s_steady": n_events / max(wall - startup, 1e-9),
    }


def freshness(home: Path, rate: int, seconds: float) -> dict[str, float]:
    settings = Settings(home=home, _env_file=None)  # type: ignore[call-arg]
    spec = load_spec(ROOT / "nextbest.yaml")
    cfg = DemoConfig.medium(n_events=0)
    items = list(write_catalog(settings, spec, cfg, vectors=True))
    users = [f"fresh-{i:05d}" for i in range(10_000)]
    log = EventLog.from_settings(settings, mode="writer")
    proc = _stream(home)
    online = OnlineStore.from_settings(settings)
    try:
        # Wait until the stream is up: one warm-up event must reach the store.
        _append(log, [_view("warm", random.choice(items), time.time())])
        _await_state(online, "warm", 0, timeout=60)

        pending: dict[str, tuple[int, float]] = {}  # user -> (ts_ms, appended_at)
        lock = threading.Lock()
        latencies: list[float] = []
        done = threading.Event()

        def poll() -> None:
            while not (done.is_set() and not pending):
                with lock:
                    batch = dict(pending)
                if not batch:
                    time.sleep(0.002)
                    continue
                states = online.get_states(list(batch))
                now = time.perf_counter()
                with lock:
                    for user, (ts_ms, appended) in batch.items():
                        state = states.get(user)
                        if state is not None and state.event_ts_ms >= ts_ms and user in pending:
                            latencies.append(now - appended)
                            del pending[user]
                time.sleep(0.002)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        tick = 0.01
        per_tick = max(1, int(rate * tick))
        start = time.perf_counter()
        sent = 0
        rng = random.Random(3)
        while time.perf_counter() - start < seconds:
            target = start + (sent // per_tick) * tick
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            now = time.time()
            chunk = [_view(rng.choice(users), rng.choice(items), now) for _ in range(per_tick)]
            sample = chunk[0]
            _append(log, chunk)
            appended = time.perf_counter()
            with lock:
                if sample["user_id"] not in pending:
                    pending[sample["user_id"]] = (_ts_ms(sample), appended)
            sent += per_tick
        offered = sent / (time.perf_counter() - start)
        done.set()
        poller.join(timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        online.dispose()
    ms = np.array(latencies) * 1000
    return {
        "offered_per_s": offered,
        "samples": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


_seq = iter(range(10**12))


def _view(user: str, item: str, ts: float) -> dict:
    return {
        "event_id": f"fresh-{next(_seq)}",
        "type": "view",
        "user_id": user,
        "anonymous_id": None,
        "item_id": item,
        "ts": datetime.fromtimestamp(ts, UTC).isoformat(),
        "value": None,
        "context": {"session_id": f"s-{user}"},
        "properties": {},
    }


def _ts_ms(event: dict) -> int:
    return int(datetime.fromisoformat(event["ts"]).timestamp() * 1000)


def _append(log: EventLog, events: list[dict]) -> None:
    log.append([encode(e) for e in events])


def _await_state(online: OnlineStore, user: str, ts_ms: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = online.get_state(user)
        if state is not None and state.event_ts_ms >= ts_ms:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no online state for {user!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--epoch-ms", type=int, default=None, help="stream snapshot interval")
    args = parser.parse_args()
    if args.epoch_ms is not None:
        EPOCH_MS.append(args.epoch_ms)
    with tempfile.TemporaryDirectory(prefix="nb-stream-") as tmp:
        t = throughput(Path(tmp) / "throughput", args.events)
        f = freshness(Path(tmp) / "freshness", args.rate, args.seconds)
    rows = [
        ("throughput: events", f"{t['events']:,}"),
        ("throughput: wall time (s, incl. start-up)", f"{t['wall_s']:.1f}"),
        ("throughput: process start-up (s)", f"{t['startup_s']:.1f}"),
        ("throughput: events/s (wall)", f"{t['events_per_s']:,.0f}"),
        ("throughput: events/s (excl. start-up)", f"{t['events_per_s_steady']:,.0f}"),
        ("freshness: offered events/s", f"{f['offered_per_s']:,.0f}"),
        ("freshness: samples", f"{f['samples']}"),
        ("freshness: p50 (ms)", f"{f['p50_ms']:.1f}"),
        ("freshness: p95 (ms)", f"{f['p95_ms']:.1f}"),
        ("freshness: p99 (ms)", f"{f['p99_ms']:.1f}"),
        ("freshness: max (ms)", f"{f['max_ms']:.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'metric':<{width}}  value")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(json.dumps({"throughput": t, "freshness": f}))


if __name__ == "__main__":
    main()
