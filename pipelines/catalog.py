"""Item attributes and item vectors, cached in the worker process and refreshed.

The stream needs an item's attributes for `group_by` and attribute fields (category,
price) and its vector for the session vector. Reading a store per event would cap
throughput at the store's latency, so each process keeps a snapshot in memory:
LanceDB `items` (vectors + attributes, written by Dagster) when it has rows, else the
Delta `items` catalog (attributes only). A background thread reloads it every
`refresh_s`; a failed reload keeps the previous snapshot.
"""

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from nextbest.settings import Settings
from nextbest.spec.models import Spec
from storage.delta.store import DeltaStore
from storage.vectors import VectorStore

log = logging.getLogger(__name__)

ITEMS_TABLE = "items"


class ItemCatalog(Protocol):
    def item(self, item_id: str) -> Mapping[str, Any] | None: ...

    def vectors(self) -> Mapping[str, np.ndarray]: ...


class StaticCatalog:
    """A fixed catalog (tests, benchmarks, replays of a known snapshot)."""

    def __init__(
        self,
        items: Mapping[str, Mapping[str, Any]] | None = None,
        vectors: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self._items = dict(items or {})
        self._vectors = {k: np.asarray(v, dtype=np.float32) for k, v in (vectors or {}).items()}

    def item(self, item_id: str) -> Mapping[str, Any] | None:
        return self._items.get(item_id)

    def vectors(self) -> Mapping[str, np.ndarray]:
        return self._vectors


def read_catalog(
    settings: Settings, spec: Spec
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """One snapshot of (attributes by item id, vectors by item id) from the stores."""
    attrs = list(spec.entities.item.attributes)
    items, vectors = _read_lance(settings, spec, attrs)
    if items:
        return items, vectors
    delta = DeltaStore.from_settings(settings)
    if not delta.exists(ITEMS_TABLE):
        return {}, {}
    table = delta.read(ITEMS_TABLE)
    return _rows_by_id(table, attrs), {}


def _read_lance(
    settings: Settings, spec: Spec, attrs: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    types = {n: a.type for n, a in spec.entities.item.attributes.items()}
    store = VectorStore.from_settings(
        settings,
        dim=spec.model.dim,
        item_attributes=types,  # type: ignore[arg-type]
        read_consistency_interval=None,
    )
    try:
        version = store.version(ITEMS_TABLE)
    except LookupError:  # Dagster has not written item vectors yet
        return {}, {}
    table = store.checkout(ITEMS_TABLE, version).to_arrow()
    if table.num_rows == 0:
        return {}, {}
    ids = table.column("item_id").to_pylist()
    matrix = _matrix(table.column("vector"), spec.model.dim)
    vectors = {item_id: matrix[i] for i, item_id in enumerate(ids)}
    return _rows_by_id(table, attrs), vectors


def _matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(-1, dim)


def _rows_by_id(table: pa.Table, attrs: list[str]) -> dict[str, dict[str, Any]]:
    present = [a for a in attrs if a in table.column_names]
    data = table.select(["item_id", *present]).to_pylist()
    return {row.pop("item_id"): row for row in data}


class StoreCatalog:
    """Lazily loaded, periodically refreshed snapshot of the stores' catalog.

    Shared by the workers of one process (reads are lock-free swaps of whole dicts).
    """

    def __init__(self, settings: Settings, spec: Spec, *, refresh_s: float = 60.0) -> None:
        self._settings = settings
        self._spec = spec
        self._refresh_s = refresh_s
        self._items: dict[str, dict[str, Any]] = {}
        self._vectors: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._loaded = False
        self._thread: threading.Thread | None = None

    def item(self, item_id: str) -> Mapping[str, Any] | None:
        self._ensure()
        return self._items.get(item_id)

    def vectors(self) -> Mapping[str, np.ndarray]:
        self._ensure()
        return self._vectors

    def reload(self) -> None:
        items, vectors = read_catalog(self._settings, self._spec)
        self._items, self._vectors = items, vectors  # two atomic rebinds

    def _ensure(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            try:
                self.reload()
            except Exception:  # a missing or broken store must not stop the stream
                log.exception("loading the item catalog failed; continuing without it")
            self._loaded = True
            if self._refresh_s > 0:
                self._thread = threading.Thread(
                    target=self._refresh_forever, name="catalog-refresh", daemon=True
                )
                self._thread.start()

    def _refresh_forever(self) -> None:
        while True:
            time.sleep(self._refresh_s)
            try:
                self.reload()
            except Exception:
                log.exception("refreshing the item catalog failed; keeping the old snapshot")
