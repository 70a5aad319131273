"""The asset graph, one small module per asset (bronze_events is observed, not
materialized: the stream writes it):

bronze_events -> silver_sessions (daily partitions)
bronze_events -> gold_interactions -> item_model -> model_evaluation -> model_registry
model_registry -> item_vectors (LanceDB), cached_decisions (online store)
bronze_events -> user_features, training_set
decision_log + feedback_log (external: the API writes them) -> offer_uplift
offer_uplift -> policy_evaluation -> offer_policy (OPE gate)
"""

from definitions.assets.bronze import bronze_events
from definitions.assets.decisions import cached_decisions
from definitions.assets.evaluation import model_evaluation
from definitions.assets.features import user_features
from definitions.assets.interactions import gold_interactions
from definitions.assets.logs import LOG_ASSETS, decision_log, feedback_log
from definitions.assets.model import item_model
from definitions.assets.offer_policy import offer_policy
from definitions.assets.offer_uplift import offer_uplift
from definitions.assets.policy_evaluation import policy_evaluation
from definitions.assets.registry import model_registry
from definitions.assets.sessions import silver_sessions
from definitions.assets.training import training_set
from definitions.assets.vectors import item_vectors

RETRAIN_ASSETS = [
    bronze_events,
    gold_interactions,
    user_features,
    training_set,
    item_model,
    model_evaluation,
    model_registry,
    item_vectors,
    cached_decisions,
    offer_uplift,
    policy_evaluation,
    offer_policy,
]
"""Unpartitioned: the full retrain, one run (offer models and OPE over the decision
log included: they succeed with "no data yet" until decisions are logged)."""

PARTITIONED_ASSETS = [silver_sessions]
"""Day-partitioned history: backfilled by ranges of days."""

ALL_ASSETS = [*RETRAIN_ASSETS, *PARTITIONED_ASSETS]
"""Every asset a run executes: bronze is observed, the rest materialized (`LOG_ASSETS`
are external: lineage, and observations reported by a sensor)."""

__all__ = [
    "ALL_ASSETS",
    "LOG_ASSETS",
    "PARTITIONED_ASSETS",
    "RETRAIN_ASSETS",
    "bronze_events",
    "cached_decisions",
    "decision_log",
    "feedback_log",
    "gold_interactions",
    "item_model",
    "item_vectors",
    "model_evaluation",
    "model_registry",
    "offer_policy",
    "offer_uplift",
    "policy_evaluation",
    "silver_sessions",
    "training_set",
    "user_features",
]
