"""The spec loader: the demo spec is valid, and every kind of mistake is reported
with its file, line, path and a fix."""

import subprocess
import sys
from pathlib import Path

import pytest

from nextbest.spec.loader import SpecError, load_spec, parse_spec
from nextbest.spec.models import WindowFeature, parse_duration

SPECS = Path(__file__).parents[1] / "specs"
ROOT = Path(__file__).resolve().parents[2]

# fixture -> (line, path, words the message must contain)
INVALID = {
    "bad_window": (26, "features.views_1h.window", "'5 minutes' is not a duration"),
    "unknown_feature_in_action": (
        40,
        "actions.recommend.eligibility.where[1].attr",
        "unknown feature 'clicks_1h'",
    ),
    "duplicate_feature": (27, "features.views_1h", "duplicate name 'views_1h'"),
    "unknown_property_type": (
        18,
        "events.purchase.properties.quantity.type",
        "'integer' is not allowed",
    ),
    "group_by_unknown_attribute": (
        32,
        "features.affinity_7d.group_by",
        "'brand' is not an item attribute",
    ),
    "unknown_event_in_feature": (24, "features.views_1h.events[0]", "unknown event type 'click'"),
    "misspelled_key": (25, "features.views_1h.aggregate", "did you mean 'agg'?"),
    "missing_section": (1, "", "required section 'policies' is missing"),
    "bad_cron": (47, "schedules.retrain.cron", "'every night' is not a cron expression"),
    "unknown_candidate_source": (
        45,
        "policies.default.candidates[0].source",
        "'neural_net' is not allowed",
    ),
    "sum_without_field": (27, "features.affinity_7d.field", "agg sum needs a field"),
    "unknown_action_in_policy": (43, "policies.default.actions[1]", "unknown action 'upsell'"),
    "bad_name": (13, "events.View-Page", "lower snake_case"),
    "identify_with_entity": (20, "events.identify.entity", "set entity: null"),
    "invalid_yaml": (8, "", "not valid YAML"),
    "consent_unknown_event": (50, "privacy.consent.event", "unknown event type 'consent'"),
    "consent_event_with_entity": (22, "events.consent.entity", "set entity: null"),
    "consent_property_missing": (
        55,
        "privacy.consent.property",
        "declares no property 'granted'",
    ),
    "consent_property_not_bool": (
        25,
        "events.consent.properties.granted.type",
        "must be bool, not string",
    ),
    "consent_bad_mode": (55, "privacy.consent.without_consent", "'keep' is not allowed"),
    "model_tune_bad_half_life": (52, "model.tune.half_life", "'soon' is not a duration"),
}


def test_demo_spec_is_valid() -> None:
    spec = load_spec(ROOT / "nextbest.yaml")
    assert {"view", "add_to_cart", "purchase", "rate", "identify"} <= set(spec.events)
    assert {"category", "price", "in_stock", "title"} <= set(spec.entities.item.attributes)
    assert spec.identify_events() == ["identify"]
    affinity = spec.features["category_affinity_7d"]
    assert isinstance(affinity, WindowFeature) and affinity.group_by == "category"
    assert affinity.window.delta.days == 7
    assert spec.policy_for("checkout")[0] == "checkout"


def test_minimal_fixture_is_valid() -> None:
    assert load_spec(SPECS / "minimal.yaml").name == "tiny_shop"


def test_there_is_a_fixture_for_every_case() -> None:
    on_disk = {p.stem for p in (SPECS / "invalid").glob("*.yaml")}
    assert on_disk == set(INVALID)
    assert len(on_disk) >= 10


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_spec_names_line_path_and_fix(name: str) -> None:
    line, path, words = INVALID[name]
    file = SPECS / "invalid" / f"{name}.yaml"
    with pytest.raises(SpecError) as caught:
        load_spec(file)
    matching = [p for p in caught.value.problems if words in p.message]
    assert matching, [str(p) for p in caught.value.problems]
    problem = matching[0]
    assert (problem.line, problem.path) == (line, path)
    assert problem.file == str(file)
    assert str(problem).startswith(f"{file}:{line}: ")


def test_every_problem_is_listed_at_once() -> None:
    text = (SPECS / "minimal.yaml").read_text()
    text = (
        text.replace("window: 1h", "window: 1 hour")
        .replace("group_by: category", "group_by: brand")
        .replace("kind: item\n", "kind: item\n    titel: Picks\n")
        .replace("actions: [recommend]", "actions: [recommend, upsell]")
    )
    spec, problems = parse_spec(text, filename="broken.yaml")
    assert spec is None
    messages = "\n".join(str(p) for p in problems)
    # a broken entry hides none of its siblings' problems, nor other sections'
    for words in ("'1 hour' is not a duration", "'brand'", "'titel'", "'upsell'"):
        assert words in messages, messages
    assert [p.line for p in problems] == sorted(p.line for p in problems)


def test_unknown_key_lists_what_is_allowed() -> None:
    text = (SPECS / "minimal.yaml").read_text().replace("kind: item\n", "kind: item\n    xyz: 1\n")
    _, problems = parse_spec(text)
    assert any("allowed keys: cap, eligibility, kind" in p.message for p in problems), problems


def test_unreadable_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("5m", 300), ("1h", 3600), ("7d", 604800), ("2w", 1209600)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["5 minutes", "0m", "m", "1y", "-1h", ""])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_cli_exit_codes() -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "launcher", "validate", "--spec", str(ROOT / "nextbest.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    broken = SPECS / "invalid" / "misspelled_key.yaml"
    bad = subprocess.run(
        [sys.executable, "-m", "launcher", "validate", "--spec", str(broken)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2
    assert "misspelled_key.yaml:25: features.views_1h.aggregate" in bad.stderr
    assert "2 problems" in bad.stderr


def test_model_tune_defaults_and_switch() -> None:
    """Tuning is on by default; `tune: false` pins the values; "none" means no decay."""
    text = (SPECS / "minimal.yaml").read_text()
    spec, _ = parse_spec(text)
    assert spec is not None and spec.model.tune is not None
    assert None in spec.model.tune.half_life and spec.model.tune.split == "global"
    pinned, problems = parse_spec(text + "model:\n  half_life: none\n  tune: false\n")
    assert pinned is not None, problems
    assert pinned.model.tune is None and pinned.model.half_life_ms is None
