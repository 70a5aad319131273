"""docs/architecture.md stays true to the tree: every file it names exists, and every
anchor of it that the code cites names one of its headings."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_path_the_architecture_names_exists() -> None:
    text = DOC.read_text()
    named = set(re.findall(r"`((?:[\w.-]+/)+(?:[\w.-]+\.(?:py|md|yaml))?)`", text))
    named = {n for n in named if "/" in n.rstrip("/")}  # `spec/` in the table is nextbest's
    assert len(named) > 30, sorted(named)  # the pattern still finds the paths
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_cited_anchor_is_a_heading() -> None:
    text = DOC.read_text()
    anchors = {slug(h) for h in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}
    out = subprocess.run(
        ["git", "grep", "-ho", r"architecture\.md#[a-z0-9-]*", "--", ":!docs/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    cited = {hit.split("#", 1)[1] for hit in out}
    assert cited, "no file cites docs/architecture.md (the search pattern is wrong)"
    assert cited <= anchors, f"cited anchors with no heading: {sorted(cited - anchors)}"
