"""Spec tooling: `nextbest schema` (the JSON Schema editors use), the committed copy that
`nextbest.yaml` names on its first line, and `nextbest --version`."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema_rs
import pytest
import yaml

from launcher.cli import main
from nextbest.spec.loader import load_spec
from nextbest.spec.schema import SCHEMA_FILE, spec_json_schema_text
from tests.support.common import ROOT

SPECS = ROOT / "tests" / "specs"
LANGUAGE_SERVER = "# yaml-language-server: $schema="


@pytest.fixture
def validator() -> jsonschema_rs.Validator:
    return jsonschema_rs.validator_for(json.loads((ROOT / SCHEMA_FILE).read_text()))


def test_committed_schema_equals_the_generated_one() -> None:
    """Regenerate with `nextbest schema --output schema/nextbest.schema.json`."""
    assert (ROOT / SCHEMA_FILE).read_text() == spec_json_schema_text()


def test_schema_command_prints_it_and_writes_it(tmp_path: Path, capsys) -> None:
    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["title"].startswith("nextbest spec") and printed["description"]
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert {"events", "features", "actions", "policies"} <= set(printed["properties"])
    out = tmp_path / "spec.schema.json"
    assert main(["schema", "--output", str(out)]) == 0
    assert f"wrote the spec's JSON Schema to {out}" in capsys.readouterr().out
    assert out.read_text() == spec_json_schema_text()
    assert main(["schema", "--output", str(tmp_path / "missing" / "x.json")]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_schema_needs_no_spec_file(tmp_path: Path) -> None:
    """An editor setup step: works before any nextbest.yaml exists."""
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "--spec", str(tmp_path / "none.yaml"), "schema"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["title"].startswith("nextbest spec")


def test_shipped_spec_names_the_schema_and_still_loads(validator) -> None:
    spec = ROOT / "nextbest.yaml"
    first = spec.read_text().splitlines()[0]
    assert first.startswith(LANGUAGE_SERVER), first
    # the path is relative to the spec file, as the YAML language server resolves it
    assert (spec.parent / first.removeprefix(LANGUAGE_SERVER)).resolve() == ROOT / SCHEMA_FILE
    load_spec(spec)
    assert validator.is_valid(yaml.safe_load(spec.read_text()))


def test_schema_accepts_valid_specs_and_flags_what_an_editor_can_see(validator) -> None:
    assert validator.is_valid(yaml.safe_load((SPECS / "minimal.yaml").read_text()))
    # single-section mistakes are visible to the editor; cross-references need `validate`
    for name in ("misspelled_key", "bad_name", "bad_window", "missing_section"):
        data = yaml.safe_load((SPECS / "invalid" / f"{name}.yaml").read_text())
        assert not validator.is_valid(data), name
    window = yaml.safe_load((SPECS / "minimal.yaml").read_text())
    first = next(iter(window["features"]))
    window["features"][first] = {**window["features"][first], "window": "5 minutes"}
    errors = [e.message for e in validator.iter_errors(window)]
    assert errors, "a malformed duration is flagged"


def test_version_prints_the_package_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "--version"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"nextbest {version}"
