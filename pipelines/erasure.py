"""The stream's side of an erasure job (`record: erase` from `DELETE /v1/users/{id}`).

The stream is the single writer of Bytewax state, the LanceDB `users` table and the
Delta tables it appends, so it erases them itself and reports each store in the job:

- Bytewax state: the user and linked anonymous keys are discarded by `FoldLogic` in
  the flow. Old recovery snapshots still hold the state until Bytewax's GC, which runs
  when an epoch commits, deletes every snapshot older than a key's newest (here: the
  discard tombstone). Even then the bytes linger in SQLite free pages and WAL frames,
  so once the stores below are done the stream ends its dataflow, VACUUMs each recovery
  partition with no Bytewax connection open, starts again, and reports done only when
  no file holds the ids any more (`pipelines.erasure_recovery.ScrubGate`).
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
import re
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as _compute
from deltalake.exceptions import CommitFailedError

from nextbest.ingest.events import anon_actor
from nextbest.settings import Settings
from pipelines.erasure_recovery import GATE, erased_ids, report_progress, subject_ids
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
from storage.erasure_scan import Needles, Person
from storage.online.serving import ServingStore
from storage.online.store import OnlineStore
from storage.vectors import VectorStore

log = logging.getLogger(__name__)
_ERASING = threading.Lock()
pc: Any = _compute  # kernels are generated at import time: invisible to pyright

ERASE_MARKER = "__erase__"
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


def actors_of(request: Erase) -> list[str]:
    return subject_ids(request)[0]


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


def erase_vectors(settings: Settings, store: VectorStore, marker: dict[str, Any]) -> None:
    """Vector sink thread: delete the user's rows, compact, drop every older version."""
    user_id = marker[ERASE_MARKER]
    removed = store.delete_user(user_id)
    for anon in marker.get("anon", ()):
        removed += store.delete_user(anon_actor(anon))
    store.optimize("users", cleanup_older_than=timedelta(0))
    report_progress(settings, marker["job_id"], {"lance_users": f"done: {removed} rows"})


class StreamEraser:
    """Lake sink thread: Delta tables, the online store again, then the scrubber."""

    def __init__(self, settings: Settings, store: DeltaStore) -> None:
        self.settings = settings
        self.store = store

    def erase(self, request: Erase, *, attempts: int = 3) -> None:
        """Never raises: a failed erasure is reported in the job, the stream goes on.

        One erasure at a time in the process (each lake partition has a writer thread,
        and two erasures deleting from the same Delta files conflict: DeltaError), and
        retried, since every step is idempotent. The recovery scrub follows either way:
        Bytewax's state of the user was dropped in the flow whatever Delta did."""
        for attempt in range(1, attempts + 1):
            try:
                with _ERASING:
                    self._erase(request)
                break
            except Exception as exc:
                log.exception("erasure of the stream's stores failed (attempt %d)", attempt)
                if attempt == attempts:
                    failed = f"failed: {type(exc).__name__}"
                    updates = dict.fromkeys(DELTA_STORES, failed)
                    report_progress(self.settings, request.job_id, updates)
        GATE.ready(self.settings, request)  # the recovery scrub (`pipelines.erasure_recovery`)

    def _erase(self, request: Erase) -> None:
        actors, anonymous = subject_ids(request)
        needles = Needles(erased_ids(request))
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
        report_progress(self.settings, request.job_id, updates)

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
        needles = Needles(erased_ids(request))
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
