"""LanceDB vector store: item vectors (batch-trained) and user vectors (stream-updated).

The only module that talks to LanceDB. Two tables under one LanceDB URI:
`items` (item_id, vector, one column per declared item attribute, model_version,
updated_at) and `users` (user_id, vector, event_ts, updated_at).

Single-writer rule: each table has exactly one writer process. `merge_insert` from two
processes at once can both insert the same new key, because new rows touch no existing
fragment and conflict detection does not see them, so the table ends up with duplicate
rows (lance-format/lance#4585, "MergeInsert produces duplicated rows"). Therefore the
stream process is the only writer of `users` (including erasure deletes, which it must
perform or be paused for) and Dagster the only writer of `items`. Every other process
only reads. `optimize(..., cleanup_older_than=timedelta(0))` additionally assumes no
reader holds an older version open, since it deletes those versions' files.
"""

import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Self

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import BTree, HnswSq
from lancedb.query import LanceVectorQueryBuilder
from lancedb.table import Table

from nextbest.settings import Settings
from storage.objectstore import lance_options

AttrType = Literal["string", "int", "float", "bool"]
TableName = Literal["items", "users"]
Rows = pa.Table | Sequence[Mapping[str, Any]]

_ARROW_TYPES = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
_TS = pa.timestamp("us", tz="UTC")
_KEYS: dict[str, str] = {"items": "item_id", "users": "user_id"}
_RESERVED = frozenset({"item_id", "vector", "model_version", "updated_at", "score", "distance"})
# Keep `IN (...)` lists bounded so filter strings stay reasonable for the SQL parser.
_IN_CHUNK = 1000


def sql_literal(value: str) -> str:
    """Quote a string for a Lance SQL filter (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def _in_list(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(sql_literal(v) for v in values)})"


class VectorSnapshot:
    """Read-only view of one table at one version, on its own handle.

    The store's live handles stay on the latest version, so reading history never
    disturbs writers or other readers.
    """

    def __init__(self, table: Table, *, name: TableName, version: int) -> None:
        self._table = table
        self.name: TableName = name
        self.version = version

    def count(self) -> int:
        return self._table.count_rows()

    def to_arrow(self) -> pa.Table:
        return self._table.to_arrow()

    def get_vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return _get_vectors(self._table, _KEYS[self.name], ids)

    def search(
        self,
        vector: Any,
        *,
        k: int,
        where: str | None = None,
        exclude: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        return _search(self._table, _KEYS[self.name], vector, k=k, where=where, exclude=exclude)


class VectorStore:
    """Items and users vector tables in one LanceDB database.

    `read_consistency_interval` is LanceDB's: timedelta(0) makes every read see the
    latest commit of the writer process (needed for fresh user vectors); None never
    re-checks (fastest, for a process that is itself the writer).
    """

    def __init__(
        self,
        uri: str,
        *,
        dim: int,
        item_attributes: Mapping[str, AttrType] = {},
        storage_options: Mapping[str, str] | None = None,
        read_consistency_interval: timedelta | None = timedelta(0),
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        for name, kind in item_attributes.items():
            if name in _RESERVED:
                raise ValueError(f"item attribute {name!r} collides with a reserved column")
            if kind not in _ARROW_TYPES:
                raise ValueError(f"item attribute {name!r}: unknown type {kind!r}")
        self.uri = uri
        self.dim = dim
        self.item_attributes: dict[str, AttrType] = dict(item_attributes)
        # One set of options for every store, spelled for Lance (storage.objectstore).
        self._storage_options = lance_options(uri, storage_options or {})
        self._db = lancedb.connect(
            uri,
            storage_options=self._storage_options,
            read_consistency_interval=read_consistency_interval,
        )
        self._tables: dict[str, Table] = {}
        vector = pa.field("vector", pa.list_(pa.float32(), dim))
        attrs = [pa.field(n, _ARROW_TYPES[t]) for n, t in self.item_attributes.items()]
        key, stamp = pa.field("{}_id", pa.string(), False), pa.field("updated_at", _TS)
        self.schemas: dict[str, pa.Schema] = {
            "items": pa.schema(
                [
                    key.with_name("item_id"),
                    vector,
                    *attrs,
                    pa.field("model_version", pa.string()),
                    stamp,
                ]
            ),
            "users": pa.schema(
                [key.with_name("user_id"), vector, pa.field("event_ts", _TS), stamp]
            ),
        }

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        dim: int,
        item_attributes: Mapping[str, AttrType] = {},
        read_consistency_interval: timedelta | None = timedelta(0),
    ) -> Self:
        return cls(
            settings.lance_root,
            dim=dim,
            item_attributes=item_attributes,
            storage_options=settings.storage_options or None,
            read_consistency_interval=read_consistency_interval,
        )

    # -- tables ---------------------------------------------------------------------

    def ensure_tables(self, *, on_mismatch: Literal["error", "recreate"] = "error") -> None:
        """Create missing tables empty; check existing ones against the declared schema.

        A changed dim or attribute set (new model, edited spec) either raises or, with
        `on_mismatch="recreate"`, drops and recreates the table empty (the writer then
        reloads it).
        """
        for name in ("items", "users"):
            schema = self.schemas[name]
            try:
                table = self._db.open_table(name)
            except ValueError:  # "Table 'items' was not found"
                table = self._db.create_table(name, schema=schema, exist_ok=True)
            if not _same_columns(table.schema, schema):
                if on_mismatch == "error":
                    raise ValueError(
                        f"LanceDB table {name!r} at {self.uri} has schema {table.schema} "
                        f"but {schema} is declared; pass on_mismatch='recreate' to rebuild it"
                    )
                self._db.drop_table(name)
                table = self._db.create_table(name, schema=schema)
            self._tables[name] = table

    def _table(self, name: TableName) -> Table:
        table = self._tables.get(name)
        if table is None:
            if name not in _KEYS:
                raise ValueError(f"unknown table {name!r}; expected 'items' or 'users'")
            try:
                table = self._db.open_table(name)
            except ValueError as exc:
                raise LookupError(
                    f"LanceDB table {name!r} missing at {self.uri}; call ensure_tables()"
                ) from exc
            self._tables[name] = table
        return table

    # -- writes (single writer per table, see module docstring) --------------------

    def upsert_items(self, rows: Rows, *, model_version: str | None = None) -> int:
        """Insert or update items by item_id; returns rows written after de-duplication.

        `model_version` fills rows that carry none. Missing attributes become null.
        """
        fill = {"model_version": model_version} if model_version is not None else {}
        return self._upsert("items", rows, fill)

    def upsert_users(self, rows: Rows) -> int:
        """Insert or update user vectors by user_id (stream process only)."""
        return self._upsert("users", rows, {})

    def _upsert(self, name: TableName, rows: Rows, fill: Mapping[str, Any]) -> int:
        key = _KEYS[name]
        if len(rows) == 0:
            return 0
        batch = self._to_arrow(name, rows, fill)
        batch = _dedupe_keep_last(batch, key)
        # Source keys must be unique: a duplicate key matching an existing row raises
        # "Ambiguous merge inserts are prohibited" (lance-format/lance#4535, fixed by
        # #4687), and duplicate *new* keys are both inserted, duplicating rows
        # (lance-format/lance#7907; see also #3661). Hence _dedupe_keep_last above.
        merge = self._table(name).merge_insert(key).when_matched_update_all()
        merge.when_not_matched_insert_all().execute(batch)
        return batch.num_rows

    def _to_arrow(self, name: TableName, rows: Rows, fill: Mapping[str, Any]) -> pa.Table:
        """Align input rows to the table schema: cast, fill defaults, reject unknowns."""
        schema = self.schemas[name]
        table: pa.Table = rows if isinstance(rows, pa.Table) else _from_dicts(rows, self.dim)
        unknown = set(table.column_names) - set(schema.names)
        if unknown:
            raise ValueError(f"unknown columns for {name!r}: {sorted(unknown)}")
        n = table.num_rows
        now = datetime.now(UTC)
        columns: list[pa.Array | pa.ChunkedArray] = []
        for field in schema:
            if field.name in table.column_names:
                col = table.column(field.name)
                if field.name in fill:
                    col = pc.fill_null(col, pa.scalar(fill[field.name], field.type))
                if field.name == "updated_at":
                    col = pc.fill_null(col.cast(_TS), pa.scalar(now, _TS))
            elif field.name == "updated_at":
                col = pa.array([now] * n, _TS)
            elif field.name in fill:
                col = pa.array([fill[field.name]] * n, field.type)
            elif field.nullable and field.name != "vector":
                col = pa.nulls(n, field.type)
            else:
                raise ValueError(f"{name!r} rows need a {field.name!r} column")
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(f"column {field.name!r} is not {field.type}: {exc}") from exc
            if not field.nullable and col.null_count:
                raise ValueError(f"{name!r} rows have null {field.name!r}")
            columns.append(col)
        out = pa.Table.from_arrays(columns, schema=schema)
        if out.column("vector").null_count:
            raise ValueError(f"{name!r} rows have a null vector")
        return out

    def delete_user(self, user_id: str) -> int:
        """Delete a user's vector; returns rows deleted. Erasure then calls optimize().

        Deletes by row id so the user id never lands in a commit's stored predicate
        (a `user_id = '...'` delete is recorded verbatim in the transaction/manifest).
        """
        table = self._table("users")
        query = table.search().where(f"user_id = {sql_literal(user_id)}").with_row_id(True)
        row_ids = query.select(["user_id"]).limit(None).to_arrow().column("_rowid").to_pylist()
        if not row_ids:
            return 0
        table.delete(f"_rowid IN ({', '.join(str(r) for r in row_ids)})")
        return len(row_ids)

    def optimize(
        self,
        table: TableName,
        *,
        cleanup_older_than: timedelta | None = None,
        delete_unverified: bool = False,
    ) -> None:
        """Compact, update indices and remove versions older than `cleanup_older_than`.

        With timedelta(0) (erasure) every fragment holding a soft-deleted row is
        rewritten first: LanceDB's own compaction only rewrites fragments with more
        than 10% deleted rows, which would leave an erased user in an old data file.
        `delete_unverified` also removes leftovers of failed writes younger than 7 days.
        """
        tbl = self._table(table)
        purge = cleanup_older_than is not None and cleanup_older_than <= timedelta(0)
        if purge:
            tbl.to_lance().optimize.compact_files(
                materialize_deletions=True, materialize_deletions_threshold=0.0
            )
            tbl.checkout_latest()
        with warnings.catch_warnings():
            # The caller asked for timedelta(0) on purpose (single-writer rule).
            warnings.filterwarnings("ignore", message=r"optimize\(cleanup_older_than=0\)")
            tbl.optimize(cleanup_older_than=cleanup_older_than, delete_unverified=delete_unverified)
        tbl.checkout_latest()

    def index_items(self, *, vector_min_rows: int = 100_000) -> list[str]:
        """Index items (Dagster, after a load); returns the indexed columns.

        A BTREE on item_id speeds key lookups and merge_insert. A cosine IVF_HNSW_SQ
        index is built only from `vector_min_rows` rows: below that exact search is
        fast and exact. Users get no key index on purpose: a BTREE keeps an erased id in
        its page lookup file after delete + optimize(timedelta(0)) (checked by hand).
        optimize() folds later upserts into existing indices.
        """
        tbl = self._table("items")
        tbl.create_index("item_id", config=BTree())
        if tbl.count_rows() < vector_min_rows:
            return ["item_id"]
        tbl.create_index("vector", config=HnswSq(distance_type="cosine"))
        return ["item_id", "vector"]

    # -- reads -----------------------------------------------------------------------

    def count(self, table: TableName) -> int:
        return self._table(table).count_rows()

    def search_items(
        self,
        vector: Any,
        *,
        k: int,
        where: str | None = None,
        exclude: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """Nearest items by cosine distance, filtered before ranking (prefilter).

        Each result: item_id, distance (cosine, 0 = same direction), score (1 - distance),
        model_version and the item attributes. `where` is a Lance SQL filter such as
        "in_stock = true AND category = 'shoes'".
        """
        return _search(self._table("items"), "item_id", vector, k=k, where=where, exclude=exclude)

    def get_item_vectors(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors of the given items that exist (missing ids are absent)."""
        return _get_vectors(self._table("items"), "item_id", item_ids)

    def similar_items(
        self, item_id: str, *, k: int, where: str | None = None
    ) -> list[dict[str, Any]] | None:
        """The k nearest items to a stored item (itself excluded), as `search_items`
        returns them; None when the table has no vector for `item_id`."""
        vector = self.get_item_vectors([item_id]).get(item_id)
        if vector is None:
            return None
        return self.search_items(vector, k=k, where=where, exclude=[item_id])

    def all_item_vectors(self) -> tuple[list[str], np.ndarray]:
        """Every item id and its vector as an (n, dim) float32 matrix, for in-memory scoring."""
        data = self._table("items").search().select(["item_id", "vector"]).limit(None).to_arrow()
        return data.column("item_id").to_pylist(), _matrix(data.column("vector"), self.dim)

    def get_user_vector(self, user_id: str) -> np.ndarray | None:
        return self.get_user_vectors([user_id]).get(user_id)

    def get_user_vectors(self, user_ids: Sequence[str]) -> dict[str, np.ndarray]:
        return _get_vectors(self._table("users"), "user_id", user_ids)

    def get_user(self, user_id: str) -> dict[str, Any] | None:
        """The user's row: user_id, vector (np.ndarray), event_ts, updated_at."""
        query = self._table("users").search().where(f"user_id = {sql_literal(user_id)}")
        data = query.limit(None).to_arrow()
        if data.num_rows == 0:
            return None
        row = data.slice(data.num_rows - 1).to_pylist()[0]
        row["vector"] = np.asarray(row["vector"], dtype=np.float32)
        return row

    # -- versions --------------------------------------------------------------------

    def version(self, table: TableName) -> int:
        tbl = self._table(table)
        tbl.checkout_latest()
        return tbl.version

    def list_versions(self, table: TableName) -> list[int]:
        """Version numbers still on disk, oldest first."""
        return sorted(int(v["version"]) for v in self._table(table).list_versions())

    def checkout(self, table: TableName, version: int) -> VectorSnapshot:
        """A read-only snapshot of `table` at `version` on a separate handle.

        Raises LookupError if that version was cleaned up by optimize().
        """
        self._table(table)
        try:
            handle = self._db.open_table(table, version=version)
        except (ValueError, RuntimeError) as exc:
            raise LookupError(f"{table!r} version {version} does not exist: {exc}") from exc
        return VectorSnapshot(handle, name=table, version=version)


# -- helpers ---------------------------------------------------------------------------


def _same_columns(actual: pa.Schema, declared: pa.Schema) -> bool:
    return [(f.name, f.type) for f in actual] == [(f.name, f.type) for f in declared]


def _from_dicts(rows: Iterable[Mapping[str, Any]], dim: int) -> pa.Table:
    rows = list(rows)
    if not rows:
        return pa.table({})
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns: dict[str, Any] = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if name == "vector":
            columns[name] = _vector_array(values, dim)
        else:
            columns[name] = pa.array(values)
    return pa.table(columns)


def _vector_array(values: Sequence[Any], dim: int) -> pa.Array:
    if any(v is None for v in values):
        raise ValueError("rows have a null vector")
    matrix = np.asarray([np.asarray(v, dtype=np.float32) for v in values], dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise ValueError(f"vectors must have dimension {dim}, got shape {matrix.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim)


def _dedupe_keep_last(batch: pa.Table, key: str) -> pa.Table:
    """Keep the last row per key, preserving the order of the kept rows."""
    keys = batch.column(key)
    if len(keys.unique()) == batch.num_rows:
        return batch
    last: dict[str, int] = {k: i for i, k in enumerate(keys.to_pylist())}
    return batch.take(pa.array(sorted(last.values()), pa.int64()))


def _matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    flat = column.combine_chunks().flatten()
    values = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32)
    return values.reshape(-1, dim)


def _get_vectors(table: Table, key: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
    unique = list(dict.fromkeys(ids))
    out: dict[str, np.ndarray] = {}
    dim = table.schema.field("vector").type.list_size
    for start in range(0, len(unique), _IN_CHUNK):
        chunk = unique[start : start + _IN_CHUNK]
        data = table.search().where(_in_list(key, chunk)).select([key, "vector"]).limit(None)
        data = data.to_arrow()
        matrix = _matrix(data.column("vector"), dim)
        for i, item_id in enumerate(data.column(key).to_pylist()):
            out[item_id] = matrix[i]
    return out


def _search(
    table: Table,
    key: str,
    vector: Any,
    *,
    k: int,
    where: str | None,
    exclude: Sequence[str],
) -> list[dict[str, Any]]:
    if k < 1:
        return []
    clauses = [f"({where})"] if where else []
    if exclude:
        clauses.append(f"NOT ({_in_list(key, list(dict.fromkeys(exclude)))})")
    columns = [n for n in table.schema.names if n not in ("vector", "updated_at")]
    query = table.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector")
    if not isinstance(query, LanceVectorQueryBuilder):
        raise TypeError(f"expected a vector query, got {type(query).__name__}")
    query = query.distance_type("cosine").select(columns).limit(k)
    if clauses:
        query = query.where(" AND ".join(clauses), prefilter=True)
    results: list[dict[str, Any]] = []
    for row in query.to_arrow().to_pylist():
        distance = float(row.pop("_distance"))
        results.append({key: row.pop(key), "score": 1.0 - distance, "distance": distance, **row})
    return results
