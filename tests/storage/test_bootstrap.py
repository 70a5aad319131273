"""`nextbest init` lays out every store of docs/architecture.md#data-home."""

import subprocess
import sys
from pathlib import Path

from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from storage.bootstrap import _redact, init_stores
from storage.delta.store import DeltaStore
from storage.online.store import OnlineStore
from tests.support.common import ROOT


def test_init_creates_every_store_and_is_idempotent(settings: Settings) -> None:
    spec = load_spec(settings.spec)
    first = list(init_stores(settings, spec))
    second = list(init_stores(settings, spec))
    assert first == second
    home = settings.home_dir
    assert (home / "delta" / "events" / "_delta_log").is_dir()
    assert (home / "online.db").is_file()
    assert (home / "lance").is_dir()
    assert (home / "eventlog" / "eventlog.json").is_file()
    assert DeltaStore.from_settings(settings).count("events") == 0
    store = OnlineStore.from_settings(settings)
    assert store.ping()
    store.dispose()


def test_cli_init_on_a_fresh_home(tmp_path: Path) -> None:
    home = tmp_path / "fresh"
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "--home", str(home), "init"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert str(home.resolve()) in out.stdout
    assert (home / "online.db").is_file()


def test_passwords_are_not_printed() -> None:
    assert (
        _redact("postgresql+psycopg://me:secret@db:5432/x")
        == "postgresql+psycopg://me:***@db:5432/x"
    )
    assert _redact("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"
