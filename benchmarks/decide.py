"""Open-loop load test of /v1/decide while events stream in.

    .venv/bin/python benchmarks/decide.py [--rate 300] [--events-rate 2000] [--seconds 10]
                                          [--preset small|medium] [--search] [--home DIR]

Builds a data home from the deterministic demo shop (catalog in Delta, an EASE model
trained and promoted, online state for every demo user written as the stream would),
starts the API under uvicorn in its own process, and drives it from this process at a
fixed arrival rate: request i is due at start + i / rate whatever happened to earlier
ones, and its latency is measured from that due time (so client-side queueing counts;
no coordinated omission). Events are posted at a second fixed rate in batches. A raw
HTTP/1.1 keep-alive client on uvloop keeps the generator's own cost low; on a 2-core
machine it still shares the CPUs with the server, which the figures include.

`--search` then steps the decision rate up until a step is not sustained (achieved
< 95% of offered, errors, or p99 above --p99-limit-ms) and reports the last good rate.
"""

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import uvloop

from benchmarks.openloop import Pool, Stream, head, open_loop, summary
from nextbest.demo.shop import DemoConfig, generate_items, iter_event_dicts
from nextbest.features.state import SessionState
from nextbest.learn.model import fit, interaction_matrix
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from nextbest.spec.models import Spec, WindowFeature
from storage.delta.store import DeltaStore
from storage.online.models import FeatureRow, UserState
from storage.online.store import OnlineStore

ROOT = Path(__file__).resolve().parents[1]


# --- data home --------------------------------------------------------------------------


def promote_model(
    settings: Settings, spec: Spec, items: list[dict], events: list[dict], actor: list[str]
) -> None:
    """Fit the spec's item model on `events` (by `actor`) and promote it as `bench`."""
    ids = [i["item_id"] for i in items]
    x, _ = interaction_matrix(
        actor,
        [e["item_id"] for e in events],
        [spec.events[e["type"]].weight for e in events],
        item_ids=ids,
    )
    model = fit(
        x, item_ids=ids, groups=[i["category"] for i in items], params=spec.model, version="bench"
    )
    path = model.save(settings.home_dir / "models" / "bench.npz")
    store = OnlineStore.from_settings(settings)
    try:
        store.register_model(version="bench", artifact_path=str(path))
        store.promote_model("bench")
    finally:
        store.dispose()


def build_home(settings: Settings, spec: Spec, cfg: DemoConfig) -> tuple[list[str], list[str]]:
    """Catalog, promoted model and online state; returns (user ids, item ids)."""
    items = generate_items(cfg)
    now = datetime.now(UTC)
    delta = DeltaStore.from_settings(settings)
    delta.write(
        "items", pa.Table.from_pylist([{**i, "updated_at": now} for i in items]), mode="overwrite"
    )
    events = [e for e in iter_event_dicts(cfg) if e["item_id"] and spec.events[e["type"]].weight]
    actor = [e["user_id"] or f"anon:{e['anonymous_id']}" for e in events]
    promote_model(settings, spec, items, events, actor)
    # The state the stream would hold: each user's last 30 interactions, as of "now".
    per_user: dict[str, list[dict]] = {}
    for a, e in zip(actor, events, strict=True):
        per_user.setdefault(a, []).append(e)
    now_ms = int(time.time() * 1000)
    states, features = [], []
    counted = [
        n
        for n, f in spec.features.items()
        if isinstance(f, WindowFeature) and f.entity == "user" and not f.group_by
    ]
    for user, evs in per_user.items():
        last = evs[-30:][::-1]
        history = [[e["item_id"], e["type"], now_ms - n * 5000] for n, e in enumerate(last)]
        seen: dict[str, list[str]] = {}
        for e in last:
            seen.setdefault(e["type"], []).append(e["item_id"])
        recent = list(dict.fromkeys(e["item_id"] for e in last))[:20]
        session = {
            "session_id": f"s-{user}",
            "last_ts_ms": now_ms,
            "history": history,
            "seen": seen,
        }
        states.append(UserState(user, now_ms, recent, SessionState.load(session), None))
        features.extend(FeatureRow(user, name, float(len(last) % 7), now_ms) for name in counted)
    store = OnlineStore.from_settings(settings)
    store.upsert_states(states)
    store.upsert_features(features)
    store.dispose()
    return list(per_user), [i["item_id"] for i in items]


def create_admin_key(settings: Settings) -> str:
    from serving.keys import create_key

    store = OnlineStore.from_settings(settings)
    try:
        return create_key(store, ["admin"])
    finally:
        store.dispose()


def start_api(home: Path, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "NEXTBEST_HOME": str(home),
        "NEXTBEST_SPEC": str(ROOT / "nextbest.yaml"),
        "NEXTBEST_API_PORT": str(port),
    }
    code = (
        "from nextbest.settings import Settings; from serving.run import run_api; "
        "run_api(Settings(), log_level='warning')"
    )
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)


async def run_step(
    *,
    port: int,
    key: str,
    users: list[str],
    items: list[str],
    rate: float,
    events_rate: float,
    batch: int,
    seconds: float,
    seed: int,
) -> tuple[dict, dict | None]:
    rng = random.Random(seed)
    decide_pool, event_pool = Pool("127.0.0.1", port, 512), Pool("127.0.0.1", port, 64)
    counter = [0]

    def decide_body() -> bytes:
        user = rng.choice(users) if rng.random() < 0.9 else f"new-{rng.randrange(10**9)}"
        return json.dumps({"user_id": user, "k": 10}).encode()

    def events_body() -> bytes:
        ts = time.time()
        evs = []
        for _ in range(batch):
            counter[0] += 1
            evs.append(
                {
                    "type": "view",
                    "user_id": rng.choice(users),
                    "item_id": rng.choice(items),
                    "ts": ts,
                }
            )
        return json.dumps({"events": evs}).encode()

    await decide_pool.warm(max(8, int(rate / 50)))
    await event_pool.warm(4)
    d, e = Stream(), Stream()
    jobs = [
        open_loop(
            decide_pool, rate, seconds, decide_body, head("/v1/decide", key), d, track_served=True
        )
    ]
    if events_rate > 0:
        jobs.append(
            open_loop(
                event_pool, events_rate / batch, seconds, events_body, head("/v1/events", key), e
            )
        )
    walls = await asyncio.gather(*jobs)
    for p in (decide_pool, event_pool):
        for c in p.idle:
            c.close()
    dec = summary("decide", d, rate, walls[0])
    ev = (
        summary(f"events (batches of {batch})", e, events_rate, walls[1], batch)
        if events_rate > 0
        else None
    )
    return dec, ev


def cpu_split(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(utime, stime) of a process and its threads, or of one thread (Linux /proc), s."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads (Linux /proc), in seconds."""
    return sum(cpu_split(pid))


def measured_step(pid: int, **kw) -> tuple[dict, dict | None, str]:
    load = os.getloadavg()[0]
    (u0, s0), (m0, _) = cpu_split(pid), cpu_split(pid, pid)
    cpu0, t0, me0 = u0 + s0, time.monotonic(), cpu_seconds(os.getpid())
    dec, ev = asyncio.run(run_step(**kw))
    (u1, s1), (m1, _) = cpu_split(pid), cpu_split(pid, pid)
    cpu = u1 + s1 - cpu0
    wall = time.monotonic() - t0
    client = cpu_seconds(os.getpid()) - me0
    note = (
        f"server CPU {cpu / wall * 100:.0f}% of one core "
        f"({cpu / max(1, len(dec['statuses']) and sum(dec['statuses'].values())) * 1e6:.0f} us "
        f"per decision incl. event ingest; user {(u1 - u0) / wall * 100:.0f}%, system "
        f"{(s1 - s0) / wall * 100:.0f}%, event-loop thread user {(m1 - m0) / wall * 100:.0f}%); "
        f"load generator {client / wall * 100:.0f}%; "
        f"1-min load average before the step {load:.1f} on {os.cpu_count()} CPUs"
    )
    return dec, ev, note


def wait_ready(port: int, key: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/decide",
                json={"user_id": "warm"},
                headers={"X-API-Key": key},
            )
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("API did not come up")


def print_table(rows: list[dict]) -> None:
    cols = ["stream", "offered/s", "achieved/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "errors"]
    print(" | ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r.get(c)!s:>12}" for c in cols), r.get("served_from", ""))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rate", type=float, default=300.0, help="decisions/s offered")
    ap.add_argument("--events-rate", type=float, default=2000.0, help="events/s offered")
    ap.add_argument("--batch", type=int, default=100, help="events per POST")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--preset", choices=["small", "medium"], default="small")
    ap.add_argument("--search", action="store_true", help="find the max sustainable decisions/s")
    ap.add_argument("--search-rates", default="500,1000,1500,2000,2500,3000,4000")
    ap.add_argument("--search-seconds", type=float, default=5.0)
    ap.add_argument("--p99-limit-ms", type=float, default=50.0, help="sustainable: p99 under this")
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--home", help="data home (default: a temporary directory)")
    args = ap.parse_args()

    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="nb-bench-")) / "home"
    settings = Settings(home=home, spec=ROOT / "nextbest.yaml", _env_file=None)  # type: ignore[call-arg]
    spec = load_spec(settings.spec)
    cfg = DemoConfig.small() if args.preset == "small" else DemoConfig.medium()
    t0 = time.perf_counter()
    users, items = build_home(settings, spec, cfg)
    key = create_admin_key(settings)
    print(
        f"data home {home}: {len(users)} users with state, {len(items)} items "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    server = start_api(home, args.port)
    try:
        wait_ready(args.port, key)
        uvloop.install()
        warm = {"port": args.port, "key": key, "users": users, "items": items, "batch": args.batch}
        asyncio.run(run_step(rate=100, events_rate=0, seconds=2, seed=0, **warm))  # warm-up
        common = {
            "port": args.port,
            "key": key,
            "users": users,
            "items": items,
            "batch": args.batch,
        }
        dec, ev, note = measured_step(
            server.pid,
            rate=args.rate,
            events_rate=args.events_rate,
            seconds=args.seconds,
            seed=1,
            **common,
        )
        print(
            f"\n/v1/decide at {args.rate:g}/s with {args.events_rate:g} events/s "
            f"for {args.seconds:g}s"
        )
        print_table([r for r in (dec, ev) if r])
        print("statuses:", dec["statuses"], ev["statuses"] if ev else "")
        print(note)
        if args.search:
            print(
                f"\nmax sustainable decisions/s (with {args.events_rate:g} events/s; "
                f"p99 <= {args.p99_limit_ms:g} ms)"
            )
            best = 0.0
            rows: list[dict] = []
            notes: list[str] = []
            for rate in (float(r) for r in args.search_rates.split(",")):
                dec, ev, note = measured_step(
                    server.pid,
                    rate=rate,
                    events_rate=args.events_rate,
                    seconds=args.search_seconds,
                    seed=int(rate),
                    **common,
                )
                rows.extend(r for r in (dec, ev) if r)
                notes.append(f"{rate:g}/s: {note}")
                ok = (
                    dec["achieved/s"] >= 0.95 * rate
                    and dec["errors"] == 0
                    and (dec["p99 ms"] or 1e9) <= args.p99_limit_ms
                )
                if not ok:
                    break
                best = rate
            print_table(rows)
            print("\n".join(notes))
            print(f"max sustainable: {best:g} decisions/s")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
