"""Full retrain time and peak memory on synthetic history (default 1M events, 100k users,
20k items).

    .venv/bin/python benchmarks/retrain.py [--events N] [--users N] [--items N]
        [--kind ease|item_knn] [--max-dense-items N] [--no-tune] [--home DIR]

Generates bronze events and a catalog straight into Delta (vectorised, not timed),
then runs the Dagster `retrain` job in-process and prints each asset's wall time, the
total, and the peak resident memory of the process (`resource.getrusage`). The model
follows the spec's rule: EASE while items <= max_dense_items, sparse item-kNN beyond.
By default `item_model` first tunes l2/half_life/kind (`model.tune`); `--no-tune` pins
the spec's values (the retrain as it was before self-tuning), for a before/after.
"""

import argparse
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from definitions import build_definitions  # noqa: E402
from definitions.batch.importer import items_table  # noqa: E402
from nextbest.settings import Settings  # noqa: E402
from nextbest.spec.loader import load_spec  # noqa: E402
from storage.delta.store import DeltaStore  # noqa: E402

CATEGORIES = 50
TYPES = np.array(["view", "add_to_cart", "purchase", "rate"])
TYPE_P = np.array([0.80, 0.12, 0.05, 0.03])
DAYS = 30
START = datetime(2025, 1, 1, tzinfo=UTC)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def item_categories(items: int, *, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 1).integers(0, CATEGORIES, items)


def synthetic_events(
    n: int, users: int, item_cat: np.ndarray, *, seed: int = 0, chunk: int = 250_000
):
    """Zipf-like user activity and item popularity; each user prefers two categories.
    Columns the table lacks (source_partition/offset) are filled by `DeltaStore`."""
    rng = np.random.default_rng(seed)
    user_w = 1.0 / np.arange(1, users + 1) ** 0.6
    user_w /= user_w.sum()
    by_cat = [np.flatnonzero(item_cat == c) for c in range(CATEGORIES)]
    favourite = rng.integers(0, CATEGORIES, (users, 2))
    start_ms = int(START.timestamp() * 1000)
    for offset in range(0, n, chunk):
        m = min(chunk, n - offset)
        u = rng.choice(users, m, p=user_w)
        cats = np.where(
            rng.random(m) < 0.7, favourite[u, rng.integers(0, 2, m)], rng.integers(0, CATEGORIES, m)
        )
        pick = rng.random(m) ** 2  # popular items (low index within a category) more often
        item = np.array(
            [
                by_cat[c][int(p * len(by_cat[c]))]
                for c, p in zip(cats.tolist(), pick.tolist(), strict=True)
            ]
        )
        kind = rng.choice(len(TYPES), m, p=TYPE_P)
        ts = start_ms + np.sort(rng.integers(0, DAYS * 86_400_000, m)) + 0  # roughly ordered
        ts_us = pa.array(ts * 1000, pa.timestamp("us", tz="UTC"))
        value = np.where(kind == 3, rng.integers(1, 6, m).astype(float), np.nan)
        yield pa.table(
            {
                "event_id": pa.array([f"b{offset + i}" for i in range(m)]),
                "type": pa.array(TYPES[kind]),
                "user_id": pa.array(np.char.add("u", u.astype(str))),
                "item_id": pa.array(np.char.add("i", item.astype(str))),
                "ts": ts_us,
                "value": pa.array(value, mask=np.isnan(value)),
                "context": pa.array(["{}"] * m),
                "properties": pa.array(["{}"] * m),
                "event_date": pa.compute.strftime(ts_us, format="%Y-%m-%d"),  # type: ignore[attr-defined]
                "ingested_at": pa.array([datetime.now(UTC)] * m, pa.timestamp("us", tz="UTC")),
            }
        )


def write_spec(home: Path, args: argparse.Namespace) -> Path:
    raw = yaml.safe_load((ROOT / "nextbest.yaml").read_text())
    model = raw.setdefault("model", {})
    model["kind"] = args.kind
    if args.max_dense_items is not None:
        model["max_dense_items"] = args.max_dense_items
    if args.no_tune:
        model["tune"] = False
    path = home / "bench-spec.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--kind", choices=["ease", "item_knn"], default="ease")
    parser.add_argument("--max-dense-items", type=int, default=None)
    parser.add_argument("--no-tune", action="store_true", help="pin the spec's l2/half_life")
    parser.add_argument("--home", type=Path, default=None, help="keep the data home here")
    args = parser.parse_args()

    base = args.home or Path(tempfile.mkdtemp(prefix="nextbest-retrain-"))
    base.mkdir(parents=True, exist_ok=True)
    spec_path = write_spec(base, args)
    settings = Settings(home=base / "home", spec=spec_path, _env_file=None)  # type: ignore[call-arg]
    spec = load_spec(spec_path)
    store = DeltaStore.from_settings(settings)
    store.ensure_tables()
    t0 = time.perf_counter()
    item_cat = item_categories(args.items)
    for i, table in enumerate(synthetic_events(args.events, args.users, item_cat)):
        store.append("events", table, app_id="bench", batch_version=i)
    rows = [
        {
            "item_id": f"i{j}",
            "category": f"c{item_cat[j]}",
            "price": float(j % 100),
            "in_stock": j % 10 != 0,
            "title": f"item {j}",
        }
        for j in range(args.items)
    ]
    store.merge("items", items_table(spec, rows), key="item_id")
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_mb()
    kind = (
        "item_knn" if args.kind == "item_knn" or args.items > spec.model.max_dense_items else "ease"
    )
    print(f"data: {store.count('events'):,} events, {args.users:,} users, {args.items:,} items "
          f"(generated and written in {load_s:.1f}s); model: {kind}")  # fmt: skip

    defs = build_definitions(settings, spec)
    job = defs.resolve_job_def("retrain")
    with dg.DagsterInstance.ephemeral() as instance:
        started = time.perf_counter()
        result = job.execute_in_process(instance=instance, raise_on_error=False)
        total = time.perf_counter() - started
        spans: dict[str, list[float]] = defaultdict(list)
        for entry in instance.all_logs(result.run_id):
            event = entry.dagster_event
            if event is not None and entry.step_key and event.event_type_value in (
                "STEP_START", "STEP_SUCCESS", "STEP_FAILURE",
            ):  # fmt: skip
                spans[entry.step_key].append(entry.timestamp)
    print(f"retrain run: {'SUCCESS' if result.success else 'FAILED'}")
    for step, stamps in sorted(spans.items(), key=lambda kv: min(kv[1])):
        print(f"  {step:<20} {max(stamps) - min(stamps):8.2f} s")
    print(f"total retrain wall time: {total:.1f} s")
    print(f"peak RSS: {peak_rss_mb():,.0f} MiB (after data generation: {rss_after_load:,.0f} MiB)")
    if args.home is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
