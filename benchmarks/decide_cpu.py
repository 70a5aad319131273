"""CPU cost of one /v1/decide, measured in process (no sockets, no load generator).

    .venv/bin/python benchmarks/decide_cpu.py [--n 3000] [--profile] [--top 40]

Builds the same data home as benchmarks/decide.py, opens the real app (lifespan,
middleware, stores, decision log) and calls it as an ASGI app on uvloop, one request
at a time. Reports process CPU (all threads: the snapshot readers and the decision
log writer included) per decision, which, unlike wall-clock latency, is barely
disturbed by other work on a shared machine. HTTP parsing by uvicorn is not included
(benchmarks/decide.py reports the server's whole CPU). `--profile` runs cProfile on
the event loop thread and prints the top functions by cumulative and own time.
"""

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvloop

from benchmarks.decide import ROOT, build_home, create_admin_key
from nextbest.demo.shop import DemoConfig
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec


def scope_for(path: str, key: str, body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"x-api-key", key.encode()),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 18765),
        "state": {},
    }


async def call(app: Any, key: str, body: bytes) -> tuple[int, bytes]:
    sent = False
    out: dict[str, Any] = {"status": 0, "body": b""}

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    await app(scope_for("/v1/decide", key, body), receive, send)
    return out["status"], out["body"]


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each live thread of this process by name (/proc, Linux): which
    of the loop, the snapshot readers and the decision log pays for a decision."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid)) or Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        name = "loop" if name == "MainThread" else name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


async def drive(app: Any, key: str, users: list[str], n: int, profile: bool) -> dict[str, Any]:
    rng = random.Random(1)
    bodies = [
        json.dumps(
            {
                "user_id": rng.choice(users)
                if rng.random() < 0.9
                else f"new-{rng.randrange(10**9)}",
                "k": 10,
            }
        ).encode()
        for _ in range(n)
    ]
    async with app.lifespan():
        runtime = app.state.runtime
        for body in bodies[:200]:  # warm-up: key cache, code paths
            await call(app, key, body)
        runtime.decision_log.flush()
        prof = cProfile.Profile() if profile else None
        statuses: dict[int, int] = {}
        cpu0, wall0, threads0 = time.process_time(), time.perf_counter(), thread_cpu()
        if prof is not None:
            prof.enable()
        for body in bodies:
            status, _ = await call(app, key, body)
            statuses[status] = statuses.get(status, 0) + 1
        runtime.decision_log.flush()
        if prof is not None:
            prof.disable()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        threads = {k: v - threads0.get(k, 0.0) for k, v in thread_cpu().items()}
    return {"cpu": cpu, "wall": wall, "statuses": statuses, "prof": prof, "threads": threads}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--preset", choices=["small", "medium"], default="small")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="nb-cpu-")) / "home"
    settings = Settings(home=home, spec=ROOT / "nextbest.yaml", _env_file=None)  # type: ignore[call-arg]
    spec = load_spec(settings.spec)
    cfg = DemoConfig.small() if args.preset == "small" else DemoConfig.medium()
    users, items = build_home(settings, spec, cfg)
    key = create_admin_key(settings)

    from serving.app import create_app

    app = create_app(settings, spec=spec, refresh_interval_s=3600)
    uvloop.install()
    r = asyncio.run(drive(app, key, users, args.n, args.profile))
    n = sum(r["statuses"].values())
    print(
        f"{n} decisions ({len(users)} users, {len(items)} items), statuses {r['statuses']}: "
        f"{r['cpu'] / n * 1e6:.0f} us CPU and {r['wall'] / n * 1e6:.0f} us wall per decision"
        + (" (under cProfile)" if args.profile else "")
    )
    busy = sorted(r["threads"].items(), key=lambda kv: -kv[1])
    print(
        "per thread, us per decision: " + ", ".join(f"{k} {v / n * 1e6:.0f}" for k, v in busy if v)
    )
    if r["prof"] is not None:
        stats = pstats.Stats(r["prof"]).strip_dirs()
        stats.sort_stats("cumulative").print_stats(args.top)
        stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
