"""Whole-stack load test: decisions and events against the stack as `nextbest up` runs it.

    .venv/bin/python -m benchmarks.stack [--seconds 10] [--steps default|quick]
        [--search] [--no-dagster] [--profile DIR] [--home DIR]

Unlike benchmarks/decide.py (the API alone over online state written up front), this
starts `nextbest stream` and `nextbest api` as child processes with the supervisor's
own commands, environment and process groups (`launcher.supervisor`), plus the
Dagster daemon idle beside them (`--no-dagster` leaves it out; the webserver is left
out: it only serves the UI). The data home is the issue's: 2,000 users, 1,000 items,
50k demo events ending now appended to the event log before the stream starts (the
stream builds every user's online state from them, as after `nextbest import` + `up`),
a model fitted on them and promoted. The load generator (benchmarks/openloop.py, open
loop: latency counts from each request's due time) shares the machine's 2 cores.

Each step waits for the stream to catch up first (lag 0 on /metrics), then reports:
decide p50/p99/max; the fallback share (`served_from` fallback or a non-empty
`degraded`) and the reasons; events accepted (202) of offered; freshness p50/p99 of
canary users (an event posted for a user no one else writes, then GET
/v1/users/{id}/features polled every 50 ms until its `state.event_ts` shows it: accepted
-> visible); and CPU per process from /proc (utime+stime of each process group) as a
share of one core, per decision and per event. Loopback only; every step is bounded.
`--profile DIR` records py-spy (raw collapsed stacks, per thread) of the API and the
stream during every loaded step (summarize them with `python -m benchmarks.spy`).
"""

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import uvloop

from benchmarks.decide import promote_model
from benchmarks.openloop import Conn, Pool, Stream, head, open_loop, summary
from launcher.stack import dagster_components, ensure_local_key, scrape, wait_code_server
from launcher.supervisor import Component, Supervisor, dagster_commands, nextbest_argv, run_step
from nextbest.demo.shop import DemoConfig, generate_items, iter_event_dicts
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from nextbest.spec.models import Spec
from tests.support.stream_helpers import append_log, write_catalog

ROOT = Path(__file__).resolve().parents[1]
CANARIES = 8
PROBE_EVERY_S, POLL_S, PROBE_TIMEOUT_S = 1.0, 0.05, 20.0
STEPS = {
    "default": [
        ("idle", 0, 0),
        ("events only", 0, 2000),
        ("300/s", 300, 0),
        ("300/s + 500 ev/s", 300, 500),
        ("300/s + 2000 ev/s", 300, 2000),
    ],
    "quick": [("300/s + 2000 ev/s", 300, 2000)],
    "decisions": [("idle", 0, 0), ("300/s", 300, 0)],
}


# --- the data home and the stack --------------------------------------------------------


def build_home(settings: Settings, cfg: DemoConfig) -> tuple[list[str], list[str]]:
    """`nextbest init`, the catalog, the history in the log, a promoted model."""
    spec = load_spec(settings.spec)
    run_step(settings, "init")
    items = generate_items(cfg)
    write_catalog(settings, spec, cfg, vectors=True)
    events = list(iter_event_dicts(cfg))
    append_log(settings, events)
    weighted = [e for e in events if e["item_id"] and spec.events[e["type"]].weight]
    actor = [e["user_id"] or f"anon:{e['anonymous_id']}" for e in weighted]
    promote_model(settings, spec, items, weighted, actor)
    write_cached_decisions(settings, spec, weighted, actor)
    users = sorted({e["user_id"] for e in events if e["user_id"]})
    return users, [i["item_id"] for i in items]


def write_cached_decisions(
    settings: Settings, spec: Spec, events: list[dict], actor: list[str]
) -> None:
    """What the `cached_decisions` asset of `nextbest materialize` writes: every user's
    top 10 by the promoted model, per item surface (the decide path's fallback)."""
    from definitions.assets.decisions import item_surfaces, top_actions
    from nextbest.learn.model import ItemModel
    from storage.delta.store import DeltaStore
    from storage.online.models import CachedDecision
    from storage.online.store import OnlineStore

    online = OnlineStore.from_settings(settings)
    try:
        promoted = online.promoted_model()
        assert promoted is not None and promoted.artifact_path
        model = ItemModel.load(promoted.artifact_path)
        history = (
            actor,
            [e["item_id"] for e in events],
            [spec.events[e["type"]].weight for e in events],
        )
        for surface, action in item_surfaces(spec):
            ranked = top_actions(
                spec, model, DeltaStore.from_settings(settings), history, k=10, action=action
            )
            online.put_cached_decisions(
                [
                    CachedDecision(u, a, model_version=promoted.version, surface=surface)
                    for u, a in ranked.items()
                ]
            )
    finally:
        online.dispose()


def start_stack(
    settings: Settings, *, dagster: bool, managed: bool = False
) -> tuple[Supervisor, dict[str, Component]]:
    """The components `nextbest up` starts, with its argv, env and process groups: the
    daemon reads the code location from the persistent code server `nextbest up` runs
    (`launcher.stack.dagster_components`), or with `managed` manages its own (`-m`,
    as before: a fresh import of the code location every 60 s)."""
    sup = Supervisor(settings)
    parts = {
        "stream": Component("stream", nextbest_argv("stream")),
        "api": Component("api", nextbest_argv("api"), ready_url=f"{settings.api_url}/health"),
    }
    if dagster and managed:
        parts["dagster"] = dagster_commands(settings)[1]  # the daemon
    elif dagster:
        (code, _web, daemon), port = dagster_components(settings)
        sup.start(code)
        if not wait_code_server(sup, code, port):
            sup.stop()
            raise RuntimeError(
                "the Dagster code server did not start:\n" + "\n".join(sup.log_tail(code))
            )
        parts["dagster-code"] = code
        parts["dagster"] = daemon
    for c in parts.values():
        if c.process is None:
            sup.start(c)
    if not sup.wait_ready(parts["api"]):
        sup.stop()
        raise RuntimeError("the API did not start:\n" + "\n".join(sup.log_tail(parts["api"])))
    return sup, parts


def wait_caught_up(settings: Settings, timeout_s: float = 120.0) -> float:
    """Seconds until the stream reports no pending events (as /metrics shows it)."""
    t0 = time.monotonic()
    zero_since: float | None = None
    while time.monotonic() - t0 < timeout_s:
        lag = scrape(f"{settings.api_url}/metrics").get("nextbest_stream_lag_events", -1)
        if lag == 0:
            zero_since = zero_since or time.monotonic()
            if time.monotonic() - zero_since >= 2.5:  # two heartbeats agree
                return zero_since - t0
        else:
            zero_since = None
        time.sleep(0.25)
    return float("nan")


def pid_of(component: Component) -> int:
    assert component.process is not None, f"{component.name} was not started"
    return component.process.pid


# --- CPU from /proc ---------------------------------------------------------------------


def group_cpu(pgid: int) -> float:
    """utime + stime + cutime + cstime (s) of every live process in a process group."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # own and reaped children's time: a code server
            total += sum(int(f) for f in fields[11:15])  # that exits stays counted
    return total / tick


# --- one step ---------------------------------------------------------------------------


async def freshness_probes(
    port: int, key: str, items: list[str], seconds: float, out: list[float]
) -> int:
    """Every PROBE_EVERY_S: an event for the next canary user, then poll its features
    until the event shows; appends accepted -> visible seconds to `out`."""
    rng = random.Random(5)
    post = head("/v1/events", key)
    polls = [0]

    async def probe(n: int) -> None:
        user = f"canary-{n % CANARIES}"
        ts = round(time.time(), 3)
        body = {
            "events": [{"type": "view", "user_id": user, "item_id": rng.choice(items), "ts": ts}]
        }
        conn = await Conn.open("127.0.0.1", port)
        try:
            status, _ = await conn.request(post, json.dumps(body).encode())
            if status != 202:
                return
            accepted = time.monotonic()
            get = (
                f"GET /v1/users/{user}/features HTTP/1.1\r\nHost: bench\r\n"
                f"X-API-Key: {key}\r\nContent-Length: "
            ).encode()
            while time.monotonic() - accepted < PROBE_TIMEOUT_S:
                await asyncio.sleep(POLL_S)
                polls[0] += 1
                status, reply = await conn.request(get, b"")
                if status == 200:
                    state = json.loads(reply).get("state") or {}
                    seen = datetime.fromisoformat(state["event_ts"]).timestamp()
                    if seen >= ts - 0.0005:
                        out.append(time.monotonic() - accepted)
                        return
            out.append(float("inf"))
        finally:
            conn.close()

    tasks = []
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds:
        tasks.append(asyncio.ensure_future(probe(n)))
        n += 1
        await asyncio.sleep(PROBE_EVERY_S)
    await asyncio.gather(*tasks)
    return polls[0]


async def drive(
    port: int,
    key: str,
    users: list[str],
    items: list[str],
    rate: float,
    ev_rate: float,
    seconds: float,
    batch: int,
    seed: int,
) -> dict[str, Any]:
    rng = random.Random(seed)
    d, e, fresh = Stream(), Stream(), []

    def decide_body() -> bytes:
        user = rng.choice(users) if rng.random() < 0.9 else f"new-{rng.randrange(10**9)}"
        return json.dumps({"user_id": user, "k": 10}).encode()

    def events_body() -> bytes:
        ts = round(time.time(), 3)
        evs = [
            {"type": "view", "user_id": rng.choice(users), "item_id": rng.choice(items), "ts": ts}
            for _ in range(batch)
        ]
        return json.dumps({"events": evs}).encode()

    pools = [Pool("127.0.0.1", port, 512), Pool("127.0.0.1", port, 64)]
    await pools[0].warm(max(8, int(rate / 50)))
    await pools[1].warm(4)
    jobs: list[Any] = [freshness_probes(port, key, items, seconds, fresh)]
    if rate:
        jobs.append(
            open_loop(
                pools[0], rate, seconds, decide_body, head("/v1/decide", key), d, track_served=True
            )
        )
    if ev_rate:
        jobs.append(
            open_loop(pools[1], ev_rate / batch, seconds, events_body, head("/v1/events", key), e)
        )
    done = await asyncio.gather(*jobs)
    for p in pools:
        for c in p.idle:
            c.close()
    return {"decide": d, "events": e, "fresh": fresh, "polls": done[0], "walls": done[1:]}


def measure(
    ctx: dict[str, Any], name: str, rate: float, ev_rate: float, seconds: float, seed: int
) -> dict[str, Any]:
    settings, parts = ctx["settings"], ctx["parts"]
    drain = wait_caught_up(settings)
    load = os.getloadavg()[0]
    cpu0 = {n: group_cpu(pid_of(c)) for n, c in parts.items()}
    me0, t0 = sum(os.times()[:2]), time.monotonic()
    profilers = _profile(ctx, parts, seconds, name) if ctx["profile"] and name != "idle" else []
    res = asyncio.run(
        drive(
            ctx["port"],
            ctx["key"],
            ctx["users"],
            ctx["items"],
            rate,
            ev_rate,
            seconds,
            ctx["batch"],
            seed,
        )
    )
    wall = time.monotonic() - t0
    for p in profilers:
        p.wait(timeout=60)
    cpu = {n: group_cpu(pid_of(c)) - cpu0[n] for n, c in parts.items()}
    cpu["loadgen"] = sum(os.times()[:2]) - me0
    d, e = res["decide"], res["events"]
    dec = summary("decide", d, rate, res["walls"][0]) if rate else {}
    n_dec = sum(d.statuses.values())
    n_ev = e.statuses.get(202, 0) * ctx["batch"]
    fresh = np.asarray(res["fresh"]) * 1000
    row = {
        "step": name,
        "load": load,
        "drain s": drain,
        "p50": dec.get("p50 ms"),
        "p99": dec.get("p99 ms"),
        "max": dec.get("max ms"),
        "fallback %": dec.get("fallback %"),
        "reasons": d.degraded,
        "served": d.served,
        "decide statuses": d.statuses,
        "events": f"{n_ev}/{int(ev_rate * seconds)}",
        "fresh p50": float(np.percentile(fresh, 50)) if len(fresh) else None,
        "fresh p99": float(np.percentile(fresh, 99)) if len(fresh) else None,
        "probes": len(fresh),
        "polls/s": res["polls"] / wall,
        "cpu %": {n: 100 * v / wall for n, v in cpu.items()},
        "us/decision": {n: 1e6 * cpu[n] / n_dec for n in ("api", "stream")} if n_dec else {},
        "us/event": {n: 1e6 * cpu[n] / n_ev for n in ("api", "stream")} if n_ev else {},
    }
    print_row(row)
    return row


def _profile(
    ctx: dict[str, Any], parts: dict[str, Component], seconds: float, step: str
) -> list[Any]:
    out = Path(ctx["profile"])
    out.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).parent / "py-spy")
    procs = []
    for name in ("api", "stream"):
        pid = pid_of(parts[name])
        argv = [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--format",
            "raw",
            "--rate",
            "100",
            "--subprocesses",
            "--threads",
            # --native pauses the process for each sample (py-spy cannot unwind native
            # frames of a running one); without it sampling does not stop the process.
            *(["--native"] if ctx["native"] else ["--nonblocking"]),
            "-o",
            str(out / f"{re.sub(r'[^0-9a-z]+', '-', step)}-{name}.txt"),
        ]
        log = open(out / "py-spy.log", "ab")  # noqa: SIM115 - the child owns it
        procs.append(subprocess.Popen(argv, stdout=log, stderr=log))
    return procs


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.0f}" if abs(v) >= 10 else f"{v:.1f}"
    if isinstance(v, dict):
        return ",".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return "-" if v is None else str(v)


COLS = ["step", "load", "p50", "p99", "max", "fallback %", "events", "fresh p50", "fresh p99"]


def print_row(row: dict[str, Any]) -> None:
    print(" | ".join(f"{_fmt(row[c]):>10}" for c in COLS), flush=True)
    for extra in ("cpu %", "us/decision", "us/event", "reasons", "served", "decide statuses"):
        if row[extra]:
            print(f"{'':>12}{extra}: {_fmt(row[extra])}", flush=True)
    print(
        f"{'':>12}drain before {_fmt(row['drain s'])} s, probes {row['probes']}, "
        f"feature polls {row['polls/s']:.0f}/s",
        flush=True,
    )


def print_cpu(rows: list[dict[str, Any]]) -> None:
    """CPU-seconds per decision and per event of each process (us), and each
    process's share of a core, per step. The cost of a step's whole traffic is
    charged to each unit: with both decisions and events running, read the steps
    with one kind alone for the cost of that kind."""
    procs = sorted({p for r in rows for p in r["cpu %"]})
    head = ["step", "api us/dec", "stream us/dec", "api us/ev", "stream us/ev"]
    print("\nCPU per process")
    print(" | ".join(f"{h:>18}" for h in head + [f"{p} %" for p in procs]))
    for r in rows:
        dec, ev = r["us/decision"], r["us/event"]
        cells = [r["step"], dec.get("api"), dec.get("stream"), ev.get("api"), ev.get("stream")]
        cells += [r["cpu %"].get(p) for p in procs]
        print(" | ".join(f"{_fmt(c):>18}" for c in cells), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=10.0, help="per step")
    ap.add_argument("--steps", choices=list(STEPS), default="default")
    ap.add_argument("--search", action="store_true", help="then step decisions/s up (2,000 ev/s)")
    ap.add_argument("--search-rates", default="300,500,800,1200")
    ap.add_argument("--p99-limit-ms", type=float, default=50.0)
    ap.add_argument("--batch", type=int, default=100, help="events per POST")
    ap.add_argument("--no-dagster", action="store_true", help="leave the Dagster daemon out")
    ap.add_argument(
        "--managed-dagster",
        action="store_true",
        help="the daemon loads the code itself (-m definitions), as before the code server",
    )
    ap.add_argument(
        "--cpu",
        action="store_true",
        help="end with a table of CPU per process: us per decision and per event, % of a core",
    )
    ap.add_argument("--profile", help="py-spy raw profiles of api and stream into this folder")
    ap.add_argument("--native", action="store_true", help="py-spy --native (Rust frames too)")
    ap.add_argument("--port", type=int, default=18791)
    ap.add_argument("--home", help="data home (default: a temporary directory)")
    args = ap.parse_args()

    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="nb-stack-")) / "home"
    os.environ.pop("NEXTBEST_API_KEY", None)
    settings = Settings(
        home=home,
        spec=ROOT / "nextbest.yaml",
        api_port=args.port,
        dagster_port=args.port + 1,
        _env_file=None,  # type: ignore[call-arg]
    )
    cfg = DemoConfig.small(n_users=2000, n_items=1000, n_events=50_000).ending_at()
    t0 = time.monotonic()
    users, items = build_home(settings, cfg)
    key = ensure_local_key(settings)
    print(
        f"data home {home}: {len(users)} users, {len(items)} items, {cfg.n_events} events "
        f"in the log ({time.monotonic() - t0:.0f} s)",
        flush=True,
    )
    from pydantic import SecretStr

    settings = settings.model_copy(update={"api_key": SecretStr(key)})
    sup, parts = start_stack(settings, dagster=not args.no_dagster, managed=args.managed_dagster)
    uvloop.install()
    ctx = {
        "settings": settings,
        "parts": parts,
        "port": args.port,
        "key": key,
        "users": users,
        "items": items,
        "batch": args.batch,
        "profile": args.profile,
        "native": args.native,
    }
    try:
        pids = ", ".join(
            f"{n} pid {pid_of(c)} ({len(os.listdir(f'/proc/{pid_of(c)}/task'))} threads)"
            for n, c in parts.items()
        )
        caught = wait_caught_up(settings, 300)
        print(f"stack up: {pids}; history caught up in {caught:.0f} s", flush=True)
        asyncio.run(drive(args.port, key, users, items, 100, 0, 2, args.batch, 0))  # warm-up
        print(" | ".join(f"{c:>10}" for c in COLS))
        rows = []
        for n, (name, rate, ev_rate) in enumerate(STEPS[args.steps]):
            rows.append(measure(ctx, name, rate, ev_rate, args.seconds, n + 1))
        if args.search:
            best = 0.0
            for rate in (float(r) for r in args.search_rates.split(",")):
                row = measure(ctx, f"{rate:g}/s + 2000 ev/s", rate, 2000, args.seconds, int(rate))
                rows.append(row)
                if (row["p99"] or 1e9) > args.p99_limit_ms or (row["fallback %"] or 0) > 5:
                    break
                best = rate
            print(
                f"highest decisions/s with p99 <= {args.p99_limit_ms:g} ms and <= 5% "
                f"fallbacks beside 2,000 ev/s: {best:g}"
            )
        if args.cpu:
            print_cpu(rows)
    finally:
        sup.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
