"""The SQL online store on SQLite and PostgreSQL: upserts, idempotent stream batches,
identity, cached decisions, the model registry, erasure, and SQLite's locking policy."""

import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

import storage.online.sql
from nextbest.features.state import OnlineEvidence, SessionState
from nextbest.ingest.consent import ConsentChange
from nextbest.ingest.events import anon_actor
from nextbest.settings import Settings
from storage.online.consent import ConsentStore
from storage.online.engine import create_online_engine, write_engine
from storage.online.models import (
    Alias,
    CachedDecision,
    FeatureRow,
    UserState,
)
from storage.online.store import OnlineStore

SESSION = SessionState(
    session_id="s1",
    last_ts_ms=5,
    history=[("i3", "view", 5), ("i2", "purchase", 4)],
    seen={"purchase": ["i2"], "view": ["i3"]},
    online_model=OnlineEvidence(anchor_ms=4, half_lives={60_000: {"category=x": (1.0, 0.0, 0.5)}}),
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OnlineStore]:
    """A fresh store per test: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        s = OnlineStore(create_online_engine(f"sqlite:///{tmp_path / 'db' / 'online.db'}"))
        s.create_all()
        yield s
        s.dispose()
        return
    base = create_online_engine(request.getfixturevalue("pg_url"))
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with base.begin() as conn:
        conn.execute(sa.text(f'create schema "{schema}"'))
    s = OnlineStore(base.execution_options(schema_translate_map={None: schema}))
    s.create_all()
    try:
        yield s
    finally:
        with base.begin() as conn:
            conn.execute(sa.text(f'drop schema "{schema}" cascade'))
        base.dispose()


def _feature(user: str, name: str, value: float, ts: int, group: str = "") -> FeatureRow:
    return FeatureRow(user_id=user, feature=name, value=value, event_ts_ms=ts, group_key=group)


def test_upsert_overwrites_by_key_and_keeps_other_groups(store: OnlineStore) -> None:
    store.create_all()  # idempotent
    assert (
        store.upsert_features(
            [
                _feature("u1", "views_1h", 1.0, 100),
                _feature("u1", "cat_views", 2.0, 100, group="boots"),
                {
                    "user_id": "u1",
                    "feature": "top",
                    "value": None,
                    "event_ts_ms": 90,
                    "value_json": {"cats": ["boots", "tents"]},
                },
                _feature("u2", "views_1h", 7.0, 100),
            ]
        )
        == 4
    )
    first = {(f.feature, f.group_key): f for f in store.get_features("u1")}
    assert (
        store.upsert_features(
            [_feature("u1", "views_1h", 2.0, 150), _feature("u1", "views_1h", 3.0, 200)]
        )
        == 1
    )  # duplicates inside one call collapse, last wins
    after = {(f.feature, f.group_key): f for f in store.get_features("u1")}

    assert set(after) == {("views_1h", ""), ("cat_views", "boots"), ("top", "")}
    assert after["views_1h", ""].value == 3.0
    assert after["views_1h", ""].event_ts_ms == 200
    assert after["views_1h", ""].updated_at_ms is not None
    assert after["views_1h", ""].updated_at_ms >= first["views_1h", ""].updated_at_ms  # type: ignore[operator]
    assert after["cat_views", "boots"] == first["cat_views", "boots"]
    assert after["top", ""].value is None
    assert after["top", ""].value_json == {"cats": ["boots", "tents"]}
    assert [f.value for f in store.get_features("u2")] == [7.0]
    assert store.get_features("nobody") == []
    many = store.get_features_many(["u2", "u1", "nobody"])
    assert set(many) == {"u1", "u2"} and len(many["u1"]) == 3


def test_non_finite_feature_value_is_rejected(store: OnlineStore) -> None:
    with pytest.raises(ValueError, match="finite"):
        store.upsert_features([_feature("u1", "f", float("nan"), 1)])
    assert store.get_features("u1") == []


def test_large_batches_are_chunked(store: OnlineStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage.online.sql, "CHUNK_ROWS", 7)
    rows = [_feature(f"u{i % 20}", f"f{i % 3}", float(i), i) for i in range(100)]
    assert store.upsert_features(rows) == 60
    got = store.get_features_many([f"u{i}" for i in range(20)])
    assert sum(len(v) for v in got.values()) == 60
    # the last write of each key wins across chunk boundaries
    assert {f.feature: f.value for f in got["u0"]} == {"f0": 60.0, "f1": 40.0, "f2": 80.0}


def test_replaying_an_applied_offset_writes_nothing(store: OnlineStore) -> None:
    state = UserState(user_id="u1", event_ts_ms=10, recent_items=["i1"])
    assert store.apply_stream_batch(
        consumer="online",
        partition=0,
        offset=10,
        features=[_feature("u1", "views", 1.0, 10)],
        states=[state],
        aliases=[Alias("a1", "u1")],
    )
    replay = dict(
        consumer="online",
        partition=0,
        features=[_feature("u1", "views", 99.0, 11)],
        states=[UserState(user_id="u1", event_ts_ms=11, recent_items=["x"])],
        aliases=[Alias("a1", "someone-else")],
    )
    assert not store.apply_stream_batch(offset=10, **replay)  # type: ignore[arg-type]
    assert not store.apply_stream_batch(offset=3, **replay)  # type: ignore[arg-type]
    assert [f.value for f in store.get_features("u1")] == [1.0]
    assert store.get_state("u1").recent_items == ["i1"]  # type: ignore[union-attr]
    assert store.resolve("a1") == "u1"

    # other partitions and consumers have their own offsets
    assert store.apply_stream_batch(consumer="online", partition=1, offset=5)
    assert store.apply_stream_batch(consumer="vectors", partition=0, offset=2)
    assert store.apply_stream_batch(offset=11, **replay)  # type: ignore[arg-type]
    assert [f.value for f in store.get_features("u1")] == [99.0]
    assert store.committed_offsets("online") == {0: 11, 1: 5}
    assert store.committed_offsets("vectors") == {0: 2}
    assert store.committed_offsets("unknown") == {}


def test_a_failing_batch_leaves_offset_and_rows_untouched(store: OnlineStore) -> None:
    assert store.apply_stream_batch(consumer="c", partition=0, offset=1)
    broken = FeatureRow(user_id="u2", feature="f", value=1.0, event_ts_ms=None)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError):
        store.apply_stream_batch(
            consumer="c",
            partition=0,
            offset=2,
            features=[_feature("u1", "f", 5.0, 2), broken],
        )
    assert store.committed_offsets("c") == {0: 1}
    assert store.get_features("u1") == []
    # the same batch, fixed, is applied on retry
    assert store.apply_stream_batch(
        consumer="c", partition=0, offset=2, features=[_feature("u1", "f", 5.0, 2)]
    )
    assert store.committed_offsets("c") == {0: 2}


def test_user_state_round_trip(store: OnlineStore) -> None:
    assert store.get_state("u1") is None
    store.upsert_states(
        [
            {
                "user_id": "u1",
                "event_ts_ms": 5,
                "recent_items": ["i3", "i2"],
                "session": SESSION,
                "session_vector": [0.25, -1.5, 3.0],
            },
            UserState(user_id="u2", event_ts_ms=6),
        ]
    )
    s1 = store.get_state("u1")
    assert s1 is not None
    assert (s1.recent_items, s1.session, s1.event_ts_ms) == (["i3", "i2"], SESSION, 5)
    assert s1.session_vector == pytest.approx([0.25, -1.5, 3.0])
    assert s1.updated_at_ms is not None
    s2 = store.get_state("u2")
    assert s2 is not None and s2.session_vector is None and s2.recent_items == []
    store.upsert_states([UserState(user_id="u1", event_ts_ms=9, session_vector=[0.1] * 64)])
    s1 = store.get_state("u1")
    assert s1 is not None and s1.recent_items == [] and s1.event_ts_ms == 9
    assert s1.session_vector == pytest.approx([0.1] * 64, rel=1e-6)  # float32 storage
    assert set(store.get_states(["u1", "u2", "u3"])) == {"u1", "u2"}


def test_alias_link_and_resolve(store: OnlineStore) -> None:
    assert store.resolve("anon-1") is None
    store.link_alias("anon-1", "u1")
    store.link_alias("anon-2", "u1", linked_at_ms=1234)
    assert store.resolve("anon-1") == "u1"
    assert store.aliases_of("u1") == ["anon-1", "anon-2"]
    store.link_alias("anon-1", "u2")  # a later identify re-points the alias
    assert store.resolve("anon-1") == "u2"
    assert store.aliases_of("u1") == ["anon-2"]


def test_cached_decision_round_trip(store: OnlineStore) -> None:
    actions = [{"action_id": "a1", "item_id": "i1", "score": 0.9}, {"item_id": "i2", "score": 0.5}]
    assert store.get_cached_decision("u1") is None
    store.put_cached_decisions(
        [
            CachedDecision(user_id="u1", actions=actions, model_version="v1", created_at_ms=77),
            {"user_id": "u1", "surface": "email", "actions": [], "model_version": "v1"},
        ]
    )
    got = store.get_cached_decision("u1")
    assert got == CachedDecision("u1", actions, "v1", "default", 77)
    email = store.get_cached_decision("u1", surface="email")
    assert email is not None and email.actions == [] and email.created_at_ms is not None
    store.put_cached_decisions(
        [CachedDecision(user_id="u1", actions=actions[1:], model_version="v2")]
    )
    got = store.get_cached_decision("u1")
    assert got is not None and got.actions == actions[1:] and got.model_version == "v2"


def test_promote_demotes_the_previous_model(store: OnlineStore) -> None:
    assert store.promoted_model() is None
    v1 = store.register_model(
        version="v1",
        metrics={"ndcg@10": 0.31},
        params={"k": 10},
        artifact_path="/m/v1",
        data_version="42",
        created_at_ms=1,
    )
    assert v1.status == "candidate" and v1.metrics == {"ndcg@10": 0.31}
    store.register_model(version="v2", created_at_ms=2)
    store.register_model(version="other-1", name="other", created_at_ms=3)
    store.promote_model("other-1")

    assert store.promote_model("v1").status == "promoted"
    v2 = store.promote_model("v2")
    assert v2.status == "promoted" and v2.promoted_at_ms is not None
    statuses = {m.version: m.status for m in store.list_models()}
    assert statuses == {"v1": "retired", "v2": "promoted", "other-1": "promoted"}
    assert store.promoted_model() == v2
    assert store.promoted_model("other") is not None
    assert [m.version for m in store.list_models("default")] == ["v2", "v1"]
    assert store.promote_model("v2") == v2  # promoting the promoted one changes nothing

    # re-registering refreshes metrics but never the status
    again = store.register_model(version="v2", metrics={"ndcg@10": 0.4})
    assert again.status == "promoted" and again.metrics == {"ndcg@10": 0.4}
    assert store.set_model_status("v1", "rejected").status == "rejected"
    with pytest.raises(LookupError):
        store.promote_model("nope")
    with pytest.raises(LookupError):
        store.set_model_status("nope", "retired")
    with pytest.raises(ValueError):
        store.register_model(version="v3", status="promoted")


def test_delete_user_removes_everything_of_the_user(store: OnlineStore) -> None:
    store.apply_stream_batch(
        consumer="c",
        partition=0,
        offset=1,
        features=[
            _feature("u1", "a", 1.0, 1),
            _feature("u1", "b", 1.0, 1, group="g"),
            _feature(anon_actor("anon-1"), "a", 1.0, 1),
            _feature("u2", "a", 1.0, 1),
        ],
        states=[UserState("u1", 1), UserState(anon_actor("anon-1"), 1), UserState("u2", 1)],
        aliases=[Alias("anon-1", "u1"), Alias("anon-2", "u1"), Alias("anon-3", "u2")],
    )
    store.put_cached_decisions(
        [CachedDecision("u1", []), CachedDecision("u1", [], surface="x"), CachedDecision("u2", [])]
    )
    consent = ConsentStore(store.engine)
    consent.record([ConsentChange("u1", True, 1), ConsentChange(anon_actor("anon-1"), True, 1)])
    consent.record([ConsentChange("u2", True, 1)])

    removed = store.delete_user("u1")

    assert removed == {
        "nb_user_features": 3,
        "nb_user_state": 2,
        "nb_cached_decisions": 2,
        "nb_consent": 2,
        "nb_identity_aliases": 2,
    }
    assert consent.get_many(["u1", anon_actor("anon-1"), "u2"]) == {
        "u2": ConsentChange("u2", True, 1)
    }
    assert store.get_features("u1") == [] and store.get_state("u1") is None
    assert store.get_features(anon_actor("anon-1")) == []
    assert store.resolve("anon-1") is None and store.resolve("anon-2") is None
    assert store.get_cached_decision("u1") is None
    # someone else's data is untouched, and erasing twice is harmless
    assert len(store.get_features("u2")) == 1 and store.resolve("anon-3") == "u2"
    assert store.get_cached_decision("u2") is not None and store.get_state("u2") is not None
    assert set(store.delete_user("u1").values()) == {0}


def test_api_keys(store: OnlineStore) -> None:
    key = store.create_api_key("k1", "argon-or-sha-hash", ["ingest", "decide"])
    assert store.get_api_key("k1") == key and not key.revoked
    with pytest.raises(IntegrityError):
        store.create_api_key("k1", "other", [])
    assert store.revoke_api_key("k1") and not store.revoke_api_key("missing")
    revoked = store.get_api_key("k1")
    assert revoked is not None and revoked.revoked and revoked.scopes == ["ingest", "decide"]
    assert store.get_api_key("missing") is None


def test_ping(store: OnlineStore) -> None:
    assert store.ping()


# --- SQLite specifics ---------------------------------------------------------------------


def test_from_settings_makes_a_wal_sqlite_file_under_home(settings: Settings) -> None:
    store = OnlineStore.from_settings(settings)
    try:
        assert (settings.home_dir / "online.db").is_file()
        with store.engine.connect() as conn:
            pragma = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "synchronous", "foreign_keys")
            }
        assert pragma == {
            "journal_mode": "wal",
            "busy_timeout": 30000,
            "synchronous": 1,
            "foreign_keys": 1,
        }
        store.upsert_features([_feature("u1", "f", 1.0, 1)])
    finally:
        store.dispose()
    reopened = OnlineStore.from_settings(settings)
    try:
        assert [f.value for f in reopened.get_features("u1")] == [1.0]
    finally:
        reopened.dispose()


def test_sqlite_writes_lock_at_begin_and_reads_do_not(tmp_path: Path) -> None:
    path = tmp_path / "online.db"
    engine = create_online_engine(f"sqlite:///{path}")
    OnlineStore(engine).create_all()
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with engine.connect() as reader, reader.begin():
            reader.exec_driver_sql("select count(*) from nb_user_features").scalar()
            other.execute("BEGIN IMMEDIATE")  # a reader never holds the write lock
            other.execute("ROLLBACK")
        # nothing executed yet, the write lock is already taken: BEGIN IMMEDIATE
        with (
            write_engine(engine).connect() as writer,
            writer.begin(),
            pytest.raises(sqlite3.OperationalError, match="locked"),
        ):
            other.execute("BEGIN IMMEDIATE")
    finally:
        other.close()
        engine.dispose()


def test_sqlite_concurrent_writers_and_reader_never_see_locks(tmp_path: Path) -> None:
    """Stream writer + batch writer (Dagster's role) + API-like reader, ~2 s, separate
    engines as separate processes would have: zero lock errors, only committed data."""
    url = f"sqlite:///{tmp_path / 'online.db'}"
    stream, batch, api = (OnlineStore(create_online_engine(url)) for _ in range(3))
    stream.create_all()
    users = [f"u{i}" for i in range(20)]
    stop = threading.Event()
    errors: list[BaseException] = []
    committed: list[int] = []
    seen: list[tuple[str, float]] = []
    reads = 0

    def guard(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # recorded and asserted below
                errors.append(exc)
                stop.set()

        return run

    @guard
    def write_stream() -> None:
        offset = 0
        while not stop.is_set():
            offset += 1
            rows = [_feature(u, f, float(offset), offset) for u in users for f in ("a", "b")]
            states = [UserState(u, offset, recent_items=[f"i{offset}"]) for u in users]
            assert stream.apply_stream_batch(
                consumer="online", partition=0, offset=offset, features=rows, states=states
            )
            committed.append(offset)

    @guard
    def write_batch() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            batch.put_cached_decisions([CachedDecision(u, [{"item_id": f"i{n}"}]) for u in users])
            batch.register_model(version=f"v{n}", created_at_ms=n)
            batch.promote_model(f"v{n}")  # read-then-write transaction
            stop.wait(0.01)

    @guard
    def read_api() -> None:
        nonlocal reads
        last: dict[str, float] = {}
        i = 0
        while not stop.is_set():
            user = users[i % len(users)]
            i += 1
            values = {f.value for f in api.get_features(user)}
            api.get_state(user)
            api.get_cached_decision(user)
            reads += 1
            if values:
                assert len(values) == 1, f"torn read {values}"  # one transaction per batch
                value = values.pop()
                assert value is not None and value >= last.get(user, 0.0)
                last[user] = value
                seen.append((user, value))
            stop.wait(0.002)  # a steady request rate, not a wait for a condition

    threads = [threading.Thread(target=t) for t in (write_stream, write_batch, read_api)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and not stop.is_set():
        stop.wait(0.05)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    try:
        assert not [e for e in errors if "locked" in str(e)], errors
        assert errors == []
        assert len(committed) > 5 and reads > 50 and seen
        assert {v for _, v in seen} <= {float(o) for o in committed}
        assert stream.committed_offsets("online") == {0: committed[-1]}
        assert {f.value for f in api.get_features(users[0])} == {float(committed[-1])}
        promoted = api.promoted_model()
        assert promoted is not None
        assert [m.version for m in api.list_models() if m.status == "promoted"] == [
            promoted.version
        ]
    finally:
        for s in (stream, batch, api):
            s.dispose()


def test_write_stream_rows_is_one_bulk_upsert_of_all_three_tables(store: OnlineStore) -> None:
    """The stream sink's raw-SQL path writes what the per-table methods write."""
    store.upsert_features([_feature("u1", "views_1h", 9.0, 1, "old")])
    written = store.write_stream_rows(
        [
            _feature("u1", "views_1h", 1.0, 100),
            _feature("u1", "views_1h", 2.0, 110),  # same key twice: the last wins
            FeatureRow(
                user_id="u1",
                feature="recent",
                value=None,
                event_ts_ms=5,
                value_json=["i2", "i1"],
                source_partition=1,
                source_offset=42,
            ),
            _feature("u1", "views_1h", 0.0, 120, "old"),  # overwrites an existing row
        ],
        [
            UserState(user_id="u1", event_ts_ms=7, session=SESSION),
            UserState(user_id="u1", event_ts_ms=8, recent_items=["i2"], session_vector=[0.5, -2.0]),
        ],
        [Alias("a1", "u1", 3), Alias("a2", "u1")],
    )
    assert written == 3 + 1 + 2
    rows = {(r.feature, r.group_key): r for r in store.get_features("u1")}
    assert rows["views_1h", ""].value == 2.0 and rows["views_1h", ""].event_ts_ms == 110
    assert rows["views_1h", "old"].value == 0.0
    recent = rows["recent", ""]
    assert recent.value is None and recent.value_json == ["i2", "i1"]
    assert (recent.source_partition, recent.source_offset) == (1, 42)
    assert all(r.updated_at_ms is not None for r in rows.values())
    state = store.get_state("u1")
    assert state is not None
    assert (state.event_ts_ms, state.recent_items, state.session) == (8, ["i2"], SessionState())
    assert state.session_vector == pytest.approx([0.5, -2.0])
    assert store.resolve("a1") == store.resolve("a2") == "u1"
    assert store.write_stream_rows() == 0
    with pytest.raises(ValueError, match="finite"):
        store.write_stream_rows([_feature("u1", "views_1h", float("nan"), 200)])
    after = {(r.feature, r.group_key): r.value for r in store.get_features("u1")}
    assert after["views_1h", ""] == 2.0  # the failed call wrote nothing
