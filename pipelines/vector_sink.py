"""The LanceDB `users` sink of the stream (session vectors), split from `pipelines.sinks`:
merge_insert by user_id from a single sink partition, so exactly one worker in the
whole cluster writes the table (lance-format/lance#4585); rows are buffered and
sealed like the lake sink's, and written by a background thread.
"""

import time
from typing import Any

from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from nextbest.settings import Settings
from nextbest.spec.models import Spec
from pipelines.background import BackgroundWriter
from pipelines.erasure import ERASE_MARKER, erase_vectors
from storage.vectors import VectorStore

VECTORS_PART = "lance_users"
EXPIRED_MARKER = "__expired__"
"""Key of the row the vector sink gets for an actor whose state expired (`Expired`)."""


VectorBatch = list[dict[str, Any]]


class _VectorPartition(StatefulSinkPartition[dict[str, Any], list[VectorBatch]]):
    def __init__(
        self,
        store: VectorStore,
        *,
        max_rows: int,
        max_delay_s: float,
        resume: list[VectorBatch] | None,
        name: str,
        settings: Settings | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._max_rows = max_rows
        self._max_delay_s = max_delay_s
        self._buffer: dict[str, dict[str, Any]] = {}
        self._first_at: float | None = None
        self._writer: BackgroundWriter[VectorBatch] = BackgroundWriter(self._apply, name=name)
        for batch in resume or []:
            self._writer.submit(batch)

    def write_batch(self, values: list[dict[str, Any]]) -> None:
        self._writer.check()
        for row in values:
            if EXPIRED_MARKER in row:  # spec `state.ttl`: the actor is forgotten
                self._buffer.pop(row[EXPIRED_MARKER], None)
                self._seal()
                self._writer.submit([row])
                continue
            if ERASE_MARKER in row:
                self._buffer.pop(row[ERASE_MARKER], None)
                self._seal()
                self._writer.submit([row])
                continue
            self._buffer[row["user_id"]] = row
        if self._first_at is None and values:
            self._first_at = time.monotonic()
        if len(self._buffer) >= self._max_rows or (
            self._first_at is not None and time.monotonic() - self._first_at >= self._max_delay_s
        ):
            self._seal()

    def _apply(self, batch: VectorBatch) -> None:
        if batch and EXPIRED_MARKER in batch[0]:
            self._store.delete_user(batch[0][EXPIRED_MARKER])
            return
        if batch and ERASE_MARKER in batch[0]:
            if self._settings is not None:
                erase_vectors(self._settings, self._store, batch[0])
            return
        self._store.upsert_users(batch)

    def _seal(self) -> None:
        if self._buffer:
            self._writer.submit(list(self._buffer.values()))
        self._buffer = {}
        self._first_at = None

    def snapshot(self) -> list[VectorBatch]:
        self._seal()
        return self._writer.pending()

    def close(self) -> None:
        self._seal()
        self._writer.drain()


class UserVectorSink(FixedPartitionedSink[dict[str, Any], list[VectorBatch]]):
    """LanceDB `users` session vectors. One partition: the cluster has one writer."""

    def __init__(
        self, settings: Settings, spec: Spec, *, max_rows: int = 20_000, max_delay_s: float = 1.0
    ) -> None:
        self._settings = settings
        self._spec = spec
        self._max_rows = max_rows
        self._max_delay_s = max_delay_s

    def list_parts(self) -> list[str]:
        return [VECTORS_PART]

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _VectorPartition:
        types = {n: a.type for n, a in self._spec.entities.item.attributes.items()}
        store = VectorStore.from_settings(
            self._settings,
            dim=self._spec.model.dim,
            item_attributes=types,  # type: ignore[arg-type]
            read_consistency_interval=None,
        )
        store.ensure_tables()
        return _VectorPartition(
            store,
            max_rows=self._max_rows,
            max_delay_s=self._max_delay_s,
            resume=resume_state,
            name=f"{step_id}-{for_part}",
            settings=self._settings,
        )
