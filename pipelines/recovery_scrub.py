"""The recovery store's SQLite work of an erasure, in a child process.

Bytewax keeps its recovery partitions (part-N.sqlite3) open through its own bundled
SQLite (rusqlite, busy_timeout 5000, WAL). Opening the same files with Python's sqlite3
in the stream process makes two SQLite libraries share one process: closing either's
file descriptor drops the POSIX advisory locks the other holds, so a VACUUM or a WAL
checkpoint can run under Bytewax's feet and corrupt the file ("database disk image is
malformed", SIGBUS on the remapped -shm; sqlite.org/howtocorrupt.html 2.2.1). In a
separate process the locks are honoured as between any two SQLite clients, and Bytewax
waits out our short write transactions with its busy timeout.

Usage (by `pipelines.erasure_recovery.RecoveryScrubber`): `python -m pipelines.recovery_scrub`
with a JSON request on stdin ({"op": "epochs"|"holders"|"scrub", "path"/"paths",
"needles": [hex...], "sink_steps": [...]}); prints a JSON result. Imports nothing
heavy: pickled sink batches are unpickled (importing their classes) only when one names
an id.
"""

import json
import pickle
import sqlite3
import sys
from pathlib import Path
from typing import Any

BUSY_MS = 5000


def commit_epoch(path: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_MS / 1000)
    try:
        row = conn.execute("SELECT MAX(commit_epoch) FROM commits").fetchone()
        return int(row[0]) if row and row[0] is not None else -1
    finally:
        conn.close()


def _mentions(batch: Any, needles: list[bytes]) -> bool:
    data = pickle.dumps(batch)
    return any(n in data for n in needles)


def rewrite_sink_snapshots(conn: sqlite3.Connection, needles: list[bytes], steps: set[str]) -> int:
    """See `pipelines.erasure_recovery.RecoveryScrubber` for why this is safe."""
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
            kept = [b for b in pickle.loads(blob) if not _mentions(b, needles)]
            conn.execute(
                "UPDATE snaps SET ser_change = ? WHERE step_id = ? AND state_key = ?"
                " AND snap_epoch = ?",
                (pickle.dumps(kept), step_id, key, epoch),
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
    """Files of the recovery dir holding an id. Read here, not in the stream process:
    closing any descriptor of a file drops every POSIX lock the process holds on it,
    Bytewax's SQLite locks included (howtocorrupt.html 2.2.1 again)."""
    found = []
    for path in sorted(Path(directory).iterdir()) if Path(directory).is_dir() else []:
        if needles and path.is_file() and any(n in path.read_bytes() for n in needles):
            found.append(path.name)
    return found


def handle(req: dict[str, Any]) -> Any:
    """One request (see the module docstring); JSON-serializable result."""
    if req["op"] == "epochs":
        out: Any = [commit_epoch(p) for p in req["paths"]]
    elif req["op"] == "holders":
        out = holders(req["path"], [bytes.fromhex(n) for n in req.get("needles", [])])
    else:
        needles = [bytes.fromhex(n) for n in req.get("needles", [])]
        out = scrub(req["path"], needles, set(req.get("sink_steps", [])))
    return out


def main() -> None:
    json.dump(handle(json.load(sys.stdin)), sys.stdout)


if __name__ == "__main__":
    main()
