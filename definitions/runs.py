"""What the CLI drives without the UI: materialize, batch recommend, evaluate.

`materialize` runs in this process on the data home's Dagster instance
(`<home>/dagster`, SQLite unless its dagster.yaml says otherwise), so the runs, asset
materializations and check results show up in the UI afterwards.
"""

import json
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any, TextIO

import dagster as dg
import numpy as np
import scipy.sparse as sp

from definitions.assets import ALL_ASSETS, PARTITIONED_ASSETS
from definitions.assets.decisions import active_histories, item_allowed, item_surfaces, top_actions
from definitions.assets.evaluation import evaluate_settings
from definitions.batch.arrow import pc
from definitions.batch.history import INTERACTIONS_TABLE, item_catalog
from definitions.batch.quality import scored_top_k
from definitions.jobs import SESSIONS_JOB, retrain_job
from definitions.location import build_definitions
from definitions.partitions import history_partitions
from definitions.resources import cached_spec
from nextbest.learn.model import ItemModel
from nextbest.settings import Settings
from nextbest.spec.models import Spec
from storage.artifacts import ArtifactStore
from storage.delta.store import DeltaStore
from storage.online.store import OnlineStore

PARTITION_START = "dagster/asset_partition_range_start"
PARTITION_END = "dagster/asset_partition_range_end"


def instance_for(settings: Settings) -> dg.DagsterInstance:
    """The persistent instance of the data home (created on first use)."""
    settings.dagster_home.mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.from_config(str(settings.dagster_home))


def history_days(
    settings: Settings, partitions: dg.PartitionsDefinition | None = None
) -> tuple[str, str] | None:
    """First and last UTC event day in bronze, clipped to the partitions' range."""
    store = DeltaStore.from_settings(settings)
    if not store.exists("events") or store.count("events") == 0:
        return None
    days = store.read("events", columns=["event_date"]).column("event_date")
    keys = (partitions or history_partitions(settings)).get_partition_keys()
    if not keys:
        return None
    first = max(pc.min(days).as_py(), keys[0])
    last = min(pc.max(days).as_py(), keys[-1], date.today().isoformat())
    return (first, last) if first <= last else None


def materialize(
    settings: Settings,
    *,
    select: str | None = None,
    spec: Spec | None = None,
    instance: dg.DagsterInstance | None = None,
    **options: Any,
) -> bool:
    """Materialize the selected assets (all when `select` is None) with their checks;
    `bronze_events`, written by the stream, is observed (its Delta version recorded).

    `select` is a Dagster asset selection string (`"item_model+"`, `"key:cached_decisions"`,
    `"group:gold"`). Day-partitioned assets run once over every day present in bronze
    (one single-run backfill of the `sessions_backfill` job); the rest run in one run of
    the `retrain` job, so the UI lists the runs by those names. Returns True when every
    run succeeded and no blocking check failed. `options` set resource fields.
    """
    spec = spec or cached_spec(settings.spec)
    defs = build_definitions(settings, spec, **options)
    if select is None:  # every asset; `AssetSelection.all()` would leave out observed bronze
        keys = {a.key for a in ALL_ASSETS}
    else:
        keys = dg.AssetSelection.from_string(select).resolve(ALL_ASSETS)
    partitioned_keys = {a.key for a in PARTITIONED_ASSETS}
    plain = sorted(keys - partitioned_keys, key=lambda k: k.to_user_string())
    parted = sorted(keys & partitioned_keys, key=lambda k: k.to_user_string())
    own = instance is None
    inst = instance_for(settings) if instance is None else instance
    ok = True
    try:
        if plain:
            result = defs.resolve_job_def(retrain_job.name).execute_in_process(
                instance=inst, asset_selection=plain, raise_on_error=False,
                tags={"nextbest/trigger": "cli"},
            )  # fmt: skip
            ok = ok and result.success and _checks_passed(result)
        sessions = defs.resolve_job_def(SESSIONS_JOB)
        days = history_days(settings, sessions.partitions_def) if parted else None
        if parted and days is not None:
            result = sessions.execute_in_process(
                instance=inst, asset_selection=parted, raise_on_error=False,
                tags={PARTITION_START: days[0], PARTITION_END: days[1], "nextbest/trigger": "cli"},
            )  # fmt: skip
            ok = ok and result.success and _checks_passed(result)
    finally:
        if own:
            inst.dispose()
    return ok


def _checks_passed(result: dg.ExecuteInProcessResult) -> bool:
    """No ERROR-severity check failed (WARN-severity ones only warn)."""
    for evaluation in result.get_asset_check_evaluations():
        if not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR:
            return False
    return True


def read_user_ids(path: Path) -> list[str]:
    """One user id a line (a JSON object with `user_id` is accepted too)."""
    users: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text:
            continue
        if text.startswith("{"):
            text = str(json.loads(text)["user_id"])
        users.append(text)
    return users


def recommend(
    settings: Settings,
    users_path: str | Path,
    k: int,
    out_path: str | Path,
    *,
    spec: Spec | None = None,
) -> int:
    """Batch decisions with the promoted model, one JSONL line per input user:
    `{"user_id", "actions": [{"item_id", "score", "action_id"}], "model_version",
    "served_from"}`; served_from is "batch" (scored from the user's Delta history) or
    "fallback" (popular eligible items: no usable history). Returns lines written."""
    spec = spec or cached_spec(settings.spec)
    users = read_user_ids(Path(users_path))
    online = OnlineStore.from_settings(settings)
    try:
        promoted = online.promoted_model()
    finally:
        online.dispose()
    if promoted is None or not promoted.artifact_path:
        raise LookupError("no promoted model; run `nextbest materialize` first")
    model = ArtifactStore.from_settings(settings).load(promoted.artifact_path, ItemModel.load)
    store = DeltaStore.from_settings(settings)
    surfaces = item_surfaces(spec)
    if not surfaces:
        raise ValueError("the spec has no policy serving an item action")
    action = surfaces[0][1]
    ranked: dict[str, list[dict[str, Any]]] = {}
    if store.exists(INTERACTIONS_TABLE):
        histories = active_histories(store, active_days=0, users=users)
        ranked = top_actions(spec, model, store, histories, k=k, action=action)
    catalog = item_catalog(store, spec)
    allowed = item_allowed(spec.actions[action].eligibility.where, model.item_ids, catalog)
    empty = sp.csr_matrix((1, model.n_items), dtype=np.float64)
    fallback = [
        {"item_id": i, "score": round(s, 6), "action_id": action}
        for i, s in scored_top_k(model, empty, k=k, allowed=allowed)[0]
    ]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for user in users:
            actions = ranked.get(user)
            line = {
                "user_id": user,
                "actions": actions if actions else fallback,
                "model_version": promoted.version,
                "served_from": "batch" if actions else "fallback",
            }
            fh.write(json.dumps(line, separators=(",", ":")) + "\n")
    return len(users)


def format_metrics(metrics: dict[str, float]) -> list[str]:
    width = max((len(n) for n in metrics), default=0)
    return [f"{name:<{width}}  {value:.4f}" for name, value in metrics.items()]


def evaluate(
    settings: Settings, *, spec: Spec | None = None, out: TextIO | None = sys.stdout
) -> dict[str, float]:
    """Offline metrics of the model recipe on the current gold interactions (split
    protocol + temporal replay); printed to `out` unless it is None."""
    spec = spec or cached_spec(settings.spec)
    metrics = evaluate_settings(settings, spec)
    if out is not None:
        for line in format_metrics(metrics):
            print(line, file=out)
    return metrics


def asset_names() -> Sequence[str]:
    return sorted(a.key.to_user_string() for a in ALL_ASSETS)
