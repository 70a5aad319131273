"""Run the stream: `run_stream(settings, spec)` (what `nextbest stream` calls) and the
`python -m pipelines` entry point used for cluster and crash tests.

Recovery lives under `settings.recovery_dir`. Bytewax 0.21 needs its recovery
partitions created before the first run (`bytewax.recovery.init_db_dir`), and that
call is not idempotent (a second call fails on a UNIQUE constraint), so
`ensure_recovery_dir` creates them once: under a file lock (cluster processes start
together), into a temporary directory renamed into place (a crash mid-init leaves no
half-made directory).
"""

import argparse
import fcntl
import os
import shutil
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main

from nextbest.settings import Settings
from nextbest.spec import Spec
from pipelines.flow import build_flow
from pipelines.gctune import tune_for_stream

RECOVERY_PARTITIONS = 4
"""Fixed at first start; Bytewax suggests the most workers you will ever run."""


def recovery_ready(path: Path) -> bool:
    return path.is_dir() and any(path.glob("part-*.sqlite3"))


def ensure_recovery_dir(path: Path, *, partitions: int = RECOVERY_PARTITIONS) -> Path:
    """Create Bytewax's recovery partitions under `path` once; later calls are no-ops."""
    if recovery_ready(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.parent / f".{path.name}.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if recovery_ready(path):
            return path
        tmp = path.parent / f".{path.name}.init-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        init_db_dir(tmp, partitions)
        if path.exists():
            path.rmdir()  # an empty placeholder (e.g. from `nextbest init`)
        os.replace(tmp, path)
    return path


def run_stream(
    settings: Settings,
    spec: Spec,
    *,
    process_id: int | None = None,
    addresses: Sequence[str] | None = None,
    workers_per_process: int = 1,
    epoch_interval: timedelta = timedelta(seconds=1),
    tail: bool = True,
) -> None:
    """Run the dataflow until stopped (or, with `tail=False`, until the log's current end).

    One process: leave `process_id`/`addresses` unset. A cluster: every process gets
    the same `addresses` ("host:port" each) and its own `process_id`.
    """
    flow = build_flow(settings, spec, tail=tail)
    recovery = RecoveryConfig(ensure_recovery_dir(settings.recovery_dir))
    tune_for_stream()
    cli_main(
        flow,
        workers_per_process=workers_per_process,
        process_id=process_id,
        addresses=list(addresses) if addresses else None,
        epoch_interval=epoch_interval,
        recovery_config=recovery,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=run_stream.__doc__)
    parser.add_argument("--home", help="data home (default: NEXTBEST_HOME)")
    parser.add_argument("--spec", help="spec file (default: NEXTBEST_SPEC)")
    parser.add_argument("-i", "--process-id", type=int, default=None)
    parser.add_argument("-a", "--addresses", action="append", default=[], help="host:port")
    parser.add_argument("-w", "--workers", type=int, default=1, help="workers per process")
    parser.add_argument("--epoch-ms", type=int, default=1000, help="snapshot interval")
    parser.add_argument(
        "--stop-at-end", action="store_true", help="exit at the log's current end (no tail)"
    )
    args = parser.parse_args(argv)

    from nextbest.spec_loader import load_spec

    overrides: dict[str, object] = {}
    if args.home:
        overrides["home"] = Path(args.home)
    if args.spec:
        overrides["spec"] = Path(args.spec)
    settings = Settings(**overrides)  # type: ignore[arg-type]
    run_stream(
        settings,
        load_spec(settings.spec),
        process_id=args.process_id,
        addresses=args.addresses or None,
        workers_per_process=args.workers,
        epoch_interval=timedelta(milliseconds=args.epoch_ms),
        tail=not args.stop_at_end,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
