"""The model registry in the online store: every version, one promoted."""

import dagster as dg

from definitions.assets.evaluation import model_evaluation
from definitions.batch.artifacts import read_candidate, read_metrics
from definitions.batch.quality import promotion_decision
from definitions.partitions import IO_RETRY
from definitions.resources import NextbestResource

METRIC = "ndcg@10"


@dg.asset(deps=[model_evaluation], group_name="model", kinds={"sql"}, retry_policy=IO_RETRY)
def model_registry(context: dg.AssetExecutionContext, nextbest: NextbestResource):
    """Registers the candidate version (metrics, artifact path, the bronze Delta version
    it was trained on) and promotes it unless its nDCG@10 falls below the promoted
    model's by more than `promotion_tolerance`; a regressing candidate is kept as
    `rejected`. Serving loads whatever is promoted here."""
    models_dir = nextbest.models_dir()
    candidate = read_candidate(models_dir)
    version = candidate["version"]
    metrics = read_metrics(models_dir, version)
    with nextbest.online() as store:
        current = store.promoted_model()
        store.register_model(
            version=version,
            metrics=metrics,
            params={
                **candidate["params"],
                "events_rows": candidate["events_rows"],
                "training_seconds": candidate["training_seconds"],
            },
            artifact_path=candidate["artifact_path"],
            data_version=candidate["data_version"],
        )
        if current is not None and current.version == version:
            promote, reason = True, "already promoted"
        else:
            previous = None if current is None else current.metrics.get(METRIC)
            promote, reason = promotion_decision(
                float(metrics[METRIC]),
                None if previous is None else float(previous),
                tolerance=nextbest.promotion_tolerance,
            )
        record = (
            store.promote_model(version) if promote else store.set_model_status(version, "rejected")
        )
        served = store.promoted_model()
    context.log.info(f"model {version}: {record.status} ({reason})")
    return dg.MaterializeResult(
        metadata={
            "version": version,
            "status": record.status,
            "promoted": promote,
            "reason": reason,
            "previous_version": current.version if current else "",
            "served_version": served.version if served else "",
            METRIC: float(metrics[METRIC]),
        }
    )
