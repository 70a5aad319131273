"""The erasure's scans must not read SQLite files that their own process has open: closing
any descriptor of a file drops every POSIX lock the process holds on it, its SQLite
connections' included (sqlite.org/howtocorrupt.html 2.2.1), after which another process
may VACUUM, checkpoint or truncate the WAL/-shm under them: the stream died of SIGBUS or
"database disk image is malformed" that way while the erasure's recovery scrub read and
VACUUMed Bytewax's recovery files in the stream process (now it runs apart, between two
runs of the dataflow: `pipelines.erasure_recovery`)."""

import sqlite3
import subprocess
import sys
from pathlib import Path

from storage.erasure_scan import Needles, scan_tree, scan_tree_apart

_WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
try:
    conn.execute("BEGIN EXCLUSIVE")
    conn.execute("ROLLBACK")
    print("got it")
except sqlite3.OperationalError as exc:
    print(exc)
"""


def _other_process_gets_an_exclusive_lock(db: Path) -> bool:
    out = subprocess.run([sys.executable, "-c", _WRITER, str(db)], capture_output=True, check=True)
    return out.stdout.decode().strip() == "got it"


def _reader(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)  # holds SHARED
    return conn


def test_the_scan_keeps_this_process_sqlite_locks(tmp_path: Path) -> None:
    db = tmp_path / "online.db"
    with sqlite3.connect(db) as setup:
        setup.execute("CREATE TABLE t (user_id TEXT)")
        setup.execute("INSERT INTO t VALUES ('u1')")
    setup.close()
    conn = _reader(db)
    try:
        assert not _other_process_gets_an_exclusive_lock(db)
        assert scan_tree_apart(tmp_path, Needles(["u1"])) == ["online.db"]
        assert not _other_process_gets_an_exclusive_lock(db), "the scan dropped our lock"
        # What reading in process does (the old scan): the lock is silently gone.
        assert scan_tree(tmp_path, Needles(["u1"])) == ["online.db"]
        assert _other_process_gets_an_exclusive_lock(db)
    finally:
        conn.close()
