"""Demo generator throughput and peak memory: events/s and peak RSS per output API.

Each API runs in a fresh subprocess so its peak RSS is its own. Run:
`.venv/bin/python benchmarks/demo_gen.py [--events 1000000 --users 100000 --items 20000]`
(`--users 1000000 --items 100000` gives the large preset's world with fewer events).
"""

import argparse
import json
import resource
import subprocess
import sys
import time

MODES = ("arrow", "dicts", "jsonl", "events")


def run_one(mode: str, events: int, users: int, items: int) -> dict[str, float]:
    from nextbest.demo.arrow import iter_event_batches
    from nextbest.demo.shop import DemoConfig, iter_event_dicts, iter_events
    from nextbest.demo.world import world_for

    cfg = DemoConfig.large(n_events=events, n_users=users, n_items=items)
    t0 = time.perf_counter()
    world = world_for(cfg)
    _ = world.sessions, world.user_ids, world.item_ids
    t_world = time.perf_counter() - t0
    n = 0
    if mode == "arrow":
        for batch in iter_event_batches(cfg):
            n += batch.num_rows
    elif mode == "dicts":
        for _d in iter_event_dicts(cfg):
            n += 1
    elif mode == "jsonl":
        size = 0
        for d in iter_event_dicts(cfg):
            size += len(json.dumps(d, separators=(",", ":"))) + 1
            n += 1
    else:
        for _e in iter_events(cfg):
            n += 1
    total = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"events": n, "world_s": t_world, "total_s": total, "peak_rss_mb": peak_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.events, args.users, args.items)))
        return
    print(f"demo generator: {args.events:,} events, {args.users:,} users, {args.items:,} items")
    print(f"{'api':<8}{'events/s':>12}{'total s':>10}{'world s':>10}{'peak RSS MB':>14}")
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", mode, "--events", str(args.events)]
        cmd += ["--users", str(args.users), "--items", str(args.items)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rate = r["events"] / r["total_s"]
        print(
            f"{mode:<8}{rate:>12,.0f}{r['total_s']:>10.1f}{r['world_s']:>10.2f}"
            f"{r['peak_rss_mb']:>14,.0f}"
        )


if __name__ == "__main__":
    main()
