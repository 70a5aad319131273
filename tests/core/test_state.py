"""The typed per-user state (`nextbest.features.state`): its versioned encoding, and
that decide reads exactly what the stream wrote through the real online store."""

import json
import pickle
import sqlite3
from typing import Any

import pytest
from bytewax.recovery import RecoveryConfig
from bytewax.testing import run_main

from nextbest.decide.candidates import user_view
from nextbest.features.state import VERSION, OnlineEvidence, SessionState, StateVersionError
from nextbest.features.windows import WindowState
from nextbest.ingest.events import Event
from nextbest.learn.online_model import MEMORY, OnlineState
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from nextbest.spec.models import Spec
from pipelines.flow import USER_CODEC, build_flow
from pipelines.profile import FeaturePlan, ItemProfile, UserProfile
from pipelines.run import ensure_recovery_dir
from pipelines.stateful import is_pickle, state_builder, unpickle
from storage.online.serving import ServingStore
from storage.online.store import OnlineStore
from tests.support.common import ROOT
from tests.support.stream_helpers import append_log, demo_events, write_catalog

STATE = SessionState(
    session_id="s1",
    last_ts_ms=30,
    history=[("a", "purchase", 30), ("b", "view", 20), ("a", "view", 10)],
    seen={"purchase": ["a"], "view": ["b", "a"]},
    online_model=OnlineEvidence(
        anchor_ms=25,
        half_lives={86_400_000: {"category=x": (1.0, 0.5, 0.25)}},
        counts={"category=x": (1, 1, 1)},
    ),
)


def test_encode_decode_round_trips_every_field() -> None:
    data = STATE.encode()
    assert json.loads(data)["v"] == VERSION
    assert SessionState.decode(data) == STATE
    assert SessionState.decode(data.decode()) == STATE  # TEXT column
    assert SessionState.load(json.loads(data)) == STATE  # PostgreSQL's parsed JSON
    assert json.loads(json.dumps(STATE.to_builtins())) == json.loads(data)
    assert SessionState.load(None) == SessionState()


def test_a_row_from_before_the_version_reads_as_version_0() -> None:
    """Rows the stream wrote before `"v"` existed have the same fields: read, not lost."""
    old = {
        "session_id": "s1",
        "last_ts_ms": 30,
        "history": [["a", "purchase", 30], ["b", "view", 20], ["a", "view", 10]],
        "seen": {"purchase": ["a"], "view": ["b", "a"]},
        "online_model": {
            "anchor_ms": 25,
            "half_lives": {"86400000": {"category=x": [1.0, 0.5, 0.25]}},
            "counts": {"category=x": [1, 1, 1]},
        },
    }
    assert SessionState.decode(json.dumps(old)) == STATE
    assert SessionState.load(old) == STATE
    # A version-0 entry of the wrong shape is skipped, as decide always did.
    odd = {**old, "history": [*old["history"], ["x"]], "online_model": {"half_lives": 1}}
    read = SessionState.decode(json.dumps(odd))
    assert read.history == STATE.history and read.online_model is None


@pytest.mark.parametrize("form", ["bytes", "dict"])
def test_another_version_is_refused_with_a_clear_message(form: str) -> None:
    newer: dict[str, Any] = {**json.loads(STATE.encode()), "v": VERSION + 1}
    raw: Any = json.dumps(newer).encode() if form == "bytes" else newer
    with pytest.raises(StateVersionError, match=f"layout version {VERSION + 1}.*upgrade"):
        SessionState.load(raw)


def test_a_malformed_current_row_is_refused_not_misread() -> None:
    bad = {**json.loads(STATE.encode()), "history": [["a", "view"]]}
    with pytest.raises(StateVersionError, match="malformed"):
        SessionState.decode(json.dumps(bad))
    with pytest.raises(StateVersionError, match="not valid JSON"):
        SessionState.decode(b"{nope")
    with pytest.raises(StateVersionError, match="JSON object"):
        SessionState.load(42)


def test_decide_reads_what_the_stream_wrote(settings: Settings) -> None:
    """Stream -> online store row (versioned JSON) -> the decide path's snapshot read ->
    `user_view`: the history decide sees is the user's events, newest first."""
    spec = load_spec(settings.spec)
    cfg, events = demo_events(300)
    write_catalog(settings, spec, cfg, vectors=False)
    append_log(settings, events)
    run_main(build_flow(settings, spec, tail=False))

    mine = [e for e in events if e.get("user_id") and e.get("item_id")]
    user = mine[0]["user_id"]
    store = OnlineStore.from_settings(settings)
    try:
        snap = ServingStore(store).snapshot(user, surface="home")
        db = settings.home_dir / "online.db"
        with sqlite3.connect(db) as conn:
            (text,) = conn.execute(
                "SELECT session FROM nb_user_state WHERE user_id = ?", (user,)
            ).fetchone()
    finally:
        store.dispose()
    assert json.loads(text)["v"] == VERSION
    assert snap.state is not None
    session = snap.state.session
    assert session == SessionState.decode(text)
    theirs = sorted(
        (e for e in events if e.get("user_id") == user and e.get("item_id")),
        key=lambda e: e["ts"],
        reverse=True,
    )
    assert [(i, t) for i, t, _ in session.history] == [(e["item_id"], e["type"]) for e in theirs]
    view = user_view(spec, user, recent_items=snap.state.recent_items, session=session)
    weights = {n: e.weight for n, e in spec.events.items()}
    expected: dict[str, float] = {}
    for e in theirs:
        if weights[e["type"]] > 0:
            expected[e["item_id"]] = expected.get(e["item_id"], 0.0) + weights[e["type"]]
    assert view.history == pytest.approx(expected) and view.fresh
    assert view.seen == session.seen


def test_item_windows_keep_no_raw_event_id(settings: Settings) -> None:
    """An item's window outlives an erased user, so it must not hold a client-chosen
    event id (which may embed the user's id): the item step's recovery snapshots and
    the online store hold only its digest, and the window still counts (and dedupes)."""
    spec = load_spec(settings.spec)
    cfg, _ = demo_events(10)
    items = write_catalog(settings, spec, cfg, vectors=False)
    item = next(iter(items))
    token = "web-vis7q4z-1"
    view = {
        "event_id": token,
        "type": "view",
        "anonymous_id": "vis7q4z",
        "item_id": item,
        "ts": "2026-01-05T10:00:00+00:00",
    }
    append_log(settings, [view, view])  # a client retry: counted once
    recovery = RecoveryConfig(ensure_recovery_dir(settings.recovery_dir))
    run_main(build_flow(settings, spec, tail=False), recovery_config=recovery)

    store = OnlineStore.from_settings(settings)
    try:
        rows = store.get_features(f"item:{item}")
    finally:
        store.dispose()
    assert [(r.feature, r.value) for r in rows] == [("item_views_1h", 1.0)]
    item_step = Spec.step_id("state", "item")
    snaps = []
    for db in settings.recovery_dir.glob("*.sqlite3"):
        with sqlite3.connect(db) as conn:
            snaps += conn.execute(
                "SELECT step_id, ser_change FROM snaps WHERE ser_change IS NOT NULL"
            ).fetchall()
    mine = [blob for step, blob in snaps if step.endswith(item_step)]
    assert mine, "the item step wrote no snapshot"
    assert not [blob for blob in mine if token.encode() in blob]
    assert token.encode() not in (settings.home_dir / "online.db").read_bytes()


def _profiles() -> tuple[UserProfile, ItemProfile]:
    from tests.pipelines.test_stream_fast_paths import ITEMS, _ts

    spec = load_spec(ROOT / "nextbest.yaml")
    plan = FeaturePlan.from_spec(spec)
    profile, item = UserProfile(), ItemProfile()
    for n in range(30):
        kind = ("view", "add_to_cart", "rate")[n % 3]
        event = Event(
            event_id=f"e{n}",
            type=kind,
            user_id="u1",
            item_id=f"i{n % 5}",
            ts=_ts(1_740_000_000 + n),
            value=3.0 if kind == "rate" else None,
        )
        profile.fold(plan, event, ITEMS[event.item_id or ""], {})
        item.add(plan, event, ITEMS[event.item_id or ""], {})
    profile.online = OnlineState()
    profile.online.ensure([60_000, 86_400_000])
    for n in range(MEMORY + 3):  # past MEMORY: `floor` and `forgotten` are set
        profile.online.learn(f"d{n}", ["category=x"], "impression", 1_740_000_000_000 + n)
    # A client's JSON may hold an int beyond 64 bits; a window keeps what it was given.
    assert profile.windows["views_1h"].add(1_740_000_029_500, 7, "", 10**30)
    profile.feature_rows(plan, "u1", {name: set() for name in profile.windows}, (0, 1))
    return profile, item


def test_profile_snapshots_are_versioned_msgpack_and_restore_the_same_state() -> None:
    profile, item = _profiles()
    data = profile.snapshot()
    assert not is_pickle(data) and b"pipelines" not in data and b"nextbest" not in data
    back = UserProfile.from_snapshot(data)
    assert back.windows["views_1h"].entries == profile.windows["views_1h"].entries
    assert {n: w.values() for n, w in back.windows.items()} == {
        n: w.values() for n, w in profile.windows.items()
    }
    assert (back.written, back.recent, back.seen, back.interactions, back.latest) == (
        profile.written,
        profile.recent,
        profile.seen,
        profile.interactions,
        profile.latest,
    )
    assert back.session_id == profile.session_id and back.interaction_ids == profile.interaction_ids
    assert back.online == profile.online and back.online is not None and back.online.floor
    item_back = ItemProfile.from_snapshot(item.snapshot())
    assert {n: w.entries for n, w in item_back.windows.items()} == {
        n: w.entries for n, w in item.windows.items()
    }


def test_a_snapshot_of_another_layout_is_refused_with_a_clear_message() -> None:
    profile, item = _profiles()
    with pytest.raises(StateVersionError, match=r"layout 'item\.1'.*reads 'user\.1'"):
        UserProfile.from_snapshot(item.snapshot())
    newer = profile.snapshot().replace(b"user.1", b"user.2", 1)
    with pytest.raises(StateVersionError, match=r"layout 'user\.2'"):
        UserProfile.from_snapshot(newer)
    with pytest.raises(StateVersionError, match="not msgpack"):
        UserProfile.from_snapshot(b"\xc1")


def test_pickled_snapshots_from_before_still_resume_after_a_module_move() -> None:
    """Older releases pickled the profiles; their module paths have moved since."""
    profile, _ = _profiles()
    build = state_builder(UserProfile, lambda s, b: [], None, USER_CODEC)
    old = build(pickle.dumps(profile)).state
    assert old.interactions == profile.interactions and old.rewrite == set(profile.windows)
    window = WindowState(window_ms=1000, agg="count")
    window.add(1, "e1", "", 1)
    moved = pickle.dumps(window, protocol=0).replace(
        b"nextbest.features.windows", b"nextbest.windows"
    )
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(moved)
    assert unpickle(moved).values() == {"": 1.0}
