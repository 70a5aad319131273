"""The stream learns the per-user online model from feedback records: routed to the
user's state step (anonymous visitors through identity stitching), written with the
user's state, counted once across client retries, a resume from recovery and a full
replay of the log."""

import json
from datetime import timedelta
from typing import Any

from bytewax.recovery import RecoveryConfig
from bytewax.testing import run_main

from nextbest.demo.shop import DemoConfig
from nextbest.features.state import OnlineEvidence, SessionState
from nextbest.learn.online_model import MAX_SKEW_MS
from nextbest.settings import Settings
from nextbest.spec.models import Spec
from pipelines.flow import build_flow
from pipelines.records import Update
from pipelines.run import ensure_recovery_dir
from storage.online.models import now_ms
from storage.online.store import OnlineStore
from tests.pipelines.test_pipeline_units import T0, ev, run
from tests.support.stream_helpers import append_log, write_catalog

OFFER = "action:free_shipping"


def fb(decision: str, user: str | None, outcome: str, minutes: float, **kw: Any) -> dict[str, Any]:
    ts = (T0 + timedelta(minutes=minutes)).isoformat()
    body = {"record": "feedback", "decision_id": decision, "outcome": outcome, "ts": ts, **kw}
    return {**body, "user_id": user} if user is not None else body


def _json(evidence: OnlineEvidence | None) -> dict[str, Any]:
    """The online model as the online row's JSON holds it."""
    assert evidence is not None
    return json.loads(SessionState(online_model=evidence).encode())["online_model"]


def model_of(updates: list[Update], actor: str) -> dict[str, Any]:
    states = [u.state for u in updates if u.state is not None and u.state.user_id == actor]
    assert states, f"no state written for {actor}"
    return _json(states[-1].session.online_model)


def test_feedback_reaches_the_users_online_model_once(settings: Settings, spec: Spec) -> None:
    payloads = [
        ev("e1", "view", 0, user_id="u1", item_id="i1"),
        fb("d1", "u1", "dismiss", 1, action_id="free_shipping"),
        fb("d1", "u1", "dismiss", 1, action_id="free_shipping"),  # a client retry
        fb("d2", "u1", "dismiss", 2, action_id="free_shipping"),
        fb("d3", "u1", "impression", 3, action_id="recommend", item_id="i1"),
        fb("d3", "u1", "click", 4, action_id="recommend", item_id="i1"),  # shoes
        fb("d4", "u1", "impression", 5, item_id="i2"),  # hats
        fb("d5", "u1", "dismiss", 6, action_id="made_up"),  # not an offer of the spec
        fb("d6", "u1", "click", 6, item_id="not-in-catalog"),
        fb("d7", None, "click", 6, action_id="free_shipping"),  # nobody to route it to
    ]
    lake, online, _ = run(settings, spec, payloads)
    assert sum(r.kind == "feedback" for r in lake) == 9  # the lake still gets every record
    model = model_of(online, "u1")
    assert model["counts"] == {
        OFFER: [0, 2, 0],  # taken, dismissed, ignored
        "category=shoes": [1, 0, 0],
        "category=hats": [0, 0, 1],
    }
    assert model["anchor_ms"] == int((T0 + timedelta(minutes=5)).timestamp() * 1000)
    assert set(model["half_lives"]) == {str(7 * 86_400_000)}
    state = [u.state for u in online if u.state and u.state.user_id == "u1"][-1]
    assert state.event_ts_ms == model["anchor_ms"] and state.recent_items == ["i1"]
    assert not any(u.state and u.state.user_id not in ("u1", "item:i1") for u in online)


def test_a_future_dated_record_is_folded_at_the_stream_clock(
    settings: Settings, spec: Spec
) -> None:
    """A client's ts 30 years ahead: the model (and the user state's event time) moves
    to the stream's clock + skew, not to the record's ts."""
    before = now_ms()
    years = 30 * 365 * 24 * 60  # minutes
    payloads = [
        ev("e1", "view", 0, user_id="u1", item_id="i1"),
        fb("d1", "u1", "click", years, action_id="free_shipping"),
    ]
    _, online, _ = run(settings, spec, payloads)
    model = model_of(online, "u1")
    assert before + MAX_SKEW_MS <= model["anchor_ms"] <= now_ms() + MAX_SKEW_MS
    assert model["counts"] == {OFFER: [1, 0, 0]}
    state = [u.state for u in online if u.state and u.state.user_id == "u1"][-1]
    assert state.event_ts_ms == model["anchor_ms"]


def test_anonymous_feedback_follows_the_visitor_to_their_user(
    settings: Settings, spec: Spec
) -> None:
    view = ev("a1", "view", 0, anonymous_id="anon", item_id="i1")
    early = fb("d1", "anon:anon", "dismiss", 1, action_id="free_shipping")
    link = ev("l1", "identify", 3, anonymous_id="anon", user_id="u9", properties={})
    late = fb("d2", "anon:anon", "dismiss", 4, action_id="free_shipping")
    for order in ([view, early, link, late], [link, late, early, view], [late, early, view, link]):
        _, online, _ = run(settings, spec, order)
        assert model_of(online, "u9")["counts"] == {OFFER: [0, 2, 0]}, order


def _online_model(settings: Settings, user: str) -> dict[str, Any]:
    store = OnlineStore.from_settings(settings)
    try:
        state = store.get_state(user)
    finally:
        store.dispose()
    assert state is not None
    return _json(state.session.online_model)


def test_resume_and_replay_never_count_feedback_twice(settings: Settings, spec: Spec) -> None:
    items = write_catalog(settings, spec, DemoConfig.small(), vectors=False)
    item = next(iter(items))
    category = f"category={items[item]['category']}"
    recovery = RecoveryConfig(ensure_recovery_dir(settings.recovery_dir))
    first = [
        ev("e1", "view", 0, user_id="u1", item_id=item),
        fb("d1", "u1", "dismiss", 1, action_id="free_shipping"),
        fb("d2", "u1", "click", 2, action_id="recommend", item_id=item),
    ]
    append_log(settings, first)
    run_main(build_flow(settings, spec, tail=False), recovery_config=recovery)
    assert _online_model(settings, "u1")["counts"] == {OFFER: [0, 1, 0], category: [1, 0, 0]}

    # After the resume: client retries of both earlier records, and one new dismissal.
    second = [
        fb("d1", "u1", "dismiss", 1, action_id="free_shipping"),
        fb("d2", "u1", "click", 2, action_id="recommend", item_id=item),
        fb("d3", "u1", "dismiss", 3, action_id="free_shipping"),
    ]
    append_log(settings, second)
    run_main(build_flow(settings, spec, tail=False), recovery_config=recovery)
    resumed = _online_model(settings, "u1")
    assert resumed["counts"] == {OFFER: [0, 2, 0], category: [1, 0, 0]}

    # The whole log again from fresh state (no recovery): the same absolute model.
    run_main(build_flow(settings, spec, tail=False))
    assert _online_model(settings, "u1") == resumed
