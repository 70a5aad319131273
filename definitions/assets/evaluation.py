"""How good the freshly trained model is, offline and in a replay of recent events."""

import time
from typing import Any

import dagster as dg
import numpy as np

from definitions.assets.interactions import gold_interactions
from definitions.assets.model import item_model
from definitions.batch.arrow import pc
from definitions.batch.artifacts import read_candidate, write_metrics
from definitions.batch.history import (
    INTERACTIONS_TABLE,
    aggregate_pairs,
    decayed,
    group_attribute,
    interactions_of,
    item_catalog,
    item_universe,
    read_events,
)
from definitions.batch.quality import evaluate_split, markdown_report, temporal_replay
from definitions.resources import NextbestResource
from nextbest.settings import Settings
from nextbest.spec.models import Duration, Spec
from nextbest.spec.models import Model as ModelParams
from storage.delta.store import DeltaStore


def compute_metrics(
    spec: Spec,
    store: DeltaStore,
    *,
    seed: int,
    replay_max_events: int,
    params: ModelParams | None = None,
) -> dict[str, float]:
    """Split metrics (nDCG/precision/recall/MAP@10, coverage) and the replay's HR@10,
    over the same item universe `item_model` trains on, for the hyperparameters it
    trained with (`params`, e.g. the tuned ones; default the spec's)."""
    params = params or spec.model
    catalog = item_catalog(store, spec)
    pairs = store.read(INTERACTIONS_TABLE, columns=["user_id", "item_id", "weight"])
    item_ids = item_universe(catalog, pc.unique(pairs.column("item_id")).to_pylist())
    attr = group_attribute(spec)
    groups = [catalog.get(i, {}).get(attr) if attr else None for i in item_ids]
    started = time.perf_counter()
    version = int(store.read(INTERACTIONS_TABLE, columns=["events_version"])[0][0].as_py())
    events = interactions_of(spec, read_events(store, version=version))
    if params.half_life != spec.model.half_life and len(events):
        # Gold is decayed with the spec's half-life; the model was trained with another.
        reference = int(events.ts_ms.max())
        weights = decayed(
            events.weights, events.ts_ms, now_ms=reference, half_life_ms=params.half_life_ms
        )
        pairs = aggregate_pairs(events.actors, events.items, weights, events.ts_ms)
    metrics: dict[str, float] = evaluate_split(
        np.asarray(pairs.column("user_id").to_pylist(), dtype=object),
        np.asarray(pairs.column("item_id").to_pylist(), dtype=object),
        pairs.column("weight").to_numpy(),
        item_ids=item_ids,
        groups=groups,
        params=params,
        seed=seed,
    )
    replay = temporal_replay(
        events,
        item_ids=item_ids,
        groups=groups,
        params=params,
        max_events=replay_max_events,
        seed=seed,
    )
    metrics.update({k: float(v) for k, v in replay.items()})
    metrics["evaluation_seconds"] = round(time.perf_counter() - started, 3)
    return metrics


def evaluate_settings(settings: Settings, spec: Spec, *, seed: int = 0) -> dict[str, float]:
    """The evaluation on the current gold interactions, outside Dagster (`nextbest eval`)."""
    store = DeltaStore.from_settings(settings)
    if not store.exists(INTERACTIONS_TABLE):
        raise FileNotFoundError("no gold interactions yet; run `nextbest materialize` first")
    return compute_metrics(spec, store, seed=seed, replay_max_events=2000)


@dg.asset(deps=[item_model, gold_interactions], group_name="model", kinds={"numpy"})
def model_evaluation(nextbest: NextbestResource) -> dg.MaterializeResult:
    """Offline quality of the candidate's training recipe under the published protocol:
    random stratified 75/25 split of each user's interactions, top-10 with seen items
    removed: nDCG@10, precision@10, recall@10, MAP@10, catalog coverage (and the
    popularity baseline's nDCG). Plus a temporal replay: trained before a cut-off, was
    each later event's item in the top-10 cached at the cut-off vs computed from the
    history up to that event (HR@10 cached vs real-time)."""
    spec, store = nextbest.load_spec(), nextbest.delta()
    candidate = read_candidate(nextbest.models_dir())
    trained = candidate.get("params", {})
    metrics = compute_metrics(
        spec,
        store,
        seed=nextbest.seed,
        replay_max_events=nextbest.replay_max_events,
        params=trained_params(trained),
    )
    tuning = trained.get("tuning")
    metrics.update(tuning_metrics(tuning))
    write_metrics(nextbest.models_dir(), candidate["version"], metrics)
    metadata: dict[str, Any] = {
        name: dg.MetadataValue.float(float(v)) for name, v in metrics.items()
    }
    metadata["version"] = candidate["version"]
    metadata["report"] = dg.MetadataValue.md(markdown_report(metrics))
    if tuning:
        chosen = tuning["chosen"]
        metadata["chosen"] = ", ".join(f"{k}={v}" for k, v in chosen.items() if v is not None)
    return dg.MaterializeResult(metadata=metadata)


def trained_params(params: dict[str, Any]) -> ModelParams | None:
    """The hyperparameters the candidate was trained with (None: a pre-tuning artifact)."""
    fields = {k: v for k, v in params.items() if k in ModelParams.model_fields}
    return ModelParams.model_validate(fields) if fields else None


def tuning_metrics(tuning: dict[str, Any] | None) -> dict[str, float]:
    """Which setting won and by how much, as numbers the registry keeps with the model:
    validation nDCG@10 of the winner and of the spec's own setting, and the gain."""
    if not tuning:
        return {}
    out = {"tuned_validation_ndcg@10": float(tuning["validation_ndcg@10"])}
    if tuning.get("spec_validation_ndcg@10") is not None:
        out["spec_validation_ndcg@10"] = float(tuning["spec_validation_ndcg@10"])
        out["tuning_gain@10"] = float(tuning["validation_gain"])
    if tuning["chosen"].get("l2") is not None:
        out["tuned_l2"] = float(tuning["chosen"]["l2"])
    half_life = tuning["chosen"].get("half_life")
    out["tuned_half_life_days"] = (
        -1.0 if half_life in (None, "none") else Duration(half_life).seconds / 86400
    )  # -1: no decay
    return out
