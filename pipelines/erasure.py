"""The stream's side of an erasure job (`record: erase` from `DELETE /v1/users/{id}`).

The stream is the single writer of Bytewax state, the LanceDB `users` table and the
Delta tables it appends, so it erases them itself and reports each store in the job:

- Bytewax state: the user and linked anonymous keys are discarded by `FoldLogic` in
  the flow. Old recovery snapshots still hold the state until Bytewax's GC, which runs
  when an epoch commits, deletes every snapshot older than a key's newest (here: the
  discard tombstone). Even then the bytes linger in SQLite free pages and WAL frames,
  so `RecoveryScrubber` waits for a few more commits, VACUUMs each recovery partition,
  truncates its WAL and only reports done when no file holds the ids any more.
- LanceDB users: delete, then `optimize(cleanup_older_than=0)` on the vector sink's
  writer thread (ordered after its pending upserts; one writer for the table).
- Delta events/decisions/feedback and the online store: on the lake sink's writer
  thread, after every batch that partition sealed before the request.
- Delta dead_letters: rows whose raw payload names the user or a linked anonymous id,
  deleted by their source position (opaque), then vacuumed.
- The tables Dagster derives from bronze (`storage.delta.erasure.DERIVED_TABLES`):
  after bronze, on the same thread. Each is fenced, its rows deleted and its history
  purged, so an asset run that read bronze before the erasure cannot write the user
  back (it fails and recomputes) and one that starts later reads erased bronze. This
  process does it because it already holds the request in log order, after bronze.
"""

import logging
import pickle
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
from deltalake.exceptions import CommitFailedError
import pyarrow.compute as _compute

from nextbest.settings import Settings
from pipelines.records import Erase
from storage.delta.erasure import (
    DERIVED_STORES,
    DERIVED_TABLES,
    erase_derived,
    log_mentions,
    purge_history,
    store_name,
)
from storage.delta.store import DeltaStore
from storage.erasure_scan import Needles, Person, provable, vocabulary
from storage.online.serving import ServingStore, scrub_sqlite
from storage.online.store import OnlineStore
from storage.vectors import VectorStore

log = logging.getLogger(__name__)
pc: Any = _compute  # kernels are generated at import time: invisible to pyright

ERASE_MARKER = "__erase__"
SINK_STEPS = frozenset({"sink_lake", "sink_user_vectors"})  # Spec.step_id("sink", ...)
# Delta table -> (store name in the job, key column erased by)
DELTA_TABLES = {
    "events": ("delta_events", "event_id"),
    "decisions": ("delta_decisions", "decision_id"),
    "feedback": ("delta_feedback", "decision_id"),
}
DEAD_LETTERS = "delta_dead_letters"
DELTA_STORES = (
    *(name for name, _ in DELTA_TABLES.values()),
    DEAD_LETTERS,
    *DERIVED_STORES,
)


def erase_marker(request: Erase) -> dict[str, Any]:
    """What the vector sink receives for an erasure (instead of a users row)."""
    return {ERASE_MARKER: request.user_id, "job_id": request.job_id, "anon": request.anonymous_ids}


def subject_ids(request: Erase) -> tuple[list[str], list[str]]:
    """(actors, anonymous ids) of a request. A `user_id` of `anon:<id>` is a visitor who
    never identified: `<id>` is one of their anonymous ids (bronze `anonymous_id`)."""
    anonymous = set(request.anonymous_ids)
    if request.user_id.startswith("anon:"):
        anonymous.add(request.user_id.removeprefix("anon:"))
    actors = {request.user_id, *(f"anon:{a}" for a in anonymous)}
    return sorted(actors), sorted(anonymous)


def actors_of(request: Erase) -> list[str]:
    return subject_ids(request)[0]


def _ids(request: Erase) -> list[str]:
    """The ids whose bytes must go: the user id and each anonymous id (`anon:<id>`
    contains `<id>`)."""
    return [request.user_id, *subject_ids(request)[1]]


def _strings(data: pa.Table) -> pa.Table:
    """string_view columns (files rewritten by a delete) back to string."""
    return data.cast(
        pa.schema(
            [f.with_type(pa.string()) if f.type == pa.string_view() else f for f in data.schema]
        )
    )


def _regex_mask(column: pa.ChunkedArray, needles: Needles) -> pa.ChunkedArray:
    """Values naming an id (RE2: no look-behind, so explicit boundaries)."""
    if not needles:
        return pc.equal(column, pa.scalar("\x00", pa.string()))
    alts = "|".join(re.escape(i) for i in needles.ids)
    return pc.match_substring_regex(column, f"(^|[^A-Za-z0-9])({alts})($|[^A-Za-z0-9])")


def _report(settings: Settings, job_id: str, updates: dict[str, str]) -> None:
    store = OnlineStore.from_settings(settings, pool_size=1)
    try:
        ServingStore(store).update_erasure_stores(job_id, updates)
    except Exception:  # the job table belongs to the API: a missing one is not fatal
        log.exception("could not report erasure progress")
    finally:
        store.dispose()


def erase_vectors(settings: Settings, store: VectorStore, marker: dict[str, Any]) -> None:
    """Vector sink thread: delete the user's rows, compact, drop every older version."""
    user_id = marker[ERASE_MARKER]
    removed = store.delete_user(user_id)
    for anon in marker.get("anon", ()):
        removed += store.delete_user(f"anon:{anon}")
    store.optimize("users", cleanup_older_than=timedelta(0))
    _report(settings, marker["job_id"], {"lance_users": f"done: {removed} rows"})


class StreamEraser:
    """Lake sink thread: Delta tables, the online store again, then the scrubber."""

    def __init__(self, settings: Settings, store: DeltaStore) -> None:
        self.settings = settings
        self.store = store

    def erase(self, request: Erase) -> None:
        """Never raises: a failed erasure is reported in the job, the stream goes on."""
        try:
            self._erase(request)
        except Exception as exc:
            log.exception("erasure of the stream's stores failed")
            failed = f"failed: {type(exc).__name__}"
            _report(self.settings, request.job_id, dict.fromkeys(DELTA_STORES, failed))

    def _erase(self, request: Erase) -> None:
        actors, anonymous = subject_ids(request)
        needles = Needles(_ids(request))
        updates: dict[str, str] = {}
        events = self._erase_events(actors, anonymous, needles)
        updates["delta_events"] = f"done: {events} rows"
        decisions, decision_ids = self._erase_by_actor("decisions", actors, needles)
        updates["delta_decisions"] = f"done: {decisions} rows"
        feedback, _ = self._erase_by_actor("feedback", actors, needles, decision_ids)
        updates["delta_feedback"] = f"done: {feedback} rows"
        # Bronze is erased: from here on a recomputation cannot bring the user back.
        updates[DEAD_LETTERS] = _guarded(lambda: f"done: {self._erase_dead_letters(request)} rows")
        for table, columns in DERIVED_TABLES.items():
            updates[store_name(table)] = _guarded(
                lambda table=table, columns=columns: self._erase_derived(table, columns, request)
            )
        online = OnlineStore.from_settings(self.settings, pool_size=1)
        try:
            # Events may have reached the online store after the API's own delete.
            for actor in actors:
                online.delete_user(actor)
            _scrub_until(lambda: ServingStore(online).scrub(), timeout_s=30.0)
        finally:
            online.dispose()
        _report(self.settings, request.job_id, updates)
        RecoveryScrubber(self.settings, request).start()

    def _erase_events(self, actors: list[str], anonymous: list[str], needles: Needles) -> int:
        """Bronze rows of the person: by `user_id` (any actor), by `anonymous_id` (rows
        sent before an identify carry only that), and every row whose client-chosen
        `event_id` names one of the ids. Deleted by source position where the stream
        wrote one (opaque), else by event id; a log that still names an id (an event id
        in an old commit's statistics, a predicate) loses its history."""
        if not self.store.exists("events"):
            return 0
        cols = ["event_id", "user_id", "anonymous_id", "source_partition", "source_offset"]
        data = _strings(self.store.read("events", columns=cols))
        mask = pc.or_kleene(
            pc.is_in(data["user_id"], pa.array(actors, pa.string())),
            pc.is_in(data["anonymous_id"], pa.array(anonymous or [""], pa.string())),
        )
        mask = pc.or_kleene(mask, _regex_mask(data["event_id"], needles))
        rows = data.filter(pc.fill_null(mask, False)).to_pylist()
        positions: dict[int, set[int]] = {}
        keys: set[str] = set()
        for row in rows:
            if row["source_partition"] is None or row["source_offset"] is None:
                keys.add(row["event_id"])
            else:
                positions.setdefault(int(row["source_partition"]), set()).add(
                    int(row["source_offset"])
                )
        deleted = self._delete_positions("events", positions)
        deleted += self._delete_keys("events", "event_id", keys)
        self._finish("events", needles, changed=bool(rows))
        return deleted

    def _erase_by_actor(
        self, table: str, actors: list[str], needles: Needles, decisions: Sequence[str] = ()
    ) -> tuple[int, list[str]]:
        """Decisions or feedback logged under any actor of the person (their anonymous
        ids included), feedback on their decisions, rows whose decision id names an id;
        deleted by decision id. Returns (rows deleted, their decision ids)."""
        if not self.store.exists(table):
            return 0, []
        data = _strings(self.store.read(table, columns=["decision_id", "user_id"]))
        mask = pc.is_in(data["user_id"], pa.array(actors, pa.string()))
        if decisions:
            mask = pc.or_kleene(mask, pc.is_in(data["decision_id"], pa.array(list(decisions))))
        mask = pc.or_kleene(mask, _regex_mask(data["decision_id"], needles))
        ids = sorted(set(data.filter(pc.fill_null(mask, False))["decision_id"].to_pylist()))
        deleted = self._delete_keys(table, "decision_id", set(ids))
        self._finish(table, needles, changed=bool(ids))
        return deleted, ids

    def _delete_positions(self, table: str, positions: dict[int, set[int]]) -> int:
        deleted = 0
        for partition, offsets in sorted(positions.items()):
            ordered = sorted(offsets)
            for i in range(0, len(ordered), 500):
                chunk = ", ".join(str(o) for o in ordered[i : i + 500])
                predicate = f"source_partition = {partition} AND source_offset IN ({chunk})"
                deleted += int(self.store.delete(table, predicate)["num_deleted_rows"])
        return deleted

    def _delete_keys(self, table: str, key: str, ids: set[str]) -> int:
        ordered = sorted(ids)
        deleted = 0
        for i in range(0, len(ordered), 500):
            chunk = ", ".join("'" + k.replace("'", "''") + "'" for k in ordered[i : i + 500])
            deleted += int(self.store.delete(table, f"{key} IN ({chunk})")["num_deleted_rows"])
        return deleted

    def _finish(self, table: str, needles: Needles, *, changed: bool) -> None:
        """Vacuum what the deletes removed; purge the log when a commit still names an
        id (`storage.delta.erasure.purge_history`)."""
        if changed:
            self._vacuum(table)
        uri = self.store.uri(table)
        if log_mentions(uri, needles):
            purge_history(uri, storage_options=self.store.storage_options)

    def _vacuum(self, table: str, attempts: int = 5) -> None:
        """Vacuum, retried when a concurrent commit (the stream's own appends, a
        compaction) makes deltalake refuse it with CommitFailedError ("a concurrent
        transaction deleted data"): vacuum is idempotent, so the next try is safe."""
        for attempt in range(attempts):
            time.sleep(0.005 * (attempt + 1))  # files removed this ms are not older than the cutoff
            try:
                self.store.vacuum(table, retention_hours=0, enforce_retention_duration=False)
                return
            except CommitFailedError:
                if attempt == attempts - 1:
                    raise
                log.info("vacuum of %s met a concurrent commit; retrying", table)

    def _erase_dead_letters(self, request: Erase) -> int:
        """Dead letters whose raw payload names the user, deleted by source position."""
        if not self.store.exists("dead_letters"):
            return 0
        needles = Needles(_ids(request))
        person = Person(request.user_id, request.anonymous_ids)
        rows = self.store.read(
            "dead_letters", columns=["raw", "source_partition", "source_offset"]
        ).to_pylist()
        positions: dict[int, set[int]] = {}
        for row in rows:
            # Identity fields only (`Person.in_payload`): a dead letter spelling the id
            # as a type or an item id is someone else's.
            if row["raw"] and person.in_payload(bytes(row["raw"])):
                if row["source_partition"] is None or row["source_offset"] is None:
                    raise ValueError("a dead letter naming the user has no source position")
                positions.setdefault(row["source_partition"], set()).add(row["source_offset"])
        deleted = 0
        for partition, offsets in sorted(positions.items()):
            ordered = sorted(offsets)
            for i in range(0, len(ordered), 500):
                chunk = ", ".join(str(int(o)) for o in ordered[i : i + 500])
                predicate = f"source_partition = {int(partition)} AND source_offset IN ({chunk})"
                deleted += int(self.store.delete("dead_letters", predicate)["num_deleted_rows"])
        self._finish("dead_letters", needles, changed=bool(positions))
        return deleted

    def _erase_derived(self, table: str, columns: tuple[str, ...], request: Erase) -> str:
        if not self.store.exists(table):
            return "done: no table"
        n = erase_derived(
            self.store.uri(table),
            actors_of(request),
            columns,
            storage_options=self.store.storage_options,
        )
        return f"done: {n} rows, history purged"


def _guarded(step: Any) -> str:
    """A store's status from one erasure step; a failure is reported, not raised."""
    try:
        return step()
    except Exception as exc:
        log.exception("erasure step failed")
        return f"failed: {type(exc).__name__}"


def _scrub_until(scrub: Any, *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if scrub():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


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
        epochs = []
        for part in self.parts():
            epochs.append(_commit_epoch(part))
        return epochs

    def holders(self) -> list[str]:
        needles = _needles(self.request, vocabulary(self.settings.spec))
        found = []
        for path in sorted(self.dir.iterdir()) if self.dir.is_dir() else []:
            if path.is_file() and any(n in path.read_bytes() for n in needles):
                found.append(path.name)
        return found

    def run(self) -> None:
        try:
            status = self._scrub()
        except Exception as exc:
            log.exception("recovery scrub failed")
            status = f"failed: {type(exc).__name__}"
        _report(self.settings, self.request.job_id, {"stream_state": status})

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
        while True:
            for part in parts:
                self._rewrite_sink_snapshots(part)
                scrub_sqlite(str(part))
            left = self.holders()
            if not left:
                return f"done: {len(parts)} recovery partitions scrubbed"
            if time.monotonic() > deadline:
                return f"pending: recovery files still hold the user: {', '.join(left)}"
            time.sleep(0.2)

    def _vectors_done(self) -> bool:
        store = OnlineStore.from_settings(self.settings, pool_size=1)
        try:
            job = ServingStore(store).erasure_job(self.request.job_id)
        finally:
            store.dispose()
        return job is None or not job.stores.get("lance_users", "").startswith("pending")

    def _rewrite_sink_snapshots(self, part: Path) -> int:
        """Drop the subject's batches from the newest snapshot of a sink partition.

        Bytewax snapshots a stateful sink partition only in epochs it received items,
        so a partition that got nothing since keeps its pending batches of back then
        (the user's rows, the erase request itself) in its newest snapshot, which GC
        never removes. Those batches were applied before the erasure finished (each
        partition's writer is FIFO, and both sinks reported done), so removing them
        from the snapshot changes nothing a resume would do but forget the user.
        """
        needles = _needles(self.request, vocabulary(self.settings.spec))
        conn = sqlite3.connect(str(part), timeout=5.0, isolation_level=None)
        changed = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(
                "SELECT step_id, state_key, snap_epoch, ser_change FROM snaps"
                " WHERE ser_change IS NOT NULL"
            ).fetchall()
            for step_id, key, epoch, blob in rows:
                if step_id.rsplit(".", 1)[-1] not in SINK_STEPS:
                    continue
                if not any(n in blob for n in needles):
                    continue
                kept = [b for b in pickle.loads(blob) if not _mentions(b, needles)]
                conn.execute(
                    "UPDATE snaps SET ser_change = ? WHERE step_id = ? AND state_key = ?"
                    " AND snap_epoch = ?",
                    (pickle.dumps(kept), step_id, key, epoch),
                )
                changed += 1
            conn.execute("COMMIT")
        finally:
            conn.close()
        return changed


def _needles(request: Erase, words: frozenset[str] = frozenset()) -> list[bytes]:
    """The ids as they appear in snapshots (anonymous ids without the `anon:` prefix);
    with `words`, only those a byte scan can prove absent (`storage.erasure_scan.provable`)."""
    return [a.encode() for a in provable(_ids(request), words)[0]]


def _mentions(batch: Any, needles: list[bytes]) -> bool:
    data = pickle.dumps(batch)
    return any(n in data for n in needles)


def _commit_epoch(part: Path) -> int:

    conn = sqlite3.connect(f"file:{part}?mode=ro", uri=True, timeout=5.0)
    try:
        row = conn.execute("SELECT MAX(commit_epoch) FROM commits").fetchone()
        return int(row[0]) if row and row[0] is not None else -1
    finally:
        conn.close()
