"""The recovery part of an erasure: Bytewax's snapshots of the user, scrubbed.

The user's state keys are discarded in the flow (`FoldLogic`), and Bytewax's GC deletes
the older snapshots once an epoch commits, but their bytes linger in SQLite free pages
and WAL frames, and a sink partition's newest snapshot may still hold batches that name
the user. Scrubbing that (VACUUM, WAL truncation, rewriting snapshots) while Bytewax has
the files open cannot be made safe (issue 12):

- in the stream process, Python's sqlite3 and Bytewax's bundled SQLite do not see each
  other's POSIX locks, and closing either's descriptor drops the other's: a VACUUM or
  checkpoint then runs under Bytewax's feet ("database disk image is malformed", SIGBUS
  on the truncated -shm; sqlite.org/howtocorrupt.html 2.2.1);
- from a child process the locks hold, but Bytewax's deferred write transactions get
  SQLITE_BUSY "database is locked" (a busy snapshot has no busy handler; a long VACUUM
  outlasts its 5 s busy timeout) and its `unwrap()` ends the worker.

So the scrub runs when Bytewax has no file open at all: once the stream's stores of an
erasure are done, `ScrubGate` ends every source partition (EOF, like a bounded run), the
dataflow finishes its last epoch (snapshots, commit, GC; the sinks drain their writers),
`cli_main` returns, a child process (`pipelines.recovery_scrub`) scrubs each partition,
and `pipelines.run` starts the dataflow again from that commit. No later epoch is
needed, so an idle stream finishes its erasures too. A cluster cannot stop one process
on its own: there the job says `pending` (the gate is off).
"""

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bytewax.inputs import FixedPartitionedSource, Source, StatefulSourcePartition

from nextbest.ingest.events import anon_actor, anonymous_of
from nextbest.settings import Settings
from pipelines.records import Erase
from storage.erasure_scan import provable, vocabulary
from storage.online.serving import ServingStore
from storage.online.store import OnlineStore

log = logging.getLogger(__name__)

SINK_STEPS = frozenset({"sink_lake", "sink_user_vectors"})  # Spec.step_id("sink", ...)
CLUSTER_PENDING = "pending: a cluster stream does not scrub its recovery files"
RESTART_MIN_INTERVAL_S = 5.0
"""Least time between two scrub restarts (each pauses the stream for about a second)."""
SCRUB_ATTEMPTS = 3
"""Scrubs of one erasure before its `stream_state` stays pending."""


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


class ScrubGate:
    """Erasures whose recovery scrub is due, and the stop that makes it safe.

    `ready` (the lake sink's writer thread, once the Delta and online stores of a
    request are done) queues the request and asks every source partition to end;
    `take` (the stream's main thread, after `cli_main` returned) hands them over.
    Runs end at most once per `min_interval_s`: a burst (or a loop) of erase requests
    is scrubbed together instead of keeping the stream restarting.
    Off unless `pipelines.run` turns it on: flows run by tests or in a cluster never stop.
    """

    def __init__(self, *, min_interval_s: float = RESTART_MIN_INTERVAL_S) -> None:
        self._lock = threading.Lock()
        self._requests: list[Erase] = []
        self._stop = threading.Event()
        self._not_before = 0.0  # time.monotonic() of the earliest next stop
        self._min_interval_s = min_interval_s
        self._tries: dict[str, int] = {}  # job id -> scrubs so far, while it is retried
        self.enabled = False

    @property
    def stopping(self) -> bool:
        return self._stop.is_set() and time.monotonic() >= self._not_before

    def ready(self, settings: Settings, request: Erase) -> None:
        if not self.enabled:
            report_progress(settings, request.job_id, {"stream_state": CLUSTER_PENDING})
            return
        with self._lock:
            self._requests.append(request)
            self._stop.set()

    def retry(self, request: Erase) -> bool:
        """Scrub `request` again at the next stop (a file still held an id: a snapshot
        GC had not yet removed); False once it had `SCRUB_ATTEMPTS`."""
        with self._lock:
            tries = self._tries[request.job_id] = self._tries.get(request.job_id, 1) + 1
            if tries > SCRUB_ATTEMPTS:
                del self._tries[request.job_id]
                return False
            self._requests.append(request)
            self._stop.set()
        return True

    def settled(self, request: Erase) -> None:
        with self._lock:
            self._tries.pop(request.job_id, None)

    def take(self) -> list[Erase]:
        with self._lock:
            taken, self._requests = self._requests, []
            self._stop.clear()
            self._not_before = time.monotonic() + self._min_interval_s
        return taken

    def wrap(self, source: Source[Any]) -> Source[Any]:
        """`source`, ending its partitions when a scrub is due (fixed partitions only:
        the stream's own sources)."""
        if isinstance(source, FixedPartitionedSource):
            return _GatedSource(source, self)
        return source


GATE = ScrubGate()
"""The stream process's gate (one dataflow per process)."""


class _GatedPartition(StatefulSourcePartition[Any, Any]):
    def __init__(self, inner: StatefulSourcePartition[Any, Any], gate: ScrubGate) -> None:
        self._inner = inner
        self._gate = gate

    def next_batch(self) -> Iterable[Any]:
        if self._gate.stopping:
            # EOF: Bytewax closes the epoch, snapshots this partition's offset and
            # commits; the next run resumes right here.
            raise StopIteration()
        return self._inner.next_batch()

    def next_awake(self) -> Any:
        return self._inner.next_awake()

    def snapshot(self) -> Any:
        return self._inner.snapshot()

    def close(self) -> None:
        self._inner.close()


class _GatedSource(FixedPartitionedSource[Any, Any]):
    def __init__(self, inner: FixedPartitionedSource[Any, Any], gate: ScrubGate) -> None:
        self._inner = inner
        self._gate = gate

    def list_parts(self) -> list[str]:
        return self._inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _GatedPartition:
        return _GatedPartition(self._inner.build_part(step_id, for_part, resume_state), self._gate)


def scrub_recovery(settings: Settings, requests: list[Erase], gate: ScrubGate = GATE) -> None:
    """With no Bytewax connection open (between two runs of the dataflow): scrub every
    partition of the erased subjects in a child process, and report each job's
    `stream_state`: done only when no recovery file holds one of its ids; else the
    gate scrubs it again at a later stop, up to `SCRUB_ATTEMPTS` times."""
    started = time.monotonic()
    directory = Path(settings.recovery_dir)
    words = vocabulary(settings.spec)
    subjects = {r.job_id: [n.hex() for n in _needles(r, words)] for r in requests}
    try:
        out = _child(
            {
                "op": "scrub_all",
                "path": str(directory),
                "subjects": subjects,
                "sink_steps": sorted(SINK_STEPS),
            }
        )
    except Exception as exc:
        log.exception("recovery scrub failed")
        out = {"parts": 0, "holders": {}, "error": f"failed: {type(exc).__name__}"}
    for request in requests:
        if "error" in out:
            status = out["error"]
        elif left := out["holders"].get(request.job_id):
            again = "; scrubbed again soon" if gate.retry(request) else ""
            status = f"pending: recovery files still hold the user: {', '.join(left)}{again}"
        else:
            gate.settled(request)
            status = f"done: {out['parts']} recovery partitions scrubbed"
        report_progress(settings, request.job_id, {"stream_state": status})
    log.info("recovery scrub of %d erasures: %.1f s", len(requests), time.monotonic() - started)


def _needles(request: Erase, words: frozenset[str] = frozenset()) -> list[bytes]:
    """The ids as they appear in snapshots (anonymous ids without the `anon:` prefix);
    with `words`, only those a byte scan can prove absent (`storage.erasure_scan.provable`)."""
    return [a.encode() for a in provable(erased_ids(request), words)[0]]


def _child(request: dict[str, Any]) -> Any:
    """`pipelines.recovery_scrub` in a child process: even with Bytewax's files closed,
    this process never opens them with a second SQLite library."""
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.recovery_scrub"],
        input=json.dumps(request).encode(),
        capture_output=True,
        timeout=300,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"recovery scrub: {out.stderr.decode(errors='replace')[-400:]}")
    return json.loads(out.stdout)
