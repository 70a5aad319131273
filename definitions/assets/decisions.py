"""Precomputed next-best-actions for active users, the API's `cached` source."""

from collections.abc import Mapping
from typing import Any

import dagster as dg
import numpy as np

from definitions.assets.interactions import gold_interactions
from definitions.assets.registry import model_registry
from definitions.batch.arrow import pc
from definitions.batch.history import INTERACTIONS_TABLE, item_catalog
from definitions.batch.quality import scored_top_k
from definitions.partitions import IO_RETRY
from definitions.resources import NextbestResource
from nextbest.learn.model import ItemModel, interaction_matrix
from nextbest.spec.models import Condition, Spec
from storage.delta.store import DeltaStore
from storage.online.models import CachedDecision
from storage.online.serving import ServingStore
from storage.online.store import OnlineStore

_OPS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a is not None and a < b,
    "lte": lambda a, b: a is not None and a <= b,
    "gt": lambda a, b: a is not None and a > b,
    "gte": lambda a, b: a is not None and a >= b,
    "in": lambda a, b: a in b,
    "not_in": lambda a, b: a not in b,
}


def item_allowed(
    conditions: list[Condition], item_ids: list[str], catalog: Mapping[str, Mapping[str, Any]]
) -> np.ndarray:
    """Items passing an action's `item.*` eligibility rules; user/context rules need the
    request and are left to the API. Items missing from the catalog pass."""
    allowed = np.ones(len(item_ids), dtype=bool)
    for cond in conditions:
        scope, _, attr = cond.attr.partition(".")
        if scope != "item":
            continue
        test = _OPS[cond.op]
        for j, item in enumerate(item_ids):
            row = catalog.get(item)
            if row is not None and not test(row.get(attr), cond.value):
                allowed[j] = False
    return allowed


def item_surfaces(spec: Spec) -> list[tuple[str, str]]:
    """(surface, action) pairs whose policy serves an item action."""
    out: list[tuple[str, str]] = []
    for policy in spec.policies.values():
        for name in policy.actions:
            if spec.actions[name].kind == "item":
                out.append((policy.surface, name))
                break
    return out


def active_histories(
    store: DeltaStore, *, active_days: int, users: list[str] | None = None
) -> tuple[list[str], list[str], list[float]]:
    """(user, item, weight) rows of gold interactions for users active in the window."""
    pairs = store.read(INTERACTIONS_TABLE, columns=["user_id", "item_id", "weight", "last_ts_ms"])
    if pairs.num_rows and users is None:
        newest = pc.max(pairs.column("last_ts_ms")).as_py()
        recent = pc.greater_equal(pairs.column("last_ts_ms"), newest - active_days * 86_400_000)
        active = pc.unique(pairs.filter(recent).column("user_id"))
        pairs = pairs.filter(pc.is_in(pairs.column("user_id"), active))
    elif users is not None:
        pairs = pairs.filter(pc.is_in(pairs.column("user_id"), pc.cast(users, "string")))
    return (
        pairs.column("user_id").to_pylist(),
        pairs.column("item_id").to_pylist(),
        pairs.column("weight").to_pylist(),
    )


def top_actions(
    spec: Spec,
    model: ItemModel,
    store: DeltaStore,
    histories: tuple[list[str], list[str], list[float]],
    *,
    k: int,
    action: str,
) -> dict[str, list[dict[str, Any]]]:
    """user -> ranked actions [{"item_id", "score", "action_id"}] from their history."""
    x, users = interaction_matrix(*histories, item_ids=model.item_ids)
    catalog = item_catalog(store, spec)
    allowed = item_allowed(spec.actions[action].eligibility.where, model.item_ids, catalog)
    ranked = scored_top_k(model, x, k=k, allowed=allowed)
    return {
        user: [{"item_id": i, "score": round(s, 6), "action_id": action} for i, s in row]
        for user, row in zip(users, ranked, strict=True)
    }


def forget_erased(store: DeltaStore, online: OnlineStore, base: int, users: list[str]) -> int:
    """After the put: if an erasure fenced gold since it was read (`base`), drop the
    cached rows of the users gold no longer holds. Either this check sees the fence, or
    the erasure's own delete from the online store runs after the put."""
    if not store.erased_since(INTERACTIONS_TABLE, base):
        return 0
    kept = set(store.read(INTERACTIONS_TABLE, columns=["user_id"]).column(0).to_pylist())
    gone = sorted(set(users) - kept)
    serving = ServingStore(online)
    removed = serving.forget_cached_decisions(gone) if gone else 0
    if removed:
        serving.scrub()
    return removed


@dg.asset(
    deps=[model_registry, gold_interactions],
    group_name="serving",
    kinds={"sql"},
    retry_policy=IO_RETRY,
)
def cached_decisions(nextbest: NextbestResource) -> dg.MaterializeResult:
    """Top-k item actions for every user active in the last `active_days`, scored by the
    promoted model from the user's gold history, filtered by the action's item
    eligibility rules, and written to the online store with the model version. The API
    blends them with real-time candidates and falls back to them under load."""
    spec, store = nextbest.load_spec(), nextbest.delta()
    with nextbest.online() as online:
        promoted = online.promoted_model()
        if promoted is None or not promoted.artifact_path:
            raise RuntimeError("no promoted model; materialize model_registry first")
        model = nextbest.models_dir().load(promoted.artifact_path, ItemModel.load)
        base = store.pin(INTERACTIONS_TABLE)  # before reading gold: see forget_erased
        histories = active_histories(store, active_days=nextbest.active_days)
        written = 0
        surfaces = item_surfaces(spec)
        for surface, action in surfaces:
            ranked = top_actions(spec, model, store, histories, k=nextbest.cached_k, action=action)
            rows = [
                CachedDecision(u, actions, model_version=promoted.version, surface=surface)
                for u, actions in ranked.items()
            ]
            written += online.put_cached_decisions(rows)
        forgotten = forget_erased(store, online, base, histories[0])
    return dg.MaterializeResult(
        metadata={
            "users": len(set(histories[0])),
            "rows": written,
            "surfaces": ", ".join(s for s, _ in surfaces),
            "model_version": promoted.version,
            "k": nextbest.cached_k,
            "forgotten_erased": forgotten,
        }
    )
