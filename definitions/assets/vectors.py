"""Item vectors of the served model in LanceDB, for retrieval by the API."""

import dagster as dg
import numpy as np
import pyarrow as pa

from definitions.assets.registry import model_registry
from definitions.batch.history import item_catalog
from definitions.metadata import TABLE_NAME, lance_metadata, table_name
from definitions.partitions import IO_RETRY
from definitions.resources import NextbestResource
from nextbest.learn.model import ItemModel

_ARROW = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


@dg.asset(
    deps=[model_registry],
    group_name="serving",
    kinds={"lancedb"},
    metadata={TABLE_NAME: table_name("lancedb", "items")},
    retry_policy=IO_RETRY,
)
def item_vectors(nextbest: NextbestResource) -> dg.MaterializeResult:
    """The promoted model's item vectors with the catalog attributes, upserted into the
    LanceDB `items` table (Dagster is its only writer: concurrent LanceDB merges
    duplicate rows). Rewritten even when the candidate was not promoted, so attribute
    changes in the catalog reach retrieval filters. Items without interactions are
    included with their cold-start vectors (from their text, else their group), so a
    vector search can retrieve them."""
    spec, store = nextbest.load_spec(), nextbest.delta()
    with nextbest.online() as online:
        promoted = online.promoted_model()
    if promoted is None or not promoted.artifact_path:
        raise RuntimeError("no promoted model; materialize model_registry first")
    model = nextbest.models_dir().load(promoted.artifact_path, ItemModel.load)
    catalog = item_catalog(store, spec)
    dim = spec.model.dim
    vectors = np.ascontiguousarray(model.vectors[:, :dim], dtype=np.float32)
    columns: dict[str, pa.Array] = {
        "item_id": pa.array(model.item_ids, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
    }
    for name, attr in spec.entities.item.attributes.items():
        values = [catalog.get(i, {}).get(name) for i in model.item_ids]
        columns[name] = pa.array(values, _ARROW[attr.type])
    lance = nextbest.vectors(spec)
    written = lance.upsert_items(pa.table(columns), model_version=promoted.version)
    indexed = lance.index_items()
    return dg.MaterializeResult(
        metadata={
            **lance_metadata(lance.uri, "items", lance.schemas["items"], lance.count("items")),
            "upserted": written,
            "model_version": promoted.version,
            "dim": dim,
            "cold_start_from_text": int(model.params.get("cold_start", {}).get("from_text", 0)),
            "indexed": ", ".join(indexed),
            "lance_version": lance.version("items"),
        }
    )
