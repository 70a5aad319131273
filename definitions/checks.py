"""Asset checks. Blocking ones stop a retrain when its input is bad: a run whose bronze
table lost its schema, is empty or holds duplicate event ids, or whose model falls
below the metric floor, does not go on to register or serve anything."""

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from definitions.assets import (
    bronze_events,
    cached_decisions,
    gold_interactions,
    item_vectors,
    model_evaluation,
    offer_policy,
)
from definitions.assets.decisions import active_histories
from definitions.assets.offer_policy import read_registry
from definitions.assets.offer_uplift import UPLIFT_POINTER, read_uplift
from definitions.batch.arrow import pc
from definitions.batch.artifacts import read_candidate, read_json_file, read_metrics
from definitions.batch.history import INTERACTIONS_TABLE
from definitions.resources import NextbestResource
from storage.delta.schemas import EVENTS_SCHEMA

RANKING_METRICS = ("ndcg@10", "precision@10", "recall@10", "map@10", "coverage@10")


@dg.asset_check(asset=bronze_events, blocking=True)
def bronze_events_schema(nextbest: NextbestResource) -> dg.AssetCheckResult:
    """Every column of the bronze contract is present with its type."""
    actual = nextbest.delta().schema("events")
    problems = []
    for field in EVENTS_SCHEMA:
        if field.name not in actual.names:
            problems.append(f"missing {field.name}")
        elif actual.field(field.name).type != field.type:
            problems.append(f"{field.name}: {actual.field(field.name).type} != {field.type}")
    return dg.AssetCheckResult(
        passed=not problems, metadata={"problems": "; ".join(problems) or "none"}
    )


@dg.asset_check(asset=bronze_events, blocking=True)
def bronze_events_not_empty(nextbest: NextbestResource) -> dg.AssetCheckResult:
    """There is history to train on."""
    rows = nextbest.delta().count("events")
    return dg.AssetCheckResult(passed=rows > 0, metadata={"rows": rows})


@dg.asset_check(asset=bronze_events, blocking=True)
def bronze_events_unique_ids(nextbest: NextbestResource) -> dg.AssetCheckResult:
    """No event id appears twice: idempotent sinks make a duplicate a bug, and it would
    double-count an interaction in training."""
    ids = nextbest.delta().read("events", columns=["event_id"]).column("event_id")
    distinct = pc.count_distinct(ids).as_py() if len(ids) else 0
    return dg.AssetCheckResult(
        passed=distinct == len(ids), metadata={"rows": len(ids), "duplicates": len(ids) - distinct}
    )


@dg.asset_check(asset=bronze_events)
def bronze_events_fresh(nextbest: NextbestResource) -> dg.AssetCheckResult:
    """Something was ingested within `freshness_hours` (a warning: the stream may be down)."""
    ingested = nextbest.delta().read("events", columns=["ingested_at"]).column("ingested_at")
    newest = pc.max(ingested).as_py() if len(ingested) else None
    limit = timedelta(hours=nextbest.freshness_hours)
    age = None if newest is None else datetime.now(UTC) - newest
    return dg.AssetCheckResult(
        passed=age is not None and age <= limit,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "last_ingested": str(newest),
            "age_hours": round(age.total_seconds() / 3600, 3) if age is not None else -1.0,
        },
    )


@dg.asset_check(asset=gold_interactions, blocking=True)
def gold_interactions_not_empty(nextbest: NextbestResource) -> dg.AssetCheckResult:
    """At least one positive (user, item) weight: otherwise there is nothing to learn."""
    table = nextbest.delta().read(INTERACTIONS_TABLE, columns=["weight"])
    positive = int(pc.sum(pc.greater(table.column("weight"), 0)).as_py() or 0)
    return dg.AssetCheckResult(passed=positive > 0, metadata={"positive_pairs": positive})


@dg.asset_check(asset=model_evaluation, blocking=True)
def model_evaluation_floor(nextbest: NextbestResource) -> dg.AssetCheckResult:
    """Metrics are finite, within [0, 1], and nDCG@10 reaches `min_ndcg`: a broken model
    is never registered or served."""
    models = nextbest.models_dir()
    metrics = read_metrics(models, read_candidate(models)["version"])
    bad = [
        m
        for m in RANKING_METRICS
        if not (isinstance(metrics.get(m), float) and math.isfinite(metrics[m]))
        or not 0.0 <= metrics[m] <= 1.0
    ]
    ndcg = float(metrics.get("ndcg@10", 0.0))
    return dg.AssetCheckResult(
        passed=not bad and ndcg >= nextbest.min_ndcg,
        metadata={"ndcg@10": ndcg, "floor": nextbest.min_ndcg, "invalid": ", ".join(bad) or "none"},
    )


@dg.asset_check(asset=item_vectors)
def item_vectors_match_model(nextbest: NextbestResource) -> dg.AssetCheckResult:
    """Every item of the promoted model has a vector carrying that model's version."""
    spec = nextbest.load_spec()
    with nextbest.online() as online:
        promoted = online.promoted_model()
    if promoted is None:
        return dg.AssetCheckResult(passed=False, metadata={"reason": "no promoted model"})
    lance = nextbest.vectors(spec)
    versions = lance.checkout("items", lance.version("items")).to_arrow().column("model_version")
    current = int(pc.sum(pc.equal(versions, promoted.version)).as_py() or 0)
    return dg.AssetCheckResult(
        passed=current == len(versions) > 0,
        metadata={"items": len(versions), "with_promoted_version": current},
    )


@dg.asset_check(asset=cached_decisions)
def cached_decisions_current(nextbest: NextbestResource) -> dg.AssetCheckResult:
    """A sample of active users has cached decisions from the promoted model."""
    with nextbest.online() as online:
        promoted = online.promoted_model()
        users = sorted(set(active_histories(nextbest.delta(), active_days=nextbest.active_days)[0]))
        sample = users[:: max(1, len(users) // 50)]
        stale = [
            u
            for u in sample
            if (d := online.get_cached_decision(u)) is None
            or promoted is None
            or d.model_version != promoted.version
        ]
    return dg.AssetCheckResult(
        passed=bool(sample) and not stale,
        metadata={"sampled": len(sample), "stale": len(stale)},
    )


@dg.asset_check(asset=offer_policy)
def offer_policy_registered(nextbest: NextbestResource) -> dg.AssetCheckResult:
    """The offer policy the API serves is the one the registry last promoted, and its
    artifact loads: nothing reached `uplift.json` around the gate. A pointer written by
    a version before the gate (no `gate` field, nothing ever promoted, its version
    unknown to the registry) is legacy-served: it passes with a warning in metadata,
    and the next candidate is gated against it like any served model."""
    models = nextbest.models_dir()
    pointer = read_json_file(models / UPLIFT_POINTER)
    registry = read_registry(models)
    promoted = registry["served"]
    if pointer is None:
        return dg.AssetCheckResult(
            passed=promoted is None,
            metadata={"served": "none (offers ranked by priority)", "registry": str(promoted)},
        )
    served = pointer.get("version")
    loads = read_uplift(models) is not None
    registered = promoted is not None and promoted.get("version") == served
    decided = {e.get("version") for e in registry["history"]}
    legacy = promoted is None and "gate" not in pointer and served not in decided
    metadata: dict[str, Any] = {
        "served": str(served),
        "registry_promoted": str(promoted.get("version") if promoted else None),
        "artifact_loads": loads,
    }
    if legacy:
        metadata["warning"] = (
            f"{UPLIFT_POINTER} ({served}) predates the registry: served without an OPE "
            "gate; the next candidate is evaluated against it"
        )
    return dg.AssetCheckResult(passed=loads and (registered or legacy), metadata=metadata)


ALL_CHECKS = [
    bronze_events_schema,
    bronze_events_not_empty,
    bronze_events_unique_ids,
    bronze_events_fresh,
    gold_interactions_not_empty,
    model_evaluation_floor,
    item_vectors_match_model,
    cached_decisions_current,
    offer_policy_registered,
]
