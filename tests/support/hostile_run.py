"""The hostile run's phases (tests/e2e/test_hostile.py): a subject to erase, the named
cases, raw log records, the schemathesis fuzz, the canary barrier, the batch
comparison and the erasures. Each phase records what it saw on `Run`; the tests there
turn each record into a verdict."""

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from benchmarks.chaos_check import bronze_ids
from storage.delta.store import DeltaStore
from storage.erasure_scan import Needles, scan_tree_apart
from tests.support.hostile_cases import RawRecords, mixed_batch, named_cases
from tests.support.hostile_helpers import Stack, canaries, dead_letter_count, logged_event_ids
from tests.support.stream_helpers import delta_events, online_mismatches
from tests.support.waiting import wait_until

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


def alive(run: Run, when: str) -> bool:
    if run.stack.stream.poll() is None:
        return True
    if not run.crashes:  # one process, one crash: reported where it was first seen
        run.crashes.append(f"{when}: exit {run.stack.stream.returncode}\n{run.stack.stream_log()}")
    return False


def subject(stack: Stack, name: str, item: str, *, named_ids: bool) -> Subject:
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


def named(run: Run, item: str) -> None:
    api = run.stack.api
    for case in named_cases(run.tag, item, run.stack.key_id):
        r = api.send(case.method, case.path, body=case.body, raw=case.raw, key=case.key)
        if r.status_code not in case.want:
            run.wrong_status.append(f"{case.name}: {r.status_code} {r.text[:200]}")
    body, run.mixed_ids = mixed_batch(run.tag, item)
    r = api.send("POST", "/v1/events", body=body)
    run.mixed = {"status": r.status_code, **(r.json() if r.status_code < 500 else {})}


def fuzz(run: Run) -> None:
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
        said = r.text if r.status_code >= 500 else ""
        api.tally.record(case.method, case.formatted_path, r.status_code, sent, said)
        run.fuzzed[case.operation.label] += 1
        if case.operation.path == "/v1/events" and r.status_code == 202:
            api.tally.acknowledged.update(r.json()["event_ids"])

    fuzz()


def barrier(run: Run, item: str) -> None:
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
        assert alive(run, "canary"), "the stream died"
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


def poison_kept(run: Run) -> list[str]:
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


def compare(run: Run) -> list[str]:
    stack = run.stack
    items = {
        i["item_id"]: {k: v for k, v in i.items() if k != "item_id"} for i in stack.world.items
    }
    events, _ = delta_events(stack.settings)
    return online_mismatches(stack.settings, stack.world.spec, events, items)


def item_views(run: Run, item: str) -> float | None:
    rows = run.stack.world.store.get_features(f"item:{item}")
    return next((r.value for r in rows if r.feature == "item_views_1h"), None)


def wait_job(run: Run, user: str, until: float) -> dict[str, Any]:
    """The job once done or failed, or as it stands at `until`."""
    job: dict[str, Any] = {}

    def finished() -> bool:
        assert alive(run, "erasure"), "the stream died"
        job.update(run.stack.api.http.get(f"/v1/users/{user}/erasure").json())
        return job["status"] in ("done", "failed")

    with contextlib.suppress(AssertionError):
        wait_until(finished, timeout=max(0.5, until - time.monotonic()), what=user, every=0.1)
    return job


def erase(run: Run, item: str) -> None:
    """The proof first, alone: the subject with server-made event ids. Then at once:
    the subject whose client-chosen event ids embed its id (erasure promises to find
    those too), ids with a prefix the system keys its own rows by (`item:<id>` is the
    item's online row: a 4xx), and `view`, an id every view record spells, who never
    sent anything: nobody else may lose a record, a dead letter or a count."""
    stack = run.stack
    home = stack.settings.home_dir
    acked = stack.api.tally.acknowledged - {i for s in run.subjects for i in s.event_ids}
    views, dead = item_views(run, item), dead_letter_count(stack.settings)
    first, second = run.subjects
    for s in run.subjects:
        s.before = scan_tree_apart(home, Needles(s.ids))
    assert stack.api.send("DELETE", f"/v1/users/{first.user}").status_code == 202
    started = time.monotonic()
    first.job = wait_job(run, first.user, started + ERASURE_TIMEOUT_S)
    first_s = time.monotonic() - started
    first.leftovers = scan_tree_apart(home, Needles(first.ids))
    for bad in (f"item:{item}", f"~nc:{run.tag}", f"anon:item:{item}", "u%00x", "u" * 300):
        r = stack.api.send("DELETE", f"/v1/users/{bad}")
        if not 400 <= r.status_code < 500:
            run.erase_wrong_status.append(f"DELETE {bad[:40]}: {r.status_code} {r.text[:120]}")
    for user in (second.user, "view"):
        assert stack.api.send("DELETE", f"/v1/users/{user}").status_code == 202
    # The rest are jobs like the first: three times its time (at least 8 s) is plenty.
    until = time.monotonic() + min(ERASURE_TIMEOUT_S, max(8.0, 3 * first_s))
    second.job = wait_job(run, second.user, until)
    second.leftovers = scan_tree_apart(home, Needles(second.ids))
    view_job = wait_job(run, "view", until)
    run.view_job = view_job
    run.collateral = {
        "view job": view_job.get("status"),
        "events lost from the log": len(acked - logged_event_ids(stack.settings)),
        "events lost from bronze": len(acked - set(bronze_ids(stack.settings))),
        "dead letters lost": dead - dead_letter_count(stack.settings),
        "item views": (views, item_views(run, item)),
    }


def phase(run: Run, name: str, fn: Any, *args: Any) -> None:
    """Run a phase; a failure is recorded for the test that owns it, not the run."""
    try:
        fn(run, *args)
    except Exception as exc:  # every failure lands in a named assertion below
        run.errors[name] = f"{type(exc).__name__}: {exc}\n{run.stack.stream_log()}"
