"""The recovery part of an erasure: Bytewax's snapshots of the user, scrubbed.

Bytewax's GC removes the snapshots older than the discard tombstone once an epoch
commits, but the bytes linger in SQLite free pages and WAL frames. `RecoveryScrubber`
waits for a few more commits, then has a child process (`pipelines.recovery_scrub`) drop
the subject's pending sink batches, VACUUM each partition and truncate its WAL, and
check that no file holds the ids. Nothing here opens a recovery file in the stream
process: see `pipelines.recovery_scrub` for why that corrupted Bytewax's store.
"""

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from nextbest.ingest.events import anon_actor, anonymous_of
from nextbest.settings import Settings
from pipelines import recovery_scrub
from pipelines.records import Erase
from storage.erasure_scan import provable, vocabulary
from storage.online.serving import ServingStore
from storage.online.store import OnlineStore

log = logging.getLogger(__name__)

SINK_STEPS = frozenset({"sink_lake", "sink_user_vectors"})  # Spec.step_id("sink", ...)


def subject_ids(request: Erase) -> tuple[list[str], list[str]]:
    """(actors, anonymous ids) of a request. A `user_id` of `anon:<id>` is a visitor who
    never identified: `<id>` is one of their anonymous ids (bronze `anonymous_id`)."""
    anonymous = set(request.anonymous_ids)
    visitor = anonymous_of(request.user_id)
    if visitor is not None:
        anonymous.add(visitor)
    actors = {request.user_id, *(anon_actor(a) for a in anonymous)}
    return sorted(actors), sorted(anonymous)


def erased_ids(request: Erase) -> list[str]:
    """The ids whose bytes must go: the user id and each anonymous id (`anon:<id>`
    contains `<id>`)."""
    return [request.user_id, *subject_ids(request)[1]]


def report_progress(settings: Settings, job_id: str, updates: dict[str, str]) -> None:
    store = OnlineStore.from_settings(settings, pool_size=1)
    try:
        ServingStore(store).update_erasure_stores(job_id, updates)
    except Exception:  # the job table belongs to the API: a missing one is not fatal
        log.exception("could not report erasure progress")
    finally:
        store.dispose()


class RecoveryScrubber(threading.Thread):
    """Waits until the discard tombstones are committed and GC ran, then scrubs.

    Reports `stream_state` done only when no file of the recovery dir contains the
    user id or a linked anonymous id; otherwise, after `timeout_s`, pending.
    """

    def __init__(
        self, settings: Settings, request: Erase, *, commits: int = 3, timeout_s: float = 20.0
    ) -> None:
        super().__init__(name="erasure-recovery", daemon=True)
        self.settings = settings
        self.request = request
        self.dir = Path(settings.recovery_dir)
        self.commits = commits
        self.timeout_s = timeout_s

    def parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.sqlite3")) if self.dir.is_dir() else []

    def committed(self) -> list[int]:
        """Each partition's last committed epoch, read by one child process."""
        return [int(e) for e in _child({"op": "epochs", "paths": [str(p) for p in self.parts()]})]

    def holders(self) -> list[str]:
        needles = _needles(self.request, vocabulary(self.settings.spec))
        return _child(
            {"op": "holders", "path": str(self.dir), "needles": [n.hex() for n in needles]}
        )

    def run(self) -> None:
        try:
            status = self._scrub()
        except Exception as exc:
            log.exception("recovery scrub failed")
            status = f"failed: {type(exc).__name__}"
        report_progress(self.settings, self.request.job_id, {"stream_state": status})

    def _scrub(self) -> str:
        parts = self.parts()
        if not parts:
            return "done: no recovery snapshots"
        start = min(self.committed())
        deadline = time.monotonic() + self.timeout_s
        while min(self.committed()) < start + self.commits:
            if time.monotonic() > deadline:
                return "pending: recovery epochs did not commit"
            time.sleep(0.05)
        while not self._vectors_done():
            if time.monotonic() > deadline:
                return "pending: LanceDB erasure not done"
            time.sleep(0.05)
        # Every scrub is a write Bytewax may have to wait for (its busy timeout), so
        # scrub only the partitions whose files still hold an id, and back off: GC needs
        # another commit before a second scrub of a partition can find less.
        pause, scrubbed = 0.2, 0
        while left := self.holders():
            if time.monotonic() > deadline:
                return f"pending: recovery files still hold the user: {', '.join(left)}"
            for part in parts:
                if any(name.startswith(part.name) for name in left):
                    self._rewrite_sink_snapshots(part)
                    scrubbed += 1
            time.sleep(pause)
            pause = min(2.0, pause * 2)
        return f"done: {len(parts)} recovery partitions, {scrubbed} scrubs"

    def _vectors_done(self) -> bool:
        store = OnlineStore.from_settings(self.settings, pool_size=1)
        try:
            job = ServingStore(store).erasure_job(self.request.job_id)
        finally:
            store.dispose()
        return job is None or not job.stores.get("lance_users", "").startswith("pending")

    def _rewrite_sink_snapshots(self, part: Path) -> dict[str, Any]:
        """Drop the subject's batches from the newest snapshot of a sink partition, then
        VACUUM and truncate the WAL, in a child process (`pipelines.recovery_scrub`:
        never with this process's sqlite3 while Bytewax's own SQLite has the file open).

        Bytewax snapshots a stateful sink partition only in epochs it received items,
        so a partition that got nothing since keeps its pending batches of back then
        (the user's rows, the erase request itself) in its newest snapshot, which GC
        never removes. Those batches were applied before the erasure finished (each
        partition's writer is FIFO, and both sinks reported done), so removing them
        from the snapshot changes nothing a resume would do but forget the user.
        """
        needles = _needles(self.request, vocabulary(self.settings.spec))
        return _child(
            {
                "op": "scrub",
                "path": str(part),
                "needles": [n.hex() for n in needles],
                "sink_steps": sorted(SINK_STEPS),
            }
        )


def _needles(request: Erase, words: frozenset[str] = frozenset()) -> list[bytes]:
    """The ids as they appear in snapshots (anonymous ids without the `anon:` prefix);
    with `words`, only those a byte scan can prove absent (`storage.erasure_scan.provable`)."""
    return [a.encode() for a in provable(erased_ids(request), words)[0]]


SCRUB_APART = False
"""Run the recovery scrub in a child process. In process (False, as before) Python's
sqlite3 and Bytewax's bundled SQLite share the process, so neither sees the other's
POSIX locks and a VACUUM can corrupt the store (SIGBUS, "database disk image is
malformed": about 5 of 12 hostile runs). Apart (True) the locks hold, but Bytewax's
deferred transactions then fail with SQLITE_BUSY "database is locked" on a read->write
upgrade (no busy handler there) and the stream exits (3 of 8 hostile runs, and
tests/test_erasure.py under load). Neither is safe; the fix is a scrub where Bytewax
holds no transaction (the worker thread, or at stream start): issue 12, bug 6."""


def _child(request: dict[str, Any]) -> Any:
    if not SCRUB_APART:
        return recovery_scrub.handle(request)
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.recovery_scrub"],
        input=json.dumps(request).encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"recovery scrub: {out.stderr.decode(errors='replace')[-400:]}")
    return json.loads(out.stdout)
