"""The shipped dagster.yaml (`definitions/dagster.yaml`): the embedded SQLite instance,
and the documented PostgreSQL block, uncommented verbatim and run against the
PostgreSQL server."""

import re
import shutil
from pathlib import Path

import dagster as dg
import pytest

from definitions.batch.importer import import_events
from definitions.runs import materialize
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "definitions" / "dagster.yaml"


def _events(path: Path) -> Path:
    path.write_text(
        "\n".join(
            f'{{"event_id": "e{i}", "type": "view", "user_id": "u{i % 4}", '
            f'"item_id": "i{i % 6}", "ts": {1736000000 + 60 * i}}}'
            for i in range(40)
        )
    )
    return path


def test_embedded_config_is_sqlite_under_dagster_home(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = settings.dagster_home
    home.mkdir(parents=True)
    shutil.copy(CONFIG, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    spec = load_spec(settings.spec)
    import_events(settings, spec, _events(tmp_path / "e.jsonl"), progress=False)
    assert materialize(settings, select="bronze_events")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert instance.run_retries_enabled
        assert instance.fetch_observations(dg.AssetKey("bronze_events"), limit=1).records
    assert (home / "history" / "runs.db").exists() or (home / "history").is_dir()


def postgres_block() -> str:
    """The commented `BEGIN postgres` ... `END postgres` block of dagster.yaml, uncommented."""
    text = CONFIG.read_text()
    block = re.search(r"# BEGIN postgres\n(.*?)# END postgres", text, re.S)
    assert block, "dagster.yaml lost its documented PostgreSQL block"
    return "\n".join(line.removeprefix("# ") for line in block.group(1).splitlines()) + "\n"


def test_documented_postgres_storage_runs_a_materialization(
    settings: Settings, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip(
        "dagster_postgres", reason="dagster-postgres (matching the dagster release) not installed"
    )
    home = settings.dagster_home
    home.mkdir(parents=True)
    embedded = CONFIG.read_text()
    storage = re.search(r"^storage:\n(?:  .*\n)+", embedded, re.M)
    assert storage
    (home / "dagster.yaml").write_text(embedded.replace(storage.group(0), postgres_block()))
    monkeypatch.setenv(
        "NEXTBEST_DAGSTER_PG_URL", pg_url.replace("postgresql+psycopg://", "postgresql+psycopg2://")
    )
    spec = load_spec(settings.spec)
    import_events(settings, spec, _events(tmp_path / "e.jsonl"), progress=False)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert materialize(settings, select="bronze_events", instance=instance)
        assert instance.fetch_observations(dg.AssetKey("bronze_events"), limit=1).records
        assert not list(home.glob("history/runs.db"))  # nothing went to SQLite
