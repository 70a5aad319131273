"""The default recommender, trained on gold interactions."""

import time

import dagster as dg

from definitions.assets.interactions import gold_interactions
from definitions.batch.arrow import pc
from definitions.batch.artifacts import new_version, write_candidate
from definitions.batch.history import (
    INTERACTIONS_TABLE,
    group_attribute,
    item_catalog,
    item_universe,
)
from definitions.resources import NextbestResource
from nextbest.learn.model import fit, interaction_matrix


@dg.asset(deps=[gold_interactions], group_name="model", kinds={"numpy", "scipy"})
def item_model(context: dg.AssetExecutionContext, nextbest: NextbestResource):
    """The default recommender, trained with `nextbest.learn.model.fit`: EASE (closed-form
    item-item regression) while the catalog fits `model.max_dense_items`, sparse top-k
    item-kNN beyond it so memory stays bounded; truncated-SVD item vectors for
    retrieval, and vectors from the item's group attribute for items nobody touched
    yet. Saved as `<home>/models/<version>.npz`; the registry decides if it is served."""
    spec, store = nextbest.load_spec(), nextbest.delta()
    pairs = store.read(INTERACTIONS_TABLE)
    catalog = item_catalog(store, spec)
    items_col = pairs.column("item_id")
    item_ids = item_universe(catalog, pc.unique(items_col).to_pylist())
    attr = group_attribute(spec)
    groups = [catalog.get(i, {}).get(attr) if attr else None for i in item_ids]
    events_version = int(pairs.column("events_version")[0].as_py()) if pairs.num_rows else -1
    x, users = interaction_matrix(
        pairs.column("user_id").to_pylist(),
        items_col.to_pylist(),
        pairs.column("weight").to_pylist(),
        item_ids=item_ids,
    )
    version = new_version(events_version)
    started = time.perf_counter()
    model = fit(x, item_ids=item_ids, groups=groups, params=spec.model, version=version)
    seconds = time.perf_counter() - started
    path = model.save(nextbest.models_dir() / f"{version}.npz")
    events_rows = store.count("events", version=events_version) if pairs.num_rows else 0
    info = {
        "version": version,
        "artifact_path": str(path),
        "data_version": str(events_version),
        "events_rows": events_rows,
        "params": model.params,
        "training_seconds": round(seconds, 3),
        "users": len(users),
        "items": len(item_ids),
        "nonzeros": int(x.nnz),
    }
    write_candidate(nextbest.models_dir(), info)
    context.log.info(f"trained {version} ({model.params['trained_kind']}) in {seconds:.2f}s")
    return dg.MaterializeResult(
        metadata={
            **{k: v for k, v in info.items() if k != "params"},
            "artifact_path": dg.MetadataValue.path(str(path)),
            "hyperparameters": dg.MetadataValue.json(model.params),
            "kind": model.params["trained_kind"],
        },
        data_version=dg.DataVersion(version),
    )
