"""Dagster conventions (issue #17 item 4): Dagster's own CLI finds the code location
from pyproject.toml; bronze is observed, not materialized; assets writing tables report
the standard `dagster/*` metadata, equal to what Delta holds; dagster.yaml ships in the
wheel and the CLI refuses to run without it."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import dagster as dg
import pytest

from definitions.batch.history import FEATURES_TABLE, INTERACTIONS_TABLE
from definitions.batch.importer import import_events
from definitions.resources import resource_for
from definitions.runs import instance_for, materialize
from definitions.sensors import observe_external_tables
from launcher.supervisor import prepare_dagster_home
from nextbest.settings import Settings
from nextbest.spec.models import Spec
from storage.delta.store import DeltaStore

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "definitions" / "dagster.yaml"
BIN = Path(sys.executable).parent


def _events(path: Path, n: int, *, offset: int = 0) -> Path:
    path.write_text(
        "\n".join(
            json.dumps(
                {
                    "event_id": f"e{offset + i}",
                    "type": "view",
                    "user_id": f"u{i % 5}",
                    "item_id": f"i{i % 7}",
                    "ts": 1736000000 + 3600 * (offset + i),
                }
            )
            for i in range(n)
        )
    )
    return path


def _env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "DAGSTER_HOME": str(settings.dagster_home),
        "NEXTBEST_HOME": str(settings.home_dir),
        "NEXTBEST_SPEC": str(ROOT / "nextbest.yaml"),
    }


def test_dagster_cli_finds_the_code_location_from_pyproject(settings: Settings) -> None:
    """`dagster definitions validate` with no `-m`, run in the project: [tool.dagster]."""
    prepare_dagster_home(settings)
    done = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate"],
        cwd=ROOT, env=_env(settings), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    assert "Validation successful for code location definitions" in said, said


def _metadata(entry: dg.AssetMaterialization | dg.AssetObservation) -> dict:
    return {k: v.value for k, v in entry.metadata.items()}


def test_standard_metadata_equals_the_delta_tables(
    settings: Settings, spec: Spec, tmp_path: Path
) -> None:
    import_events(settings, spec, _events(tmp_path / "e.jsonl", 60), progress=False)
    select = "key:bronze_events or key:gold_interactions or key:user_features"
    assert materialize(settings, select=select)
    store = DeltaStore.from_settings(settings)
    with instance_for(settings) as instance:
        assert instance.get_latest_materialization_event(dg.AssetKey("bronze_events")) is None
        records = instance.fetch_observations(dg.AssetKey("bronze_events"), limit=1).records
        bronze = records[0].asset_observation
        assert bronze is not None
        gold = {}
        for name in ("gold_interactions", "user_features"):
            event = instance.get_latest_materialization_event(dg.AssetKey(name))
            assert event is not None and event.asset_materialization is not None
            gold[name] = event.asset_materialization
    seen = _metadata(bronze)
    assert seen["dagster/row_count"] == store.count("events") == 60
    assert [c.name for c in seen["dagster/column_schema"].columns] == store.schema("events").names
    assert seen["dagster/uri"] == store.uri("events")
    assert seen["dagster/table_name"] == "delta.events"
    assert bronze.tags is not None
    assert bronze.tags["dagster/data_version"] == str(store.version("events"))
    # Downstream lineage names the bronze version it was computed from.
    assert gold["gold_interactions"].tags is not None
    upstream = gold["gold_interactions"].tags["dagster/input_data_version/bronze_events"]
    assert upstream == str(store.version("events"))
    for name, table in (
        ("gold_interactions", INTERACTIONS_TABLE),
        ("user_features", FEATURES_TABLE),
    ):
        meta = _metadata(gold[name])
        assert meta["dagster/row_count"] == store.count(table) > 0, name
        assert [c.name for c in meta["dagster/column_schema"].columns] == store.schema(table).names
        assert meta["dagster/uri"] == store.uri(table)
        assert "rows" not in meta and "pairs" not in meta  # the standard key says it


def test_sensor_observes_external_tables_when_their_version_moves(
    settings: Settings, spec: Spec, tmp_path: Path
) -> None:
    resource = resource_for(settings)
    store = DeltaStore.from_settings(settings)
    store.ensure_tables()
    with dg.instance_for_test() as instance:

        def tick(cursor: str | None) -> dg.SensorResult | dg.SkipReason:
            context = dg.build_sensor_context(
                instance=instance, cursor=cursor, resources={"nextbest": resource}
            )
            return observe_external_tables(context)  # type: ignore[return-value]

        first = tick(None)
        assert isinstance(first, dg.SensorResult)
        observed = {e.asset_key.to_user_string(): e for e in first.asset_events}  # type: ignore[union-attr]
        assert set(observed) == {"bronze_events", "decision_log", "feedback_log"}
        assert observed["bronze_events"].metadata["dagster/row_count"].value == 0
        assert isinstance(tick(first.cursor), dg.SkipReason)  # nothing moved

        import_events(settings, spec, _events(tmp_path / "e.jsonl", 25), progress=False)
        later = tick(first.cursor)
        assert isinstance(later, dg.SensorResult)
        (event,) = later.asset_events  # only bronze moved
        assert isinstance(event, dg.AssetObservation)
        assert event.asset_key == dg.AssetKey("bronze_events")
        assert event.metadata["dagster/row_count"].value == 25
        assert event.tags is not None
        assert event.tags["dagster/data_version"] == str(store.version("events"))
        assert str(event.metadata["first_event"].value).startswith("2025-01-04")


def test_wheel_ships_dagster_yaml_and_the_cli_needs_it(tmp_path: Path) -> None:
    """The built wheel holds definitions/dagster.yaml; from the wheel's files (not this
    checkout) the CLI installs it into DAGSTER_HOME, and without it fails loudly."""
    uv = BIN / "uv"
    if not uv.exists():
        pytest.skip("uv is not in the virtualenv (make install-dev installs it)")
    built = subprocess.run(
        [str(uv), "build", "--wheel", "-o", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("nextbest-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        assert "definitions/dagster.yaml" in archive.namelist()
        archive.extractall(site)
    home = tmp_path / "home"
    env = {
        **os.environ,
        "PYTHONPATH": str(site),  # ahead of the editable install of this checkout
        "NEXTBEST_HOME": str(home),
        "NEXTBEST_SPEC": str(ROOT / "nextbest.yaml"),
    }
    code = (
        "from launcher.supervisor import prepare_dagster_home; from nextbest.settings import "
        "Settings; print(prepare_dagster_home(Settings()))"
    )
    installed = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    target = Path(installed.stdout.strip())
    assert target == home / "dagster" / "dagster.yaml"
    assert target.read_bytes() == (site / "definitions" / "dagster.yaml").read_bytes()

    (site / "definitions" / "dagster.yaml").unlink()
    shutil.rmtree(home)
    failed = subprocess.run(
        [sys.executable, "-m", "launcher", "materialize"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "dagster.yaml is missing from the nextbest installation" in failed.stderr
    assert str(site / "definitions" / "dagster.yaml") in failed.stderr
    assert not (home / "dagster" / "dagster.yaml").exists()


def test_an_uninstallable_dagster_yaml_is_an_error(settings: Settings) -> None:
    settings.home_dir.mkdir(parents=True)
    settings.dagster_home.write_text("a file where the DAGSTER_HOME folder should be")
    with pytest.raises(RuntimeError, match=r"cannot install .*dagster\.yaml"):
        prepare_dagster_home(settings)


def test_prepare_installs_the_shipped_config(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = prepare_dagster_home(settings)
    monkeypatch.setenv("DAGSTER_HOME", str(settings.dagster_home))  # the config refers to it
    assert target.read_bytes() == CONFIG.read_bytes()
    with dg.DagsterInstance.from_config(str(settings.dagster_home)) as instance:
        limits = instance.run_coordinator.inst_data.config_dict["tag_concurrency_limits"]  # type: ignore[union-attr]
    assert {"key": "nextbest/writer", "limit": 1} in limits
