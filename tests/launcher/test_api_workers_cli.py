"""`nextbest api --workers N` and `nextbest up --api-workers N`: parsed, bounded, and
handed to the server as `Settings.api_workers` (tests/e2e/test_api_workers.py runs
the processes for real)."""

from pathlib import Path

import pytest

import serving.run
from launcher.cli import build_parser, main
from nextbest.settings import Settings
from tests.support.common import ROOT


def test_worker_counts_are_parsed_and_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(["api", "--workers", "3"]).workers == 3
    assert parser.parse_args(["api"]).workers is None  # NEXTBEST_API_WORKERS or 1
    assert parser.parse_args(["up", "--api-workers", "2"]).api_workers == 2
    for bad in ("0", "65", "many"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["api", "--workers", bad])
        assert exit_.value.code == 2
    assert "--workers" in capsys.readouterr().err


def test_api_hands_the_count_to_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def run_api(settings: Settings, **_: object) -> None:
        seen.append(settings.api_workers)

    monkeypatch.setattr(serving.run, "run_api", run_api)
    monkeypatch.setenv("NEXTBEST_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NEXTBEST_SPEC", str(ROOT / "nextbest.yaml"))
    monkeypatch.setenv("NEXTBEST_API_WORKERS", "2")
    assert main(["api"]) == 0
    assert main(["api", "--workers", "4"]) == 0
    assert seen == [2, 4]
