"""examples/: every spec passes `nextbest validate`, the demo shop cannot drift from the
repository's own spec, and the ratings spec says what its README promises."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from definitions.batch.importer import movielens_items
from nextbest.spec.loader import load_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*/nextbest.yaml"))
SCHEMA_LINE = re.compile(r"^# yaml-language-server: \$schema=(\S+)$")


def test_there_are_examples_with_a_readme() -> None:
    names = {p.parent.name for p in EXAMPLES}
    assert {"demo_shop", "ratings"} <= names
    for spec in EXAMPLES:
        assert (spec.parent / "README.md").is_file(), spec.parent


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_every_example_validates_with_the_cli(path: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "validate", "--spec", str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("NEXTBEST_")},
            "NEXTBEST_HOME": str(tmp_path / "home"),
        },
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert ": ok (" in out.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_the_editor_schema_line_points_at_the_schema(path: Path) -> None:
    match = SCHEMA_LINE.match(path.read_text(encoding="utf-8").splitlines()[0])
    assert match, "first line: # yaml-language-server: $schema=<path to the schema>"
    assert (path.parent / match.group(1)).resolve() == ROOT / "schema" / "nextbest.schema.json"


def test_the_demo_shop_example_is_the_repository_spec() -> None:
    """Same text apart from the `$schema` path, so editing one without the other fails."""
    repo = (ROOT / "nextbest.yaml").read_text(encoding="utf-8").splitlines()
    example = (ROOT / "examples/demo_shop/nextbest.yaml").read_text(encoding="utf-8").splitlines()
    assert SCHEMA_LINE.match(repo[0]) and SCHEMA_LINE.match(example[0])
    assert example[1:] == repo[1:]


def test_the_ratings_spec_treats_ratings_as_seen_without_a_category_cap(tmp_path: Path) -> None:
    spec = load_spec(ROOT / "examples/ratings/nextbest.yaml")
    rate = spec.events["rate"]
    assert rate.value == "required" and rate.entity == "item"
    seen = {
        n for a in spec.actions.values() if a.kind == "item" for n in a.eligibility.exclude_seen
    }
    assert "rate" in seen
    assert all(p.max_per_group is None for p in spec.policies.values())
    assert spec.model.half_life is None  # ratings histories span months
    assert any(a.text for a in spec.entities.item.attributes.values())
    # the MovieLens layout fills exactly the declared attributes
    u_item = tmp_path / "u.item"
    flags = "|".join(["0"] * 8 + ["1"] + ["0"] * 10)  # 9th genre flag: drama
    u_item.write_text(f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags}\n", encoding="latin-1")
    (row,) = movielens_items(spec, u_item)
    assert row == {"item_id": "1", "category": "drama", "title": "Toy Story (1995)"}
