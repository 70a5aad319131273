"""The Dagster code location: it loads, and from an empty data home an import followed
by `materialize` builds every asset with every check passing, registers and promotes a
model, and serves its version from the cache and from `recommend`."""

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from definitions import build_definitions
from definitions.batch.importer import import_events, import_items
from definitions.resources import NextbestResource, resource_for
from definitions.runs import instance_for, materialize, recommend
from definitions.sensors import retrain_after_events
from nextbest.demo.shop import DemoConfig, write_demo
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from storage.delta.store import DeltaStore
from storage.online.store import OnlineStore
from storage.vectors import AttrType, VectorStore

ROOT = Path(__file__).resolve().parents[2]
ASSETS = {
    "bronze_events", "silver_sessions", "gold_interactions", "user_features", "training_set",
    "item_model", "model_evaluation", "model_registry", "item_vectors", "cached_decisions",
    "offer_uplift", "policy_evaluation", "offer_policy",
}  # fmt: skip
LOGS = {"decision_log", "feedback_log"}  # external: written by the API, lineage only
CHECKS = {
    "bronze_events_schema", "bronze_events_not_empty", "bronze_events_unique_ids",
    "bronze_events_fresh", "gold_interactions_not_empty", "model_evaluation_floor",
    "item_vectors_match_model", "cached_decisions_current", "offer_policy_registered",
}  # fmt: skip
SMALL = DemoConfig(n_users=120, n_items=150, n_events=3000, days=10)
LATER = SMALL.replace(seed=8, start=datetime(2025, 1, 16, tzinfo=UTC), n_events=1500, days=3)


def test_definitions_load_with_everything() -> None:
    spec = load_spec(ROOT / "nextbest.yaml")
    defs = build_definitions(Settings(_env_file=None), spec)  # type: ignore[call-arg]
    defs.validate_loadable(defs)
    assert {k.to_user_string() for k in defs.resolve_all_asset_keys()} == ASSETS | LOGS
    graph = defs.resolve_asset_graph()
    checks = {k.name for k in graph.asset_check_keys}
    assert checks == CHECKS
    blocking = {k.name for k in graph.asset_check_keys if graph.get_check_spec(k).blocking}
    assert blocking == {
        "bronze_events_schema", "bronze_events_not_empty", "bronze_events_unique_ids",
        "gold_interactions_not_empty", "model_evaluation_floor",
    }  # fmt: skip
    assert {"retrain", "maintenance", "sessions_backfill"} <= {
        j.name for j in defs.resolve_all_job_defs()
    }
    schedules = {s.name: s for s in defs.schedules or []}  # type: ignore[union-attr]
    assert set(schedules) == {"retrain_schedule", "maintenance_schedule", "sessions_daily"}
    assert schedules["retrain_schedule"].cron_schedule == "0 3 * * *"  # type: ignore[union-attr]
    assert schedules["maintenance_schedule"].cron_schedule == "30 4 * * 0"  # type: ignore[union-attr]
    assert defs.resolve_sensor_def("retrain_after_events").job_name == "retrain"
    assert graph.get(dg.AssetKey("silver_sessions")).partitions_def is not None
    assert graph.get(dg.AssetKey("gold_interactions")).partitions_def is None
    description = graph.get(dg.AssetKey("item_model")).description or ""
    assert "EASE" in description  # the docstring is the UI description
    undescribed = [k for k in graph.get_all_asset_keys() if not graph.get(k).description]
    assert undescribed == []
    bronze = graph.get(dg.AssetKey("bronze_events"))  # the stream writes it: observed only
    assert bronze.is_observable and not bronze.is_materializable
    assert bronze.metadata["dagster/column_schema"].columns[0].name == "event_id"


def _load(settings: Settings, cfg: DemoConfig, folder: Path) -> None:
    spec = load_spec(settings.spec)
    write_demo(folder, cfg)
    import_items(settings, spec, folder / "items.jsonl")
    summary = import_events(settings, spec, folder / "events.jsonl", progress=False)
    assert summary.rejected_count == 0 and summary.written == cfg.n_events


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A data home built from empty: demo import, then one full `materialize`."""
    base = tmp_path_factory.mktemp("e2e")
    settings = Settings(home=base / "home", spec=ROOT / "nextbest.yaml", _env_file=None)  # type: ignore[call-arg]
    _load(settings, SMALL, base / "demo")
    assert materialize(settings) is True
    yield settings


def test_policy_group_has_its_lineage_edges() -> None:
    defs = build_definitions(Settings(_env_file=None), load_spec(ROOT / "nextbest.yaml"))  # type: ignore[call-arg]
    graph = defs.resolve_asset_graph()

    def parents(name: str) -> set[str]:
        return {k.to_user_string() for k in graph.get(dg.AssetKey(name)).parent_keys}

    policy = {k.to_user_string() for k in graph.get_all_asset_keys()}
    policy = {n for n in policy if graph.get(dg.AssetKey(n)).group_name == "policy"}
    assert policy == {"decision_log", "feedback_log", "offer_uplift", "policy_evaluation"} | {
        "offer_policy"
    }
    assert parents("offer_uplift") == LOGS
    assert parents("policy_evaluation") == {"offer_uplift"} | LOGS
    assert parents("offer_policy") == {"policy_evaluation"}
    assert not graph.get(dg.AssetKey("decision_log")).is_executable


def _statuses(defs: dg.Definitions) -> dict[str, str]:
    out = {s.name: s.default_status.value for s in defs.schedules or []}  # type: ignore[union-attr]
    out.update({s.name: s.default_status.value for s in defs.sensors or []})  # type: ignore[union-attr]
    return out


def test_automation_runs_by_default_and_switches_off(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(ROOT / "nextbest.yaml")
    on = _statuses(build_definitions(Settings(_env_file=None), spec))  # type: ignore[call-arg]
    names = {"retrain_schedule", "maintenance_schedule", "sessions_daily", "retrain_after_events"}
    names.add("observe_external_tables")
    assert on == dict.fromkeys(names, "RUNNING")
    monkeypatch.setenv("NEXTBEST_AUTOMATION", "off")
    off = _statuses(build_definitions(Settings(_env_file=None), spec))  # type: ignore[call-arg]
    assert off == dict.fromkeys(names, "STOPPED")
    # A spec without `retrain_after_events` leaves the sensor stopped (nothing to watch).
    monkeypatch.delenv("NEXTBEST_AUTOMATION")
    quiet = spec.model_copy(
        update={"schedules": spec.schedules.model_copy(update={"retrain_after_events": None})}
    )
    sensor = _statuses(build_definitions(Settings(_env_file=None), quiet))  # type: ignore[call-arg]
    assert sensor["retrain_after_events"] == "STOPPED"
    assert sensor["observe_external_tables"] == "RUNNING"  # bronze is still observed


def test_day_partitions_start_at_the_first_day_of_the_data(home: Settings, tmp_path: Path) -> None:
    first = SMALL.start.date().isoformat()
    defs = build_definitions(home, load_spec(home.spec))
    days = defs.resolve_asset_graph().get(dg.AssetKey("silver_sessions")).partitions_def
    assert days is not None and days.get_partition_keys()[0] == first
    assert defs.resolve_job_def("sessions_backfill").partitions_def == days
    empty = Settings(home=tmp_path / "empty", spec=home.spec, _env_file=None)  # type: ignore[call-arg]
    today = datetime.now(UTC).date().isoformat()
    fresh = build_definitions(empty, load_spec(home.spec)).resolve_asset_graph()
    keys = fresh.get(dg.AssetKey("silver_sessions")).partitions_def.get_partition_keys()  # type: ignore[union-attr]
    assert keys[0] == today


def test_materialize_runs_named_jobs(home: Settings) -> None:
    with instance_for(home) as instance:
        names = {run.job_name for run in instance.get_runs()}
    assert names and names <= {"retrain", "sessions_backfill"}, names
    assert "sessions_backfill" in names


def _check_results(settings: Settings) -> dict[str, bool]:
    with instance_for(settings) as instance:
        records = instance.get_event_records(
            dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        )
        out: dict[str, bool] = {}
        for record in sorted(records, key=lambda r: r.storage_id):
            data = record.event_log_entry.dagster_event.event_specific_data  # type: ignore[union-attr]
            out[data.check_name] = data.passed  # type: ignore[union-attr]
    return out


def test_every_asset_materialized_and_every_check_passed(home: Settings) -> None:
    with instance_for(home) as instance:
        for name in ASSETS - {"bronze_events"}:
            assert instance.get_latest_materialization_event(dg.AssetKey(name)), name
        # Bronze is observed, never materialized: the stream is its writer.
        assert instance.get_latest_materialization_event(dg.AssetKey("bronze_events")) is None
        assert instance.fetch_observations(dg.AssetKey("bronze_events"), limit=1).records
    assert _check_results(home) == dict.fromkeys(CHECKS, True)
    store = DeltaStore.from_settings(home)
    for table in (
        "silver/sessions",
        "gold/interactions",
        "gold/user_features",
        "gold/training_set",
    ):
        assert store.count(table) > 0, table


def test_promoted_version_is_served_everywhere(home: Settings, tmp_path: Path) -> None:
    online = OnlineStore.from_settings(home)
    promoted = online.promoted_model()
    assert promoted is not None and promoted.status == "promoted"
    assert Path(promoted.artifact_path or "").is_file()
    assert promoted.metrics["ndcg@10"] > promoted.metrics["popular_ndcg@10"]
    assert 0 <= promoted.metrics["hr@10_cached"] <= 1 and promoted.metrics["replay_events"] > 0
    cached = online.get_cached_decision("u00001") or online.get_cached_decision("u00002")
    assert cached is not None and cached.model_version == promoted.version
    assert cached.actions and {"item_id", "score", "action_id"} <= set(cached.actions[0])
    online.dispose()

    spec = load_spec(home.spec)
    attrs: dict[str, AttrType] = {n: a.type for n, a in spec.entities.item.attributes.items()}
    lance = VectorStore.from_settings(home, dim=spec.model.dim, item_attributes=attrs)
    hits = lance.search_items([1.0] * spec.model.dim, k=3, where="in_stock = true")
    assert hits and all(h["model_version"] == promoted.version for h in hits)

    users = tmp_path / "users.txt"
    users.write_text(f"{cached.user_id}\nnobody-at-all\n")
    out = tmp_path / "out.jsonl"
    assert recommend(home, users, 5, out) == 2
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["model_version"] for line in lines] == [promoted.version] * 2
    assert [line["served_from"] for line in lines] == ["batch", "fallback"]
    assert len(lines[0]["actions"]) == 5
    assert lines[0]["actions"][0]["item_id"] == cached.actions[0]["item_id"]


def test_more_events_register_new_versions_promoted_only_without_regression(
    home: Settings, tmp_path: Path
) -> None:
    online = OnlineStore.from_settings(home)
    first = online.promoted_model()
    assert first is not None
    _load(home, LATER, tmp_path / "later")

    # A tolerance of -1 demands an nDCG gain of 1.0: the new version must be rejected.
    assert materialize(home, select="gold_interactions*", promotion_tolerance=-1.0)
    rejected = online.list_models()[0]
    assert rejected.version != first.version and rejected.status == "rejected"
    assert int(rejected.data_version or 0) > int(first.data_version or 0)
    assert online.promoted_model().version == first.version  # type: ignore[union-attr]
    assert online.get_cached_decision("u00001").model_version == first.version  # type: ignore[union-attr]

    # A generous tolerance accepts it: promoted, and the cache moves to it.
    assert materialize(home, select="gold_interactions*", promotion_tolerance=1.0)
    newest = online.list_models()[0]
    assert newest.status == "promoted" and online.promoted_model().version == newest.version  # type: ignore[union-attr]
    assert online.get_model(first.version).status == "retired"  # type: ignore[union-attr]
    assert online.get_cached_decision("u00001").model_version == newest.version  # type: ignore[union-attr]
    online.dispose()


def test_sensor_requests_retrain_after_enough_new_events(home: Settings, tmp_path: Path) -> None:
    text = (
        (ROOT / "nextbest.yaml")
        .read_text()
        .replace("retrain_after_events: 50000", "retrain_after_events: 100")
    )
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(text)
    resource = NextbestResource(home=str(home.home_dir), spec=str(spec_path))
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"nextbest": resource})
        result = retrain_after_events(context)
        assert isinstance(result, dg.SkipReason)  # the newest model saw every event
        spec = load_spec(spec_path)
        extra = tmp_path / "extra.jsonl"
        rows = [
            {"event_id": f"x{i}", "type": "view", "user_id": "u00001", "item_id": "i00001"}
            for i in range(150)
        ]
        extra.write_text("\n".join(json.dumps({**r, "ts": 1737400000}) for r in rows))
        import_events(home, spec, extra, progress=False)
        result = retrain_after_events(
            dg.build_sensor_context(instance=instance, resources={"nextbest": resource})
        )
        assert isinstance(result, dg.SensorResult)
        assert len(result.run_requests or []) == 1
        assert result.run_requests[0].tags["nextbest/new_events"] == "150"  # type: ignore[index]


def test_maintenance_job_compacts_and_keeps_data(home: Settings) -> None:
    defs = build_definitions(home, load_spec(home.spec))
    store = DeltaStore.from_settings(home)
    rows = store.count("events")
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("maintenance").execute_in_process(instance=instance)
    assert result.success
    assert store.count("events") == rows
    assert store.file_count("events") <= len(
        store.read("events", columns=["event_date"]).column(0).unique()
    )


def test_blocking_check_stops_retraining_on_an_empty_history(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", spec=ROOT / "nextbest.yaml", _env_file=None)  # type: ignore[call-arg]
    assert materialize(settings, select="bronze_events*") is False
    with instance_for(settings) as instance:
        observed = instance.fetch_observations(dg.AssetKey("bronze_events"), limit=1).records
        assert observed and observed[0].asset_observation is not None
        assert observed[0].asset_observation.metadata["dagster/row_count"].value == 0
        assert instance.get_latest_materialization_event(dg.AssetKey("item_model")) is None
    online = OnlineStore.from_settings(settings)
    assert online.list_models() == []
    online.dispose()


def test_resource_from_settings_points_at_the_home(settings: Settings) -> None:
    resource = resource_for(settings, promotion_tolerance=0.1)
    assert resource.settings().home_dir == settings.home_dir
    assert resource.promotion_tolerance == 0.1
    assert resource.load_spec().name == "demo_shop"


def _latest_metadata(settings: Settings, asset: str) -> dict:
    with instance_for(settings) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        assert event is not None and event.asset_materialization is not None
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_retraining_tunes_and_records_every_candidate(home: Settings) -> None:
    """Issue #16 item 1: the default spec tunes; every candidate's validation nDCG@10 is
    in item_model's metadata (a table and one float each), and the promoted model's
    offline metrics say which setting won and by how much."""
    meta = _latest_metadata(home, "item_model")
    rows = meta["tuning_candidates"].records
    tune = load_spec(home.spec).model.tune
    assert tune is not None
    # Default grid: 4 half-lives x (5 l2 + the spec's 200 already in it) EASE, + 4 item-kNN
    # (+ up to 3 larger l2 per half-life while the largest wins).
    grid = {(h or "none", l2) for h in tune.half_life for l2 in tune.l2}
    assert grid <= {(r.data["half_life"], r.data["l2"]) for r in rows if r.data["l2"]}
    assert sum(r.data["kind"] == "item_knn" for r in rows) == len(tune.half_life)
    floats = {k: v for k, v in meta.items() if k.startswith("candidate/")}
    assert len(floats) == len(rows) and all(0.0 <= v <= 1.0 for v in floats.values())
    best = max(r.data["ndcg@10"] for r in rows)
    assert meta["validation_ndcg@10"] == pytest.approx(best, abs=1e-5)
    hyper = meta["hyperparameters"]
    chosen = hyper["tuning"]["chosen"]
    assert (hyper["l2"], hyper["half_life"] or "none") == (
        chosen["l2"] if chosen["kind"] == "ease" else 200.0,
        chosen["half_life"],
    )
    evaluation = _latest_metadata(home, "model_evaluation")
    assert evaluation["tuning_gain@10"] >= 0.0 and "kind=" in evaluation["chosen"]
    online = OnlineStore.from_settings(home)
    record = next(m for m in online.list_models() if m.version == meta["version"])
    online.dispose()
    assert record.metrics["tuned_validation_ndcg@10"] == pytest.approx(best, abs=1e-5)
    assert "tuning_gain@10" in record.metrics
