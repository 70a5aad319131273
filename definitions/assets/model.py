"""The default recommender, trained on gold interactions, its hyperparameters chosen on
a time-aware validation split at each retrain (`nextbest.learn.tune`)."""

import time
from typing import Any

import dagster as dg
import scipy.sparse as sp

from definitions.assets.interactions import gold_interactions
from definitions.batch.arrow import pc
from definitions.batch.artifacts import new_version, write_candidate
from definitions.batch.history import (
    INTERACTIONS_TABLE,
    group_attribute,
    interactions_of,
    item_catalog,
    item_universe,
    read_events,
)
from definitions.resources import NextbestResource
from nextbest.learn.model import fit, interaction_matrix
from nextbest.learn.text import join_text
from nextbest.learn.tune import Events, TuneResult, matrix, tune
from nextbest.spec.models import Spec
from storage.delta.store import DeltaStore

CANDIDATE_COLUMNS = (("kind", "string"), ("half_life", "string"), ("l2", "float"),
                     ("ndcg@10", "float"), ("seconds", "float"))  # fmt: skip


def tuned_matrix(
    spec: Spec, store: DeltaStore, *, events_version: int, item_ids: list[str], seed: int
) -> tuple[sp.csr_matrix, TuneResult]:
    """Tune on the events gold was built from (same version, stitching and weights),
    then build the training matrix with the winner's half-life, referenced to the newest
    event as gold is."""
    inter = interactions_of(spec, read_events(store, version=events_version))
    ev = Events.encode(inter.actors, inter.items, inter.weights, inter.ts_ms, item_ids=item_ids)
    result = tune(ev, spec.model, seed=seed)
    return matrix(ev, half_life_ms=result.params.half_life_ms), result


def tuning_metadata(result: TuneResult) -> dict[str, Any]:
    """Every candidate as a table row and as a float entry (the UI plots floats across
    materializations), plus the winner and its gain over the spec's own setting."""
    rows = [c.as_row() for c in result.candidates]
    meta: dict[str, Any] = {
        "tuning": dg.MetadataValue.json(result.summary()),
        "tuning_candidates": dg.MetadataValue.table(
            records=[dg.TableRecord(r) for r in rows],
            schema=dg.TableSchema(columns=[dg.TableColumn(n, t) for n, t in CANDIDATE_COLUMNS]),
        ),
        "chosen": result.best.label,
        "validation_ndcg@10": dg.MetadataValue.float(result.best.ndcg),
        "tuning_seconds": dg.MetadataValue.float(round(result.seconds, 3)),
    }
    if result.gain is not None:
        meta["validation_gain@10"] = dg.MetadataValue.float(result.gain)
    for c in result.candidates:
        meta[f"candidate/{c.label}"] = dg.MetadataValue.float(c.ndcg)
    return meta


@dg.asset(deps=[gold_interactions], group_name="model", kinds={"numpy", "scipy"})
def item_model(context: dg.AssetExecutionContext, nextbest: NextbestResource):
    """The default recommender, trained with `nextbest.learn.model.fit`: EASE (closed-form
    item-item regression) while the catalog fits `model.max_dense_items`, sparse top-k
    item-kNN beyond it so memory stays bounded; truncated-SVD item vectors for
    retrieval; items nobody touched yet get vectors from their `text: true` attributes
    (TF-IDF + SVD mapped into the SVD space, `nextbest.learn.text`), else from their
    group attribute's mean. Unless `model.tune: false`, `l2`, `half_life` and the kind
    are first chosen by nDCG@10 on the newest part of the history (every candidate's
    score is in this materialization's metadata). Saved as `<home>/models/<version>.npz`;
    the registry decides if it is served."""
    spec, store = nextbest.load_spec(), nextbest.delta()
    pairs = store.read(INTERACTIONS_TABLE)
    catalog = item_catalog(store, spec)
    items_col = pairs.column("item_id")
    item_ids = item_universe(catalog, pc.unique(items_col).to_pylist())
    attr = group_attribute(spec)
    groups = [catalog.get(i, {}).get(attr) if attr else None for i in item_ids]
    text_attrs = [n for n, a in spec.entities.item.attributes.items() if a.text]
    texts = [join_text(catalog.get(i), text_attrs) for i in item_ids] if text_attrs else None
    events_version = int(pairs.column("events_version")[0].as_py()) if pairs.num_rows else -1
    version = new_version(events_version)
    started = time.perf_counter()
    result: TuneResult | None = None
    if spec.model.tune is not None and pairs.num_rows:
        x, result = tuned_matrix(
            spec, store, events_version=events_version, item_ids=item_ids, seed=nextbest.seed
        )
        params = result.params
    else:
        x, _ = interaction_matrix(
            pairs.column("user_id").to_pylist(),
            items_col.to_pylist(),
            pairs.column("weight").to_pylist(),
            item_ids=item_ids,
        )
        params = spec.model
    model = fit(x, item_ids=item_ids, groups=groups, params=params, version=version, texts=texts)
    seconds = time.perf_counter() - started
    if result is not None:
        model.params["tuning"] = result.summary()
    path = nextbest.models_dir().save(f"{version}.npz", model.save)
    events_rows = store.count("events", version=events_version) if pairs.num_rows else 0
    info = {
        "version": version,
        "artifact_path": str(path),
        "data_version": str(events_version),
        "events_rows": events_rows,
        "params": model.params,
        "training_seconds": round(seconds, 3),
        "users": int(x.shape[0]),  # type: ignore[index]
        "items": len(item_ids),
        "nonzeros": int(x.nnz),
    }
    write_candidate(nextbest.models_dir(), info)
    chosen = f", chose {result.best.label}" if result else ""
    context.log.info(
        f"trained {version} ({model.params['trained_kind']}{chosen}) in {seconds:.2f}s"
    )
    return dg.MaterializeResult(
        metadata={
            **{k: v for k, v in info.items() if k != "params"},
            "artifact_path": dg.MetadataValue.path(str(path)),
            "hyperparameters": dg.MetadataValue.json(model.params),
            "kind": model.params["trained_kind"],
            "cold_start_from_text": model.params["cold_start"].get("from_text", 0),
            "cold_start_from_group": model.params["cold_start"].get("from_group", 0),
            **(tuning_metadata(result) if result else {}),
        },
        data_version=dg.DataVersion(version),
    )
