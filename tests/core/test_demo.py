"""The demo shop generator: deterministic, spec-conformant, streaming, and drifting.

The drift test is the reason the generator exists: within a session, the last few
events must predict the next one much better than the user's long-term profile.
"""

import itertools
import json
import tracemalloc
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from launcher.cli import main
from nextbest.demo.arrow import ROW_SCHEMA, iter_event_batches
from nextbest.demo.shop import (
    CATEGORIES,
    DEVICES,
    HIDDEN_PREFIX,
    REGIONS,
    DemoConfig,
    generate_items,
    generate_users,
    iter_event_dicts,
    iter_events,
    public_user,
    write_demo,
)
from nextbest.ingest.events import Event
from nextbest.spec.loader import load_spec

ROOT = Path(__file__).resolve().parents[2]
SMALL = DemoConfig.small()


@pytest.fixture(scope="module")
def events() -> list[Event]:
    return list(iter_events(SMALL))


@pytest.fixture(scope="module")
def items() -> list[dict[str, Any]]:
    return generate_items(SMALL)


def _content(evs: list[Event]) -> list[tuple[Any, ...]]:
    """What a seed decides, without the ids that embed the seed."""
    return [(e.type, e.user_id, e.item_id, e.ts, e.value) for e in evs]


@pytest.mark.timeout(20)
def test_same_seed_same_output_and_different_seed_differs(events: list[Event]) -> None:
    again = list(iter_events(DemoConfig.small()))
    assert [e.to_json() for e in again] == [e.to_json() for e in events]
    assert generate_items(SMALL) == generate_items(DemoConfig.small())
    assert generate_users(SMALL) == generate_users(DemoConfig.small())

    other = DemoConfig.small(seed=8)
    assert _content(list(iter_events(other))) != _content(events)
    assert generate_items(other) != generate_items(SMALL)
    assert generate_users(other) != generate_users(SMALL)


def test_chunk_size_does_not_change_the_stream(events: list[Event]) -> None:
    tiny = [json.dumps(d, separators=(",", ":")) for d in iter_event_dicts(SMALL, chunk_size=7)]
    assert tiny == [e.to_json().decode() for e in events]


def test_sizes_match_config(events: list[Event], items: list[dict[str, Any]]) -> None:
    assert len(items) == SMALL.n_items
    assert len(generate_users(SMALL)) == SMALL.n_users
    assert abs(len(events) - SMALL.n_events) <= 0.01 * SMALL.n_events
    cfg = DemoConfig.small(n_events=12_345, n_users=50, n_items=40, seed=3)
    assert sum(1 for _ in iter_event_dicts(cfg)) == 12_345
    assert list(iter_events(DemoConfig.small(n_events=0))) == []
    medium, large = DemoConfig.medium(), DemoConfig.large()
    assert (medium.n_events, large.n_events) == (200_000, 10_000_000)
    assert (large.n_users, large.n_items) == (1_000_000, 100_000)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="n_users"):
        DemoConfig(n_users=0)
    with pytest.raises(ValueError, match="probability"):
        DemoConfig(cart_rate=1.5)
    naive = DemoConfig(start=datetime(2025, 3, 1))
    assert naive.start == datetime(2025, 3, 1, tzinfo=UTC)


def test_events_conform_to_spec_and_catalog(
    events: list[Event], items: list[dict[str, Any]]
) -> None:
    spec = load_spec(ROOT / "nextbest.yaml")
    item_ids = {i["item_id"] for i in items}
    user_ids = {u["user_id"] for u in generate_users(SMALL)}
    for e in events:
        assert Event.from_json(e.to_json()) == e
        declared = spec.events[e.type]
        assert set(e.properties) <= set(declared.properties), e
        assert (e.value is not None) == (declared.value == "required"), e
        if declared.entity == "item":
            assert e.item_id in item_ids, e
        else:
            assert e.item_id is None, e
        assert e.user_id is None or e.user_id in user_ids
        assert e.context.session_id and e.context.geo in REGIONS and e.context.device in DEVICES
        assert e.ts >= SMALL.start
    assert {e.type for e in events} == set(spec.events)


def test_order_and_unique_ids(events: list[Event]) -> None:
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(events))
    assert len({e.event_id for e in events}) == len(events)
    by_session: dict[str | None, list[Event]] = defaultdict(list)
    for e in events:
        by_session[e.context.session_id].append(e)
    for evs in by_session.values():
        assert all(a.ts < b.ts for a, b in itertools.pairwise(evs))
        assert len({e.context.geo for e in evs}) == len({e.context.device for e in evs}) == 1


def test_funnel(events: list[Event]) -> None:
    counts = Counter(e.type for e in events)
    assert 0.05 <= counts["add_to_cart"] / counts["view"] <= 0.15
    assert 0.15 <= counts["purchase"] / counts["add_to_cart"] <= 0.4
    assert 0 < counts["rate"] < counts["purchase"]
    assert any("referrer" in e.properties for e in events if e.type == "view")
    previous: dict[str | None, Event] = {}
    orders = set()
    for e in events:
        prev = previous.get(e.context.session_id)
        if e.type == "add_to_cart":
            assert prev is not None and prev.type == "view" and prev.item_id == e.item_id
            assert isinstance(e.properties["quantity"], int) and e.properties["quantity"] >= 1
        if e.type == "purchase":
            assert prev is not None and prev.type == "add_to_cart" and prev.item_id == e.item_id
            assert e.properties["quantity"] == prev.properties["quantity"]
            orders.add(e.properties["order_id"])
        if e.type == "rate":
            assert prev is not None and prev.type == "purchase" and prev.item_id == e.item_id
            assert e.value in {1.0, 2.0, 3.0, 4.0, 5.0}
        previous[e.context.session_id] = e
    assert len(orders) == counts["purchase"]


def test_anonymous_sessions_and_identify(events: list[Event]) -> None:
    sessions: dict[str | None, list[Event]] = defaultdict(list)
    for e in events:
        sessions[e.context.session_id].append(e)
    anonymous = [evs for evs in sessions.values() if evs[0].user_id is None]
    assert 0.05 <= len(anonymous) / len(sessions) <= 0.16
    identified = 0
    for evs in anonymous:
        assert evs[0].anonymous_id is not None
        idx = [i for i, e in enumerate(evs) if e.type == "identify"]
        if not idx:
            assert all(e.user_id is None for e in evs)
            continue
        identified += 1
        (i,) = idx
        ident = evs[i]
        assert ident.anonymous_id == evs[0].anonymous_id and ident.user_id is not None
        assert ident.properties == {"email": f"{ident.user_id}@example.com"}
        assert all(e.user_id is None and e.anonymous_id == ident.anonymous_id for e in evs[:i])
        after = evs[i + 1 :]
        assert after, "the session continues after identify"
        assert all(e.user_id == ident.user_id and e.anonymous_id is None for e in after)
    assert identified >= 5


def test_drift_recent_session_beats_long_term_profile(
    events: list[Event], items: list[dict[str, Any]]
) -> None:
    """Held-out next event: majority category of the session's last 3 events vs the
    user's most frequent category over all their history (excluding the held-out one)."""
    category = {i["item_id"]: i["category"] for i in items}
    sessions: dict[str | None, list[tuple[str, str]]] = defaultdict(list)
    history: dict[str, Counter[str]] = defaultdict(Counter)
    for e in events:
        if e.user_id is None or e.item_id is None:
            continue
        sessions[e.context.session_id].append((e.user_id, category[e.item_id]))
        history[e.user_id][category[e.item_id]] += 1
    recent_hits = profile_hits = n = 0
    for evs in sessions.values():
        if len(evs) < 4:
            continue
        user, target = evs[-1]
        recent = Counter(c for _, c in evs[-4:-1]).most_common(1)[0][0]
        profile = history[user].copy()
        profile[target] -= 1
        n += 1
        recent_hits += recent == target
        profile_hits += profile.most_common(1)[0][0] == target
    assert n >= 200
    recent_rate, profile_rate = recent_hits / n, profile_hits / n
    assert recent_rate >= 0.65, recent_rate
    assert recent_rate >= profile_rate + 0.2, (recent_rate, profile_rate)


def test_drift_can_be_switched_off() -> None:
    """The drift is a knob: with every session on a favourite and no off-intent views,
    all behaviour stays inside the user's hidden long-term favourites."""
    cfg = DemoConfig.small(favourite_intent=1.0, in_intent=1.0, n_events=3000)
    category = {i["item_id"]: i["category"] for i in generate_items(cfg)}
    hidden = {u["user_id"]: u["hidden_favourite_categories"] for u in generate_users(cfg)}
    viewed = [e for e in iter_events(cfg) if e.user_id is not None and e.item_id is not None]
    assert all(category[e.item_id] in hidden[e.user_id] for e in viewed)


def test_items_and_users(items: list[dict[str, Any]]) -> None:
    spec = load_spec(ROOT / "nextbest.yaml")
    assert all(set(i) == {"item_id", *spec.entities.item.attributes} for i in items)
    assert len({i["item_id"] for i in items}) == len(items)
    assert {i["category"] for i in items} == set(CATEGORIES)
    assert all(i["price"] > 0 and round(i["price"], 2) == i["price"] for i in items)
    assert 0.8 <= sum(i["in_stock"] for i in items) / len(items) <= 0.97
    assert all(len(i["title"].split()) >= 3 and i["title"][0].isupper() for i in items)

    users = generate_users(SMALL)
    assert len({u["user_id"] for u in users}) == len(users)
    for u in users:
        assert u["home_region"] in REGIONS
        fav = u[f"{HIDDEN_PREFIX}favourite_categories"]
        assert 1 <= len(fav) <= 3 and len(set(fav)) == len(fav) and set(fav) <= set(CATEGORIES)
        assert abs(sum(u[f"{HIDDEN_PREFIX}category_weights"]) - 1) < 1e-3
        assert set(public_user(u)) == {"user_id", *spec.entities.user.attributes}


def test_popularity_is_skewed(events: list[Event]) -> None:
    views = Counter(e.item_id for e in events if e.type == "view")
    top = sum(c for _, c in views.most_common(SMALL.n_items // 10))
    assert top / sum(views.values()) > 0.3  # top 10% of items get far more than 10%


def test_arrow_batches_equal_event_rows(events: list[Event]) -> None:
    batches = list(iter_event_batches(SMALL, batch_size=1000))
    assert [b.num_rows for b in batches[:-1]] == [1000] * (len(batches) - 1)
    table = pa.Table.from_batches(batches, schema=ROW_SCHEMA)
    assert table.to_pylist() == [e.to_row() for e in events]


def test_write_demo(tmp_path: Path, events: list[Event]) -> None:
    counts = write_demo(tmp_path / "demo", SMALL)
    assert counts == {"items": SMALL.n_items, "users": SMALL.n_users, "events": len(events)}
    lines = (tmp_path / "demo" / "events.jsonl").read_text().splitlines()
    assert lines == [e.to_json().decode() for e in events]
    items = [json.loads(line) for line in (tmp_path / "demo" / "items.jsonl").open()]
    assert items == generate_items(SMALL)
    users = [json.loads(line) for line in (tmp_path / "demo" / "users.jsonl").open()]
    assert users == generate_users(SMALL)


@pytest.mark.timeout(60)
def test_large_preset_streams_in_bounded_memory() -> None:
    """The 10M-event preset yields its first events without materialising the rest."""
    tracemalloc.start()
    try:
        first = list(itertools.islice(iter_event_dicts(DemoConfig.large(), chunk_size=4096), 5000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(first) == 5000
    ts = [Event.model_validate(d).ts for d in first]
    assert all(a <= b for a, b in itertools.pairwise(ts))
    assert peak < 400 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_history_ends_at_a_given_time_deterministically(events: list[Event]) -> None:
    """`ending_at(now)` moves the whole history so that it ends at `now`; the same `now`
    gives the same events, another one shifts every timestamp and nothing else."""
    end = datetime(2026, 6, 1, 12, 30, tzinfo=UTC)
    ending = list(iter_events(SMALL.ending_at(end)))
    assert ending == list(iter_events(SMALL.ending_at(end)))
    last = max(e.ts for e in ending)
    assert end - timedelta(days=1) < last <= end
    assert min(e.ts for e in ending) >= end - timedelta(days=SMALL.days)
    shift = end - timedelta(days=SMALL.days) - SMALL.start
    assert [e.ts - shift for e in ending] == [e.ts for e in events]
    assert [(e.type, e.user_id, e.item_id) for e in ending] == [
        (e.type, e.user_id, e.item_id) for e in events
    ]


def test_sessions_running_past_the_end_stop_at_it() -> None:
    end = datetime(2026, 6, 1, tzinfo=UTC)
    shape: dict[str, Any] = {"n_users": 50, "n_items": 40, "n_events": 6000, "days": 1}
    shape["mean_session_events"] = 60.0  # long sessions: some run past the end of the day
    free = [e.ts for e in iter_events(DemoConfig(**shape, start=end - timedelta(days=1)))]
    assert max(free) > end  # without `end` they would
    stamps = [e.ts for e in iter_events(DemoConfig(**shape, end=end))]
    assert max(stamps) == end and stamps == sorted(stamps)
    assert sum(t == end for t in stamps) == sum(t >= end for t in free)


def test_cli_demo_history_ends_now(tmp_path: Path) -> None:
    before = datetime.now(UTC)
    assert main(["--home", str(tmp_path / "home"), "demo", "--out", str(tmp_path / "d")]) == 0
    lines = (tmp_path / "d" / "events.jsonl").read_text().splitlines()
    last = max(datetime.fromisoformat(json.loads(line)["ts"]) for line in lines)
    assert before - timedelta(days=1) < last <= datetime.now(UTC)
    fixed = tmp_path / "fixed"
    assert main(["demo", "--out", str(fixed), "--ending", "2026-06-01T00:00:00Z"]) == 0
    again = tmp_path / "again"
    assert main(["demo", "--out", str(again), "--ending", "2026-06-01T00:00:00Z"]) == 0
    assert (fixed / "events.jsonl").read_bytes() == (again / "events.jsonl").read_bytes()
    assert main(["demo", "--out", str(tmp_path / "x"), "--ending", "soon"]) == 2
