"""Erasure in the Delta tables Dagster derives from bronze, and the fence that keeps an
asset run from bringing an erased person back.

The history tables (events, dead_letters, decisions, feedback) keep their history:
their statistics cover only non-personal columns (`storage.delta.schemas`), so deleting
by opaque keys and vacuuming leaves no byte of a person (`DeltaStore.erase`). Derived
tables (silver/gold) are different: their `_delta_log` holds min/max statistics of
whatever the asset wrote, user ids included, and vacuum never deletes log entries. So
erasing from one drops its history: fence, delete, vacuum, checkpoint, then delete every
log entry older than the checkpoint. They are recomputed from bronze on every
materialization, so no time travel worth keeping is lost.

The fence. An asset run that read bronze before the erasure and writes after it would
re-introduce the person. Such writers pin the table's version before they read bronze
and write with `DeltaStore.write(based_on=...)`, which refuses (`StaleWriteError`) once
`fenced_since` sees an erasure commit after the pinned version, or sees that history
purged. The fence is a metadata commit, so a writer that checked just before it fails
its own commit ("Metadata changed since last commit") and checks again. A run pinned
after the fence reads bronze after it, and bronze is erased before any derived table.
"""

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import CommitFailedError

from storage.erasure_scan import Needles, scan_tree

T = TypeVar("T")

FENCE_KEY = "nextbest.erasure"
"""commitInfo key (custom metadata) of an erasure's commits on a derived table."""
LOG_RETENTION = "delta.logRetentionDuration"
DEFAULT_LOG_RETENTION = "interval 30 days"
ZERO = "interval 0 seconds"

DERIVED_TABLES: Mapping[str, tuple[str, ...]] = {
    "silver/sessions": ("user_id",),
    "gold/interactions": ("user_id",),
    "gold/user_features": ("entity_id",),
    "gold/training_set": ("user_id",),
}
"""Delta tables the Dagster assets derive from bronze -> the columns holding the actor
(a user id or `anon:<id>`). Names as in `definitions.batch.history`; a test checks that a full
materialization writes no other table holding user ids."""


def store_name(table: str) -> str:
    """The table's store name in an erasure job (`delta_gold_interactions`)."""
    return "delta_" + table.replace("/", "_")


DERIVED_STORES = tuple(store_name(t) for t in DERIVED_TABLES)


class StaleWriteError(RuntimeError):
    """A derived write computed from inputs read before an erasure: recompute it."""


def fenced_since(dt: DeltaTable | None, based_on: int) -> bool:
    """Did an erasure commit to the table after version `based_on` (-1: before it
    existed)? Purged history counts as yes: only an erasure drops a derived table's log."""
    if dt is None:
        return False
    current = dt.version()
    if current <= based_on:
        return False
    history = dt.history(current - based_on)
    versions = [int(h["version"]) for h in history if "version" in h]
    if not versions or min(versions) > based_on + 1:
        return True
    return any(h.get(FENCE_KEY) for h in history if int(h.get("version", -1)) > based_on)


def erase_derived(
    uri: str,
    actors: Sequence[str],
    columns: Sequence[str],
    *,
    storage_options: Mapping[str, str] | None = None,
    attempts: int = 10,
) -> int:
    """Remove the actors' rows from a derived table, current version and history alike.

    Order: fence (a log-retention change marked `FENCE_KEY`), delete, vacuum every
    removed file, then `purge_history` (the delete's predicate names the actors).
    Returns the rows deleted. Commit conflicts with concurrent writers (another
    erasure, maintenance, an asset) are retried.
    """
    options = dict(storage_options or {})

    def table() -> DeltaTable:
        return DeltaTable(uri, storage_options=options)

    previous = _retention(table())
    fence = CommitProperties(custom_metadata={FENCE_KEY: "fence"})
    _retry(
        lambda: table().alter.set_table_properties({LOG_RETENTION: ZERO}, commit_properties=fence),
        attempts,
    )
    names = {f.name for f in table().schema().fields}
    present = [c for c in columns if c in names]
    deleted = 0
    if present and actors:
        quoted = ", ".join("'" + a.replace("'", "''") + "'" for a in actors)
        predicate = " OR ".join(f"{c} IN ({quoted})" for c in present)
        metrics = _retry(lambda: table().delete(predicate), attempts)
        deleted = int(metrics.get("num_deleted_rows", 0))
    _retry(lambda: vacuum_now(table()), attempts)
    purge_history(uri, storage_options=options, attempts=attempts, restore=previous)
    return deleted


def _retention(dt: DeltaTable) -> str:
    value = dt.metadata().configuration.get(LOG_RETENTION) or DEFAULT_LOG_RETENTION
    return DEFAULT_LOG_RETENTION if value == ZERO else value  # ZERO: a concurrent erasure's


def purge_history(
    uri: str,
    *,
    storage_options: Mapping[str, str] | None = None,
    attempts: int = 10,
    restore: str | None = None,
) -> int:
    """Drop every log entry and checkpoint older than a fresh checkpoint, so no old
    commit (a delete predicate naming an id, `add` statistics of an erased client-chosen
    key) survives. Order: a fence commit (log retention 0, marked `FENCE_KEY`) so the
    checkpoint is newer than everything to forget, checkpoint, cleanup, then the log
    retention back. Time travel before the checkpoint is lost; returns its version."""
    options = dict(storage_options or {})

    def table() -> DeltaTable:
        return DeltaTable(uri, storage_options=options)

    previous = restore or _retention(table())
    fence = CommitProperties(custom_metadata={FENCE_KEY: "fence"})

    def set_retention(value: str) -> None:
        table().alter.set_table_properties({LOG_RETENTION: value}, commit_properties=fence)

    _retry(lambda: set_retention(ZERO), attempts)
    dt = table()
    dt.create_checkpoint()
    version = dt.version()
    dt.cleanup_metadata()
    _retry(lambda: set_retention(previous), attempts)
    return version


def log_mentions(uri: str, needles: Needles) -> bool:
    """Does any file of the table's `_delta_log` (commits, checkpoints) name an id?
    Only a local table can be looked at byte by byte: for any other, True (purge)."""
    if "://" in uri and not uri.startswith("file://"):
        return True
    log_dir = Path(uri.removeprefix("file://")) / "_delta_log"
    return bool(scan_tree(log_dir, needles))


def vacuum_now(dt: DeltaTable) -> int:
    """Delete every file removed from the table, however recently. Files removed in
    the current millisecond are not yet older than a zero retention's cutoff, hence the
    short pause. Returns the files deleted."""
    time.sleep(0.005)
    return len(dt.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False))


def _retry(fn: Callable[[], T], attempts: int) -> T:
    for attempt in range(attempts):
        try:
            return fn()
        except CommitFailedError:
            if attempt + 1 == attempts:
                raise
            time.sleep(0.02 * (2 ** min(attempt, 6)))
    raise AssertionError("unreachable")
