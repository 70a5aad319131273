"""Dagster's standard metadata (`dagster/*` keys) for the tables the assets write or
observe, so the UI shows the row-count badge, the Columns tab and each table's address.

Counts and schemas of Delta tables come from the Delta log at the version in question
(per-file `numRecords`, the table's schema): no data file is opened, which matters for
bronze, observed every minute by a sensor.
"""

from typing import Any

import dagster as dg
import pyarrow as pa
from deltalake import DeltaTable

from definitions.batch.arrow import pc
from storage.delta.store import DeltaStore

ROW_COUNT = "dagster/row_count"
COLUMN_SCHEMA = "dagster/column_schema"
URI = "dagster/uri"
TABLE_NAME = "dagster/table_name"
"""Dagster 1.13's name for the former `dagster/relation_identifier` (still read as an alias)."""
DATA_VERSION_TAG = "dagster/data_version"
"""The event tag an observation's data version travels in (not re-exported by Dagster)."""


def column_schema(schema: pa.Schema) -> dg.TableSchema:
    """The Columns tab of an Arrow schema (Delta and LanceDB tables both have one)."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                field.name,
                str(field.type),
                constraints=dg.TableColumnConstraints(nullable=field.nullable),
            )
            for field in schema
        ]
    )


def table_name(storage: str, table: str) -> str:
    """`delta.gold.interactions`, `lancedb.items`: the table's path under its store."""
    return ".".join([storage, *table.split("/")])


def delta_definition(table: str, schema: pa.Schema | None = None) -> dict[str, Any]:
    """Definition metadata: the table's name, and its columns when the schema is fixed
    (`storage.delta.schemas`), so the Columns tab shows before the first run."""
    out: dict[str, Any] = {TABLE_NAME: table_name("delta", table)}
    if schema is not None:
        out[COLUMN_SCHEMA] = column_schema(schema)
    return out


def delta_snapshot(store: DeltaStore, table: str, version: int | None = None) -> DeltaTable:
    return DeltaTable(store.uri(table), version=version, storage_options=store.storage_options)


def add_actions(dt: DeltaTable) -> pa.Table:
    """One row per data file of the snapshot: path, num_records, min/max stats, partition."""
    return pa.table(dt.get_add_actions(flatten=True))


def row_count(dt: DeltaTable, files: pa.Table | None = None) -> int:
    """Rows of the snapshot from the log's per-file `numRecords` (a scan of the files'
    footers only when a file was written without statistics)."""
    table = add_actions(dt) if files is None else files
    if table.num_rows == 0:
        return 0
    counts = table.column("num_records")
    if counts.null_count:
        return dt.to_pyarrow_dataset().count_rows()
    return int(pc.sum(counts).as_py())


def delta_metadata(
    store: DeltaStore,
    table: str,
    *,
    version: int | None = None,
    dt: DeltaTable | None = None,
    files: pa.Table | None = None,
) -> dict[str, Any]:
    """Row count, column schema, URI and name of a Delta table at `version` (latest
    when None; or of the snapshot `dt` already open, with its `files` when read): what
    every asset writing or observing a Delta table reports."""
    dt = dt or delta_snapshot(store, table, version)
    return {
        ROW_COUNT: row_count(dt, files),
        COLUMN_SCHEMA: column_schema(pa.schema(dt.schema())),
        URI: store.uri(table),
        TABLE_NAME: table_name("delta", table),
    }


def lance_metadata(uri: str, table: str, schema: pa.Schema, rows: int) -> dict[str, Any]:
    """The same keys for a LanceDB table (`<uri>/<table>.lance`)."""
    return {
        ROW_COUNT: rows,
        COLUMN_SCHEMA: column_schema(schema),
        URI: f"{uri.rstrip('/')}/{table}.lance",
        TABLE_NAME: table_name("lancedb", table),
    }
