"""Hostile input (issue 12, item 5), in one run against the real API over HTTP and the
real stream process on one data home: the named cases of the issue, records written
straight to the log past the API, and schemathesis-generated requests (positive and
negative) for every operation of the app's own OpenAPI. Then the proof: no 5xx for any
input; the stream still alive and applying a canary on every partition within
seconds; online features equal to a batch recomputation over the accepted events; an
erased subject (visitor who identified, got decisions, gave feedback) in no file.

Prints `hostile: N inputs tried, R rejected with 4xx, ...` to the terminal.
"""

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from benchmarks.chaos_check import bronze_ids
from storage.delta.store import DeltaStore
from tests.hostile_cases import RawRecords, mixed_batch, named_cases, raw_records
from tests.hostile_helpers import (
    Stack,
    canaries,
    dead_letter_count,
    fresh_tag,
    live_stack,
    logged_event_ids,
)
from tests.stream_helpers import delta_events, online_mismatches
from tests.waiting import wait_until

FUZZ_EXAMPLES = 200
ERASURE_TIMEOUT_S = 25.0


@dataclass
class Subject:
    """A visitor who browses, identifies, browses more, gets decisions and clicks.
    `named_ids`: their events carry client-chosen ids that embed the user id."""

    user: str
    anon: str
    ref: str  # a value only they sent
    named_ids: bool
    event_ids: list[str] = field(default_factory=list)
    job: dict[str, Any] = field(default_factory=dict)
    before: list[str] = field(default_factory=list)  # files holding them before erasure
    leftovers: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ids(self) -> list[str]:
        return [self.user, self.anon, self.ref]


@dataclass
class Run:
    stack: Stack
    tag: str
    subjects: list[Subject]
    raw: RawRecords
    wrong_status: list[str] = field(default_factory=list)  # named cases answered otherwise
    mixed: dict[str, Any] = field(default_factory=dict)
    mixed_ids: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    canary_s: float | None = None
    kept_poison: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    mismatches_after: list[str] = field(default_factory=list)
    erase_wrong_status: list[str] = field(default_factory=list)
    collateral: dict[str, Any] = field(default_factory=dict)  # what erasures took of others
    view_job: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # phase -> what went wrong
    fuzzed: dict[str, int] = field(default_factory=dict)  # operation -> generated requests

    @property
    def leftovers(self) -> list[str]:
        """Files naming the erased subject of item (d); the second subject, whose
        event ids name it, has a verdict of its own."""
        return self.subjects[0].leftovers

    def summary(self) -> str:
        t = self.stack.api.tally
        return (
            f"hostile: {t.tried} inputs tried, {t.rejected} rejected with 4xx, "
            f"{len(t.server_errors)} 5xx, {len(self.crashes)} stream crashes, "
            f"{len(self.leftovers)} erasure leftovers"
        )


def _alive(run: Run, when: str) -> bool:
    if run.stack.stream.poll() is None:
        return True
    if not run.crashes:  # one process, one crash: reported where it was first seen
        run.crashes.append(f"{when}: exit {run.stack.stream.returncode}\n{run.stack.stream_log()}")
    return False


def _subject(stack: Stack, name: str, item: str, *, named_ids: bool) -> Subject:
    s = Subject(f"{name}-user", f"{name}-visitor", f"{name}-ref", named_ids)
    ts = time.time() - 60
    base = {"anonymous_id": s.anon, "context": {"session_id": f"s-{s.anon}"}}
    events = [
        {"type": "view", "item_id": item, "ts": ts, **base},
        {"type": "identify", "user_id": s.user, "ts": ts + 1, **base},
    ]
    for n in range(3):
        event = {"type": "view", "user_id": s.user, "item_id": item, "ts": ts + 2 + n}
        events.append({**event, "properties": {"referrer": s.ref}})
        if named_ids:
            events[-1]["event_id"] = f"ev-{s.user}-{n}"
    r = stack.api.send("POST", "/v1/events", body={"events": events})
    assert r.status_code == 202 and r.json()["accepted"] == 5, r.text
    s.event_ids = r.json()["event_ids"]
    for actor in (s.user, f"anon:{s.anon}"):
        r = stack.api.send("POST", "/v1/decide", body={"user_id": actor, "k": 3})
        assert r.status_code == 200, r.text
        feedback = {"decision_id": r.json()["decision_id"], "user_id": actor, "outcome": "click"}
        assert stack.api.send("POST", "/v1/feedback", body=feedback).status_code == 202
    return s


def _named(run: Run, item: str) -> None:
    api = run.stack.api
    for case in named_cases(run.tag, item, run.stack.key_id):
        r = api.send(case.method, case.path, body=case.body, raw=case.raw, key=case.key)
        if r.status_code not in case.want:
            run.wrong_status.append(f"{case.name}: {r.status_code} {r.text[:200]}")
    body, run.mixed_ids = mixed_batch(run.tag, item)
    r = api.send("POST", "/v1/events", body=body)
    run.mixed = {"status": r.status_code, **(r.json() if r.status_code < 500 else {})}


def _fuzz(run: Run) -> None:
    """Schemathesis cases for every operation but the erasure (exercised on purpose
    below: a random DELETE would start jobs that rewrite the log under the run)."""
    api = run.stack.api
    schema = schemathesis.openapi.from_url(f"{api.url}/schema/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations() if isinstance(r, Ok)]
    ops = [op for op in ops if op.method.upper() != "DELETE"]
    run.fuzzed = {op.label: 0 for op in ops}
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    strategy = st.one_of(*(op.as_strategy(generation_mode=m) for op in ops for m in modes))

    @given(case=strategy)
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )
    def fuzz(case: schemathesis.Case) -> None:
        r = case.call(base_url=api.url, headers={"X-API-Key": api.key}, timeout=30)
        sent = case.as_curl_command(headers={"X-API-Key": "<key>"})
        api.tally.record(case.method, case.formatted_path, r.status_code, sent)
        run.fuzzed[case.operation.label] += 1
        if case.operation.path == "/v1/events" and r.status_code == 202:
            api.tally.acknowledged.update(r.json()["event_ids"])

    fuzz()


def _barrier(run: Run, item: str) -> None:
    """A fresh view per partition; each applied proves its partition was read past all
    that came before. Then bronze holds every acknowledged event."""
    stack = run.stack
    users = canaries(run.tag, stack.settings.partitions)
    start = time.monotonic()
    for user in users:
        body = {"events": [{"type": "view", "user_id": user, "item_id": item, "ts": time.time()}]}
        r = stack.api.send("POST", "/v1/events", body=body)
        assert r.status_code == 202, r.text

    def applied() -> bool:
        assert _alive(run, "canary"), "the stream died"
        for user in users:
            r = stack.api.http.get(f"/v1/users/{user}/features")
            if r.status_code != 200 or not any(
                f["feature"] == "views_1h" and f["value"] == 1.0 for f in r.json()["features"]
            ):
                return False
        return True

    wait_until(applied, timeout=30, what="the canaries in the online features", every=0.05)
    run.canary_s = time.monotonic() - start
    acked = stack.api.tally.acknowledged
    wait_until(lambda: acked <= set(bronze_ids(stack.settings)), timeout=20, what="bronze")


def _poison_kept(run: Run) -> list[str]:
    """Records of `raw.dead` that are not dead letters, or that reached bronze."""
    delta = DeltaStore.from_settings(run.stack.settings)
    dead = set()
    if delta.exists("dead_letters"):
        dead = set(delta.read("dead_letters", columns=["raw"]).column("raw").to_pylist())
    bronze = set(bronze_ids(run.stack.settings))
    kept = []
    for _, payload in run.raw.dead:
        try:
            event_id = json.loads(payload).get("event_id")
        except (ValueError, AttributeError, RecursionError):
            event_id = None
        if payload not in dead or event_id in bronze:
            kept.append(payload[:120].decode(errors="replace"))
    return kept


def _compare(run: Run) -> list[str]:
    stack = run.stack
    items = {
        i["item_id"]: {k: v for k, v in i.items() if k != "item_id"} for i in stack.world.items
    }
    events, _ = delta_events(stack.settings)
    return online_mismatches(stack.settings, stack.world.spec, events, items)


def _item_views(run: Run, item: str) -> float | None:
    rows = run.stack.world.store.get_features(f"item:{item}")
    return next((r.value for r in rows if r.feature == "item_views_1h"), None)


def _wait_job(run: Run, user: str, until: float) -> dict[str, Any]:
    """The job once done or failed, or as it stands at `until`."""
    job: dict[str, Any] = {}

    def finished() -> bool:
        assert _alive(run, "erasure"), "the stream died"
        job.update(run.stack.api.http.get(f"/v1/users/{user}/erasure").json())
        return job["status"] in ("done", "failed")

    with contextlib.suppress(AssertionError):
        wait_until(finished, timeout=max(0.5, until - time.monotonic()), what=user, every=0.1)
    return job


def _erase(run: Run, item: str) -> None:
    """The proof first, alone: the subject with server-made event ids. Then at once:
    the subject whose client-chosen event ids embed its id (erasure promises to find
    those too), ids with a prefix the system keys its own rows by (`item:<id>` is the
    item's online row: a 4xx), and `view`, an id every view record spells, who never
    sent anything: nobody else may lose a record, a dead letter or a count."""
    from storage.erasure_scan import Needles, scan_tree  # the job's own proof, shared

    stack = run.stack
    home = stack.settings.home_dir
    acked = stack.api.tally.acknowledged - {i for s in run.subjects for i in s.event_ids}
    views, dead = _item_views(run, item), dead_letter_count(stack.settings)
    first, second = run.subjects
    for s in run.subjects:
        s.before = scan_tree(home, Needles(s.ids))
    assert stack.api.send("DELETE", f"/v1/users/{first.user}").status_code == 202
    first.job = _wait_job(run, first.user, time.monotonic() + ERASURE_TIMEOUT_S)
    first.leftovers = scan_tree(home, Needles(first.ids))
    for bad in (f"item:{item}", f"~nc:{run.tag}", f"anon:item:{item}", "u%00x", "u" * 300):
        r = stack.api.send("DELETE", f"/v1/users/{bad}")
        if not 400 <= r.status_code < 500:
            run.erase_wrong_status.append(f"DELETE {bad[:40]}: {r.status_code} {r.text[:120]}")
    for user in (second.user, "view"):
        assert stack.api.send("DELETE", f"/v1/users/{user}").status_code == 202
    until = time.monotonic() + ERASURE_TIMEOUT_S * 0.8
    second.job = _wait_job(run, second.user, until)
    second.leftovers = scan_tree(home, Needles(second.ids))
    view_job = _wait_job(run, "view", until)
    run.view_job = view_job
    run.collateral = {
        "view job": view_job.get("status"),
        "events lost from the log": len(acked - logged_event_ids(stack.settings)),
        "events lost from bronze": len(acked - set(bronze_ids(stack.settings))),
        "dead letters lost": dead - dead_letter_count(stack.settings),
        "item views": (views, _item_views(run, item)),
    }


def _phase(run: Run, name: str, fn: Any, *args: Any) -> None:
    """Run a phase; a failure is recorded for the test that owns it, not the run."""
    try:
        fn(run, *args)
    except Exception as exc:  # every failure lands in a named assertion below
        run.errors[name] = f"{type(exc).__name__}: {exc}\n{run.stack.stream_log()}"


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
            _subject(stack, f"erased-{tag}", item, named_ids=False),
            _subject(stack, f"named-{tag}", item, named_ids=True),
        ]
        r = Run(stack, tag, subjects, raw_records(tag, item))
        _named(r, item)
        stack.append_raw([*r.raw.dead, *r.raw.tolerated])
        lap("named")
        _fuzz(r)
        lap("fuzz")
        _phase(r, "canary", _barrier, item)
        lap("canary")
        if "canary" not in r.errors:
            r.kept_poison = _poison_kept(r)
            r.mismatches = _compare(r)
            lap("compare")
            _phase(r, "erasure", _erase, item)
            lap("erasure")
            if _alive(r, "end"):
                # Item aggregates keep the erased users' past views until they leave
                # their window (a count is not personal data): compare people only.
                after = _compare(r)
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
    assert errors == [], "\n".join(f"{a.status} {a.method} {a.path}: {a.sent}" for a in errors)


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
    assert run.crashes == [], run.crashes
    assert "canary" not in run.errors, run.errors["canary"]
    assert run.canary_s is not None and run.canary_s < 15, run.canary_s


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
    lost = {k: v for k, v in run.collateral.items() if k != "item views"}
    assert lost == {
        "view job": "done",
        "events lost from the log": 0,
        "events lost from bronze": 0,
        "dead letters lost": 0,
    }, json.dumps(run.view_job, indent=1)


def test_summary_counts_are_zero(run: Run) -> None:
    t = run.stack.api.tally
    assert (len(t.server_errors), len(run.crashes), len(run.leftovers)) == (0, 0, 0)
    assert t.rejected > 300
