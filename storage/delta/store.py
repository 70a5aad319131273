"""Delta Lake access for nextbest: bronze events, dead letters, the decision log.

With `storage.delta.erasure` (erasure of derived tables and the fence that keeps a stale
write out), the only code that talks to deltalake. Every call opens a fresh `DeltaTable`
snapshot (cheap with checkpoints), so one `DeltaStore` is safe to share across
threads and any number of processes may write the same table: commits are atomic
(put-if-absent of the next log entry) and conflicts are retried here.

Object stores: `Settings.storage_options` (S3 endpoint and credentials), translated by
`storage.objectstore.delta_options`, which also asks for put-if-absent commits on S3.
"""

import random
import re
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError
from deltalake.table import FilterType
from pyarrow.parquet import filters_to_expression

from nextbest.settings import Settings
from storage.delta.erasure import StaleWriteError, fenced_since
from storage.delta.maintenance import DeltaMaintenance
from storage.delta.schemas import (
    TABLES,
    DeadLetter,
    TableName,
    TableSpec,
    conform,
    dead_letters_to_table,
    decisions_to_table,
    events_to_table,
    feedback_to_table,
)
from storage.objectstore import delta_options

__all__ = [
    "TABLES",
    "DeadLetter",
    "DeltaStore",
    "StaleWriteError",
    "TableName",
    "TableSpec",
    "dead_letters_to_table",
    "decisions_to_table",
    "events_to_table",
    "feedback_to_table",
]

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*(/[A-Za-z0-9_][A-Za-z0-9_\-]*)*$")
# Errors after which a write may or may not have landed; `append` re-reads the
# table's txn version before trying again, so retrying them is safe.
_RETRYABLE = (CommitFailedError, OSError)


class DeltaStore(DeltaMaintenance):
    """Named Delta tables under one root (local folder or object-store URI)."""

    def __init__(
        self,
        root: str,
        *,
        storage_options: dict[str, str] | None = None,
        max_attempts: int = 10,
        backoff_s: float = 0.02,
    ) -> None:
        self.root = root.rstrip("/") or root
        # Spelled for deltalake, with put-if-absent commits on S3 (storage.objectstore).
        self.storage_options: dict[str, str] = delta_options(self.root, storage_options or {})
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self._ensured: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> "DeltaStore":
        return cls(settings.delta_root, storage_options=dict(settings.storage_options))

    # -- layout ---------------------------------------------------------------

    def uri(self, table: str) -> str:
        if not _NAME.match(table):
            raise ValueError(f"invalid Delta table name {table!r}")
        return f"{self.root}/{table}"

    def exists(self, table: str) -> bool:
        return DeltaTable.is_deltatable(self.uri(table), storage_options=self.storage_options)

    def ensure_tables(self) -> None:
        """Create every fixed-schema table that is missing (idempotent)."""
        for name in TABLES:
            self._ensure(name)

    def _ensure(self, table: str) -> None:
        spec = TABLES.get(table)
        if spec is None or table in self._ensured:
            return
        if not self.exists(table):
            self._create(spec)
        with self._lock:
            self._ensured.add(table)

    def _create(self, spec: TableSpec) -> None:
        try:
            DeltaTable.create(
                self.uri(spec.name),
                spec.schema,
                mode="ignore",
                partition_by=list(spec.partition_by) or None,
                name=spec.name,
                configuration=spec.configuration,
                storage_options=self.storage_options,
            )
        except CommitFailedError:
            # Another process created version 0 between our check and our commit.
            if not self.exists(spec.name):
                raise

    def _open(self, table: str, version: int | None = None) -> DeltaTable:
        self._ensure(table)
        return DeltaTable(self.uri(table), version=version, storage_options=self.storage_options)

    # -- writes ---------------------------------------------------------------

    def append(self, table: str, data: pa.Table, *, app_id: str, batch_version: int) -> bool:
        """Append `data` exactly once per (`app_id`, `batch_version`).

        Returns True if this call committed it, False if the table already held that
        version or a later one for `app_id` (possibly from this call's own attempt
        whose success was reported as an error). Either way the rows are there once.

        The txn action is recorded in the same commit as the data. delta-rs does not
        skip a txn version it has already seen (delta-io/delta-rs#2580, #3821), so the
        check is ours: read the recorded version from a fresh snapshot, write on top of
        that snapshot, and on any ambiguous failure start over from a fresh read. A
        concurrent commit carrying the same app id makes ours fail with
        "Concurrent transaction failed" (delta-rs conflict checker), never duplicate.
        """
        if batch_version < 0:
            raise ValueError("batch_version must be >= 0")
        data = self._prepare(table, data)
        for attempt in range(self.max_attempts):
            dt = self._open(table)
            recorded = dt.transaction_version(app_id)
            if recorded is not None and batch_version <= recorded:
                return False
            txn = Transaction(app_id, batch_version, int(time.time() * 1000))
            try:
                write_deltalake(
                    dt,
                    data,
                    mode="append",
                    storage_options=self.storage_options,
                    commit_properties=CommitProperties(app_transactions=[txn]),
                )
                return True
            except _RETRYABLE:
                if attempt + 1 == self.max_attempts:
                    raise
                self._sleep(attempt)
        raise AssertionError("unreachable")

    def write(
        self,
        table: str,
        data: pa.Table,
        *,
        mode: Literal["append", "overwrite"],
        partition_by: Sequence[str] | None = None,
        predicate: str | None = None,
        schema_mode: Literal["merge", "overwrite"] | None = None,
        based_on: int | None = None,
    ) -> int:
        """Plain write for derived (silver/gold) tables; returns the table version after it.

        `predicate` with `mode="overwrite"` replaces only the matching rows (e.g. one
        partition of a backfill). Not idempotent: use `append` for retried batches.
        `based_on` (from `pin`, taken before reading the inputs) raises
        `StaleWriteError` when an erasure fenced the table since (`storage.delta.erasure`).
        """
        data = self._prepare(table, data)
        spec = TABLES.get(table)
        if partition_by is None and spec is not None:
            partition_by = spec.partition_by
        for attempt in range(self.max_attempts):
            try:
                parts = list(partition_by) if partition_by else None
                target = self.uri(table) if based_on is None else self._pinned(table, based_on)
                if mode == "overwrite":
                    write_deltalake(
                        target,
                        data,
                        mode="overwrite",
                        partition_by=parts,
                        predicate=predicate,
                        schema_mode=schema_mode,
                        storage_options=self.storage_options,
                    )
                else:
                    if predicate is not None:
                        raise ValueError("predicate needs mode='overwrite'")
                    write_deltalake(
                        target,
                        data,
                        mode="append",
                        partition_by=parts,
                        schema_mode=schema_mode,
                        storage_options=self.storage_options,
                    )
                return self.version(table)
            except CommitFailedError:
                if attempt + 1 == self.max_attempts:
                    raise
                self._sleep(attempt)
        raise AssertionError("unreachable")

    def pin(self, table: str) -> int:
        """The version a derived write is `based_on` (-1 before the table exists); take
        it before reading the inputs, so an erasure in between fences the write."""
        return self.version(table) if self.exists(table) else -1

    def erased_since(self, table: str, based_on: int) -> bool:
        """Did an erasure fence `table` after version `based_on` (from `pin`)?"""
        return fenced_since(self._open(table) if self.exists(table) else None, based_on)

    def _pinned(self, table: str, based_on: int) -> DeltaTable | str:
        """The snapshot to write on, unless an erasure fenced the table since `based_on`
        (a fence landing after this check fails the commit: metadata changed)."""
        dt = self._open(table) if self.exists(table) else None
        if fenced_since(dt, based_on):
            raise StaleWriteError(f"{table}: erased since version {based_on}; recompute")
        return dt if dt is not None else self.uri(table)

    def delete(self, table: str, predicate: str) -> dict[str, Any]:
        """Delete matching rows (a new version; files stay until `vacuum`).

        Erasure is `delete` then `vacuum(retention_hours=0, enforce_retention_duration=False)`.
        Note the predicate text is recorded in the commit's operationParameters.
        """
        for attempt in range(self.max_attempts):
            try:
                return dict(self._open(table).delete(predicate))
            except CommitFailedError:
                if attempt + 1 == self.max_attempts:
                    raise
                self._sleep(attempt)
        raise AssertionError("unreachable")

    def erase(self, table: str, *, column: str, value: str, key_column: str) -> dict[str, Any]:
        """Remove every row with `column == value` from all files, current and past.

        Deletes by the rows' opaque keys (`event_id`, `decision_id`) rather than by
        `value`, because the delete predicate is stored verbatim in the commit log,
        which vacuum keeps. Rows appended after the key scan are not covered: stop or
        drain ingestion for the subject first, or call again.
        """
        keys = self.read(table, columns=[key_column], filters=[(column, "=", value)])
        ids = sorted(set(keys.column(key_column).to_pylist()))
        deleted = 0
        for i in range(0, len(ids), 500):
            chunk = ", ".join(_sql_str(k) for k in ids[i : i + 500])
            deleted += int(self.delete(table, f"{key_column} IN ({chunk})")["num_deleted_rows"])
        removed = (
            self.vacuum(table, retention_hours=0, enforce_retention_duration=False) if ids else []
        )
        return {"deleted_rows": deleted, "vacuumed_files": len(removed)}

    def _prepare(self, table: str, data: pa.Table) -> pa.Table:
        spec = TABLES.get(table)
        return conform(data, spec.schema) if spec is not None else data

    def _sleep(self, attempt: int) -> None:
        delay = self.backoff_s * (2 ** min(attempt, 6))
        time.sleep(delay * (0.5 + random.random()))

    # -- reads and time travel -------------------------------------------------

    def read(
        self,
        table: str,
        *,
        version: int | None = None,
        as_of: datetime | None = None,
        columns: Sequence[str] | None = None,
        filters: FilterType | pc.Expression | None = None,
    ) -> pa.Table:
        """The table's rows, now or at `version` / at the last commit <= `as_of`.

        `filters` is a pyarrow expression or DNF tuples like `[("user_id", "=", "u1")]`.
        Reading a version whose files were vacuumed raises FileNotFoundError.
        """
        dt = self._snapshot(table, version=version, as_of=as_of)
        cols = list(columns) if columns is not None else None
        try:
            return dt.to_pyarrow_table(columns=cols, filters=filters)
        except pa.ArrowNotImplementedError:
            if filters is None:
                raise
        # Files rewritten by `delete()` store strings as string_view (delta-io/delta-rs#4579)
        # and pyarrow has no comparison kernel for string vs string_view
        # (apache/arrow#49368): read unfiltered, cast views back, filter in memory.
        data = _without_views(dt.to_pyarrow_table())
        expr = filters if isinstance(filters, pc.Expression) else filters_to_expression(filters)
        data = data.filter(expr)
        return data.select(cols) if cols is not None else data

    def _snapshot(
        self, table: str, *, version: int | None = None, as_of: datetime | None = None
    ) -> DeltaTable:
        if version is not None and as_of is not None:
            raise ValueError("pass version or as_of, not both")
        if as_of is None:
            return self._open(table, version)
        if as_of.tzinfo is None:
            raise ValueError("as_of must be timezone-aware")
        dt = self._open(table)
        dt.load_as_version(as_of.astimezone(UTC))
        return dt

    def count(
        self, table: str, *, version: int | None = None, as_of: datetime | None = None
    ) -> int:
        return self._snapshot(table, version=version, as_of=as_of).to_pyarrow_dataset().count_rows()

    def version(self, table: str) -> int:
        return self._open(table).version()

    def history(self, table: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        """Commit infos, newest first (version, timestamp ms, operation, metrics)."""
        return [dict(h) for h in self._open(table).history(limit)]

    def transaction_version(self, table: str, app_id: str) -> int | None:
        """Last batch version `append` recorded for `app_id` (None if never)."""
        return self._open(table).transaction_version(app_id)

    def file_count(self, table: str) -> int:
        return len(self._open(table).file_uris())

    def schema(self, table: str) -> pa.Schema:
        """The table's current Arrow schema (for schema checks)."""
        return self._open(table).to_pyarrow_dataset().schema

    def merge(self, table: str, data: pa.Table, *, key: str) -> dict[str, Any]:
        """Upsert `data` by `key` (update matches, insert the rest); creates the table
        on first use. For small keyed tables such as the item catalog; duplicate keys in
        `data` must be removed by the caller (a merge rejects them)."""
        data = self._prepare(table, data)
        if not self.exists(table):
            self.write(table, data, mode="overwrite")
            return {"num_target_rows_inserted": data.num_rows}
        for attempt in range(self.max_attempts):
            try:
                merger = self._open(table).merge(
                    data,
                    predicate=f"t.{key} = s.{key}",
                    source_alias="s",
                    target_alias="t",
                    merge_schema=True,
                )
                return dict(
                    merger.when_matched_update_all().when_not_matched_insert_all().execute()
                )
            except CommitFailedError:
                if attempt + 1 == self.max_attempts:
                    raise
                self._sleep(attempt)
        raise AssertionError("unreachable")


def _sql_str(value: Any) -> str:
    """A SQL string literal for a delta-rs predicate."""
    return "'" + str(value).replace("'", "''") + "'"


def _without_views(data: pa.Table) -> pa.Table:
    """string_view / binary_view columns back to string / binary."""
    fields = []
    for field in data.schema:
        if field.type == pa.string_view():
            field = field.with_type(pa.string())
        elif field.type == pa.binary_view():
            field = field.with_type(pa.binary())
        fields.append(field)
    return data.cast(pa.schema(fields, metadata=data.schema.metadata))
