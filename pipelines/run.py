"""Run the stream: `run_stream(settings, spec)` (what `nextbest stream` calls) and the
`python -m pipelines` entry point used for cluster and crash tests.

Recovery lives under `settings.recovery_dir`. Bytewax 0.21 needs its recovery
partitions created before the first run (`bytewax.recovery.init_db_dir`), and that
call is not idempotent (a second call fails on a UNIQUE constraint), so
`ensure_recovery_dir` creates them once: under a file lock (cluster processes start
together), into a temporary directory renamed into place (a crash mid-init leaves no
half-made directory).

One stream instance per data home: `run_stream` takes the home's stream lock
(`nextbest.locks`) first, because two streams writing the same recovery partitions
leave them unresumable (`InconsistentPartitionsError` on every later start). If the
partitions still cannot be resumed, the stream says so, records why in
`<home>/recovery.broken` and exits with RECOVERY_BROKEN; `nextbest doctor
--reset-stream` clears them and the stream then replays the event log from its oldest
record (the sinks are idempotent, so nothing is written twice).
"""

import argparse
import fcntl
import os
import shutil
import sqlite3
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from bytewax.recovery import (
    InconsistentPartitionsError,
    MissingPartitionsError,
    NoPartitionsError,
    RecoveryConfig,
    init_db_dir,
)
from bytewax.run import cli_main

from nextbest.locks import AlreadyRunning, InstanceLock, stream_role
from nextbest.logs import configure_logging
from nextbest.settings import Settings
from nextbest.spec.models import Spec
from pipelines.cpushare import share_cpu
from pipelines.erasure_recovery import GATE, scrub_recovery
from pipelines.flow import build_flow
from pipelines.gctune import tune_for_stream
from pipelines.metrics import serve_metrics
from pipelines.status import BOARD

RECOVERY_PARTITIONS = 4
"""Fixed at first start; Bytewax suggests the most workers you will ever run."""
RECOVERY_BROKEN = 3
"""Exit code of a stream whose recovery partitions cannot be resumed."""
BROKEN_MARKER = "recovery.broken"
RESET_HINT = "run `nextbest doctor --reset-stream` (the stream then replays the event log)"


class RecoveryBroken(RuntimeError):
    """The recovery partitions cannot be resumed; the message says what to do."""


def recovery_problems(path: Path) -> list[str]:
    """What makes the partitions under `path` unresumable, read without Bytewax:
    missing partitions, partition counts that disagree, or the error the last start hit."""
    problems: list[str] = []
    marker = path.parent / BROKEN_MARKER
    if marker.exists():
        problems.append(f"the last stream start failed: {marker.read_text().strip()}")
    files = sorted(path.glob("part-*.sqlite3")) if path.is_dir() else []
    if not files:
        return problems
    counts: dict[int, int] = {}
    for file in files:
        try:
            with sqlite3.connect(f"file:{file}?mode=ro", uri=True) as conn:
                for index, count in conn.execute("select part_index, part_count from parts"):
                    counts[int(index)] = int(count)
        except sqlite3.Error as exc:
            problems.append(f"{file.name} is unreadable: {exc}")
    if len(set(counts.values())) > 1:
        problems.append(f"partition counts disagree: {sorted(set(counts.values()))}")
    elif counts:
        missing = sorted(set(range(next(iter(counts.values())))) - set(counts))
        if missing:
            problems.append(f"recovery partitions {missing} are missing")
    return problems


def reset_recovery(settings: Settings) -> bool:
    """Remove the recovery partitions (under the stream lock: never under a running
    stream); True when there was something to remove."""
    path = settings.recovery_dir
    with InstanceLock(settings.home_dir, stream_role(None)):
        existed = path.exists()
        if existed:
            trash = path.parent / f".{path.name}.reset-{os.getpid()}"
            os.replace(path, trash)  # atomic: a crash never leaves half a directory
            shutil.rmtree(trash, ignore_errors=True)
        (path.parent / BROKEN_MARKER).unlink(missing_ok=True)
    return existed


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

    Raises `AlreadyRunning` when another stream holds the home, `RecoveryBroken` when
    the recovery partitions cannot be resumed.
    """
    lock = InstanceLock(settings.home_dir, stream_role(process_id)).acquire()
    metrics = None
    try:
        problems = recovery_problems(settings.recovery_dir)
        if problems:
            raise RecoveryBroken(_broken_message(settings, "; ".join(problems)))
        share_cpu(settings)  # before any store is opened: its thread pools read it
        flow = build_flow(settings, spec, tail=tail)
        recovery = RecoveryConfig(ensure_recovery_dir(settings.recovery_dir))
        tune_for_stream()
        metrics = serve_metrics(settings, process_id, BOARD.positions)  # Prometheus
        # One process can end its dataflow alone to scrub erased users' recovery files
        # (`pipelines.erasure_recovery`): each run ends when one is due, then restarts.
        GATE.enabled = process_id is None and not addresses
        try:
            while True:
                cli_main(
                    flow,
                    workers_per_process=workers_per_process,
                    process_id=process_id,
                    addresses=list(addresses) if addresses else None,
                    epoch_interval=epoch_interval,
                    recovery_config=recovery,
                )
                erased = GATE.take()
                if not erased:
                    break
                scrub_recovery(settings, erased)
                flow = build_flow(settings, spec, tail=tail)
        except (InconsistentPartitionsError, MissingPartitionsError, NoPartitionsError) as exc:
            (settings.home_dir / BROKEN_MARKER).write_text(f"{type(exc).__name__}: {exc}\n")
            raise RecoveryBroken(_broken_message(settings, f"{type(exc).__name__}: {exc}")) from exc
    finally:
        if metrics is not None:
            metrics.close()
        lock.release()


def _broken_message(settings: Settings, why: str) -> str:
    return (
        f"the stream cannot resume from its recovery state in {settings.recovery_dir} "
        f"({why}); {RESET_HINT}"
    )


def run_stream_cli(settings: Settings, spec: Spec, **options: object) -> int:
    """`run_stream` for a command line: a clear line and an exit code instead of a
    traceback when the home is taken or the recovery state is broken."""
    from nextbest.locks import EXIT_LOCKED

    try:
        run_stream(settings, spec, **options)  # type: ignore[arg-type]
    except AlreadyRunning as exc:
        print(exc, file=sys.stderr, flush=True)
        return EXIT_LOCKED
    except RecoveryBroken as exc:
        print(exc, file=sys.stderr, flush=True)
        return RECOVERY_BROKEN
    return 0


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

    from nextbest.spec.loader import load_spec

    overrides: dict[str, object] = {}
    if args.home:
        overrides["home"] = Path(args.home)
    if args.spec:
        overrides["spec"] = Path(args.spec)
    settings = Settings(**overrides)  # type: ignore[arg-type]
    configure_logging(settings, "stream")
    return run_stream_cli(
        settings,
        load_spec(settings.spec),
        process_id=args.process_id,
        addresses=args.addresses or None,
        workers_per_process=args.workers,
        epoch_interval=timedelta(milliseconds=args.epoch_ms),
        tail=not args.stop_at_end,
    )


if __name__ == "__main__":
    sys.exit(main())
