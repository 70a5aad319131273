"""The recovery store's SQLite work of an erasure, in a child process.

Run only between two runs of the dataflow, when Bytewax has no recovery file open
(`pipelines.erasure_recovery` says why nothing else is safe), and in a child process
all the same: the stream process never opens Bytewax's files with a second SQLite
library, whose closing a descriptor would drop Bytewax's POSIX locks
(sqlite.org/howtocorrupt.html 2.2.1).

Usage (by `pipelines.erasure_recovery.scrub_recovery`): `python -m pipelines.recovery_scrub`
with a JSON request on stdin ({"op": "scrub_all", "path": <recovery dir>, "subjects":
{job_id: [hex needle...]}, "sink_steps": [...]}, or "holders"/"scrub" for one step);
prints a JSON result. Imports nothing of the project and unpickles nothing.
"""

import json
import pickle
import sqlite3
import sys
from pathlib import Path
from typing import Any

BUSY_MS = 5000
NOTHING_PENDING = pickle.dumps([])
"""A sink partition's snapshot without pending batches (what its `snapshot()` returns)."""


def rewrite_sink_snapshots(conn: sqlite3.Connection, needles: list[bytes], steps: set[str]) -> int:
    """Empty the stateful sink snapshots that name an id.

    Bytewax snapshots a stateful sink partition only in epochs it received items, so a
    partition that got nothing since keeps its pending batches of back then (the user's
    rows, the erase request itself) in its newest snapshot, which GC never removes.
    Every pending batch of every snapshot was applied before this runs (the dataflow
    ended cleanly, and the sinks drain their FIFO writers on close), so emptying them
    changes nothing a resume would do but forget the user; nothing is unpickled."""
    changed = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = conn.execute(
            "SELECT step_id, state_key, snap_epoch, ser_change FROM snaps"
            " WHERE ser_change IS NOT NULL"
        ).fetchall()
        for step_id, key, epoch, blob in rows:
            if step_id.rsplit(".", 1)[-1] not in steps or not any(n in blob for n in needles):
                continue
            conn.execute(
                "UPDATE snaps SET ser_change = ? WHERE step_id = ? AND state_key = ?"
                " AND snap_epoch = ?",
                (NOTHING_PENDING, step_id, key, epoch),
            )
            changed += 1
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return changed


def scrub(path: str, needles: list[bytes], steps: set[str]) -> dict[str, Any]:
    """Drop the ids from sink snapshots, VACUUM (free pages), truncate the WAL."""
    conn = sqlite3.connect(path, timeout=BUSY_MS / 1000, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
        changed = rewrite_sink_snapshots(conn, needles, steps) if needles else 0
        conn.execute("VACUUM")
        busy, _frames, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return {"changed": changed, "checkpointed": busy == 0}
    finally:
        conn.close()


def holders(directory: str, needles: list[bytes]) -> list[str]:
    """Files of the recovery dir holding an id (read here, not in the stream process)."""
    found = []
    for path in sorted(Path(directory).iterdir()) if Path(directory).is_dir() else []:
        if needles and path.is_file() and any(n in path.read_bytes() for n in needles):
            found.append(path.name)
    return found


def scrub_all(directory: str, subjects: dict[str, list[bytes]], steps: set[str]) -> dict[str, Any]:
    """Scrub every partition of `directory` of all subjects' ids; then, per subject
    (a job id), the files that still hold one of its ids."""
    needles = sorted({n for ns in subjects.values() for n in ns})
    parts = sorted(Path(directory).glob("part-*.sqlite3")) if Path(directory).is_dir() else []
    changed = 0
    for part in parts:
        changed += scrub(str(part), needles, steps)["changed"]
    left = {job: holders(directory, ns) for job, ns in subjects.items()}
    return {"parts": len(parts), "changed": changed, "holders": left}


def handle(req: dict[str, Any]) -> Any:
    """One request (see the module docstring); JSON-serializable result."""
    if req["op"] == "scrub_all":
        subjects = {j: [bytes.fromhex(n) for n in ns] for j, ns in req["subjects"].items()}
        return scrub_all(req["path"], subjects, set(req.get("sink_steps", [])))
    if req["op"] == "holders":
        out: Any = holders(req["path"], [bytes.fromhex(n) for n in req.get("needles", [])])
    else:
        needles = [bytes.fromhex(n) for n in req.get("needles", [])]
        out = scrub(req["path"], needles, set(req.get("sink_steps", [])))
    return out


def main() -> None:
    json.dump(handle(json.load(sys.stdin)), sys.stdout)


if __name__ == "__main__":
    main()
