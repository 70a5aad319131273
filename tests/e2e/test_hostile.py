"""Hostile input (issue 12, item 5), in one run against the real API over HTTP and the
real stream process on one data home: the named cases of the issue, records written
straight to the log past the API, and schemathesis-generated requests (positive and
negative) for every operation of the app's own OpenAPI. Then the proof: no 5xx for any
input; the stream still alive and applying a canary on every partition within
seconds; online features equal to a batch recomputation over the accepted events; an
erased subject (visitor who identified, got decisions, gave feedback) in no file.
The phases are in tests/support/hostile_run.py, the cases in tests/support/hostile_cases.py.

Prints `hostile: N inputs tried, R rejected with 4xx, ...` to the terminal.
"""

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.hostile_cases import raw_records
from tests.support.hostile_helpers import fresh_tag, live_stack
from tests.support.hostile_run import (
    Run,
    alive,
    barrier,
    compare,
    erase,
    named,
    phase,
    poison_kept,
    subject,
)
from tests.support.hostile_run import fuzz as fuzz_phase


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Run]:
    clock = [time.monotonic()]
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        now = time.monotonic()
        seconds[name], clock[0] = now - clock[0], now

    with live_stack(tmp_path_factory.mktemp("hostile") / "home") as stack:
        lap("stack")
        tag = fresh_tag()
        item = stack.world.category_items("hiking")[0]
        subjects = [
            subject(stack, f"erased-{tag}", item, named_ids=False),
            subject(stack, f"named-{tag}", item, named_ids=True),
        ]
        r = Run(stack, tag, subjects, raw_records(tag, item))
        named(r, item)
        stack.append_raw([*r.raw.dead, *r.raw.tolerated])
        lap("named")
        fuzz_phase(r)
        lap("fuzz")
        phase(r, "canary", barrier, item)
        lap("canary")
        if "canary" not in r.errors:
            r.kept_poison = poison_kept(r)
            r.mismatches = compare(r)
            lap("compare")
            phase(r, "erasure", erase, item)
            lap("erasure")
            if alive(r, "end"):
                # Item aggregates keep the erased users' past views until they leave
                # their window (a count is not personal data): compare people only.
                after = compare(r)
                r.mismatches_after = [m for m in after if not m.startswith("item:")]
        times = ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
        capture: Any = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            # To the terminal, so CI logs show it.
            print(f"\n{r.summary()} (seconds: {times})", flush=True)
        yield r


def test_no_input_gets_a_5xx(run: Run) -> None:
    errors = run.stack.api.tally.server_errors
    assert run.stack.api.tally.tried > 400
    shown = "\n".join(f"{a.status} {a.method} {a.path}: {a.sent} -> {a.said}" for a in errors)
    assert errors == [], shown


def test_every_operation_was_fuzzed(run: Run) -> None:
    assert len(run.fuzzed) >= 8, run.fuzzed  # every route of the OpenAPI but DELETE
    assert all(n > 0 for n in run.fuzzed.values()), run.fuzzed


def test_named_cases_get_the_4xx_that_names_them(run: Run) -> None:
    assert run.wrong_status == []


def test_valid_events_of_a_mixed_batch_are_accepted(run: Run) -> None:
    assert run.mixed["status"] == 202, run.mixed
    assert run.mixed["event_ids"] == run.mixed_ids
    assert len(run.mixed["rejected"]) == 9
    assert set(run.mixed_ids) <= run.stack.api.tally.acknowledged  # and in bronze (barrier)


def test_the_stream_survives_and_applies_a_canary_within_seconds(run: Run) -> None:
    before_erasure = [c for c in run.crashes if not c.startswith(("erasure:", "end:"))]
    assert before_erasure == [], before_erasure
    assert "canary" not in run.errors, run.errors["canary"]
    assert run.canary_s is not None and run.canary_s < 15, run.canary_s


def test_the_stream_survives_the_erasures(run: Run) -> None:
    assert run.crashes == [], run.crashes


def test_records_written_past_the_api_are_dead_letters(run: Run) -> None:
    assert run.canary_s is not None, "the stream never caught up"
    assert run.kept_poison == []


def test_online_features_equal_a_batch_recomputation(run: Run) -> None:
    assert run.canary_s is not None, "the stream never caught up"
    assert run.mismatches == [], run.mismatches[:20]
    assert run.mismatches_after == [], run.mismatches_after[:20]


def test_an_erased_subject_is_in_no_file(run: Run) -> None:
    assert "erasure" not in run.errors, run.errors["erasure"]
    s = run.subjects[0]
    assert s.before, "the subject's ids should be on disk before the erasure"
    assert s.leftovers == [], json.dumps(s.job, indent=1)
    assert s.job.get("status") == "done", json.dumps(s.job, indent=1)


def test_a_subject_whose_event_ids_name_them_is_in_no_file(run: Run) -> None:
    assert "erasure" not in run.errors, run.errors["erasure"]
    s = run.subjects[1]
    assert s.before
    assert s.leftovers == [], json.dumps(s.job, indent=1)
    assert s.job.get("status") == "done", json.dumps(s.job, indent=1)


def test_erasing_a_system_key_is_refused(run: Run) -> None:
    assert "erasure" not in run.errors, run.errors["erasure"]
    assert run.erase_wrong_status == []
    views = run.collateral["item views"]
    assert views[0] is not None and views[1] == views[0], views


def test_erasing_an_id_every_record_spells_takes_nothing_of_others(run: Run) -> None:
    assert "erasure" not in run.errors, run.errors["erasure"]
    lost = {k: v for k, v in run.collateral.items() if k not in ("item views", "view job")}
    assert lost == {
        "events lost from the log": 0,
        "events lost from bronze": 0,
        "dead letters lost": 0,
    }, json.dumps(run.view_job, indent=1)


def test_erasing_an_id_every_record_spells_finishes(run: Run) -> None:
    assert run.collateral.get("view job") == "done", json.dumps(run.view_job, indent=1)


def test_summary_counts_are_zero(run: Run) -> None:
    t = run.stack.api.tally
    assert (len(t.server_errors), len(run.crashes), len(run.leftovers)) == (0, 0, 0)
    assert t.rejected > 300
