"""Delta maintenance (compaction, vacuum, checkpoints), mixed into `storage.delta.store.DeltaStore`.

Kept apart because it is the one place where concurrent writers need more than delta-rs's
optimistic commits: overlapping compactions must be serialized (`storage.delta.locks`).
"""

from typing import Any

from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

from storage.delta.locks import compaction_lock


class DeltaMaintenance:
    """Maintenance operations; `DeltaStore` provides the table access they use."""

    max_attempts: int
    storage_options: dict[str, str]

    def uri(self, table: str) -> str:
        raise NotImplementedError

    def _open(self, table: str, version: int | None = None) -> DeltaTable:
        raise NotImplementedError

    def _sleep(self, attempt: int) -> None:
        raise NotImplementedError

    def file_count(self, table: str) -> int:
        raise NotImplementedError

    def compact(self, table: str, *, target_size: int | None = None) -> dict[str, Any]:
        """Bin-pack small files (OPTIMIZE); returns delta-rs metrics.

        One at a time per table: delta-rs commits overlapping compactions both and
        duplicates every compacted row (delta-io/delta-rs#3982, `storage.delta.locks`).
        """
        with compaction_lock(self.uri(table), self.storage_options):
            for attempt in range(self.max_attempts):
                try:
                    return dict(self._open(table).optimize.compact(target_size=target_size))
                except CommitFailedError:
                    if attempt + 1 == self.max_attempts:
                        raise
                    self._sleep(attempt)
        raise AssertionError("unreachable")

    def vacuum(
        self,
        table: str,
        *,
        retention_hours: int,
        dry_run: bool = False,
        enforce_retention_duration: bool = True,
    ) -> list[str]:
        """Delete files removed from the table longer than `retention_hours` ago.

        delta-rs "lite" mode: only tombstoned files go, never a concurrent writer's
        not-yet-committed file, so this is safe while the stream appends.
        """
        return list(
            self._open(table).vacuum(
                retention_hours=retention_hours,
                dry_run=dry_run,
                enforce_retention_duration=enforce_retention_duration,
            )
        )

    def checkpoint(self, table: str, *, cleanup_log: bool = False) -> int:
        """Write a checkpoint at the current version (faster opens); returns that version.

        `cleanup_log` also removes log entries older than `delta.logRetentionDuration`.
        """
        dt = self._open(table)
        dt.create_checkpoint()
        if cleanup_log:
            dt.cleanup_metadata()
        return dt.version()

    def maintain(
        self,
        table: str,
        *,
        retention_hours: int,
        target_size: int | None = None,
        enforce_retention_duration: bool = True,
    ) -> dict[str, Any]:
        """compact + vacuum + checkpoint, as one plain dict for Dagster metadata."""
        compacted = self.compact(table, target_size=target_size)
        removed = self.vacuum(
            table,
            retention_hours=retention_hours,
            enforce_retention_duration=enforce_retention_duration,
        )
        version = self.checkpoint(table)
        return {
            "compact": compacted,
            "vacuumed_files": len(removed),
            "checkpoint_version": version,
            "files": self.file_count(table),
        }
