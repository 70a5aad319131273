"""Concurrent writers on the online store (issue 7, item 2), SQLite and PostgreSQL.

The stream's bulk writer and the API's decision-log cap counter write while the API reads
snapshots (through `SnapshotReader`, as /v1/decide does) and features (as
GET /v1/users/{id}/features does) at a steady rate: no error at all (in particular no
"database is locked"), reads only move forward and are never torn, and the final state
is exactly what was written. The run stops on counts, never on elapsed time.
"""

import asyncio
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from pipelines.records import Update
from pipelines.sinks import merge_updates
from serving.reader import SnapshotReader
from storage.online.engine import create_online_engine
from storage.online.models import Alias, FeatureRow, UserState
from storage.online.serving import ServingStore, Snapshot
from storage.online.store import OnlineStore
from tests.support.waiting import wait_until

USERS = [f"u{i:02d}" for i in range(24)]
FEATURES = (("views_1h", ""), ("cat_views", "boots"), ("cat_views", "tents"))
CAP_PERIOD_MS = 10 * 365 * 24 * 3600 * 1000  # one period for the whole test
CAPS = {"offer": CAP_PERIOD_MS}
MIN_ROUNDS, MIN_READS = 40, 400


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def open_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[int | None], OnlineStore]]:
    """Opens stores with their own engines on one database, as separate processes would
    (the stream, the API); on PostgreSQL in a fresh schema."""
    opened: list[OnlineStore] = []
    options: dict[str, Any] = {}
    if request.param == "sqlite":
        url, admin = f"sqlite:///{tmp_path / 'online.db'}", None
    else:
        url = request.getfixturevalue("pg_url")
        admin = create_online_engine(url)
        schema = f"c_{uuid.uuid4().hex[:12]}"
        with admin.begin() as conn:
            conn.execute(sa.text(f'create schema "{schema}"'))
        options["schema_translate_map"] = {None: schema}

    def open_one(pool_size: int | None) -> OnlineStore:
        engine = create_online_engine(url, pool_size=pool_size)
        if options:
            engine = engine.execution_options(**options)
        store = OnlineStore(engine)
        store.create_all()
        ServingStore(store).ensure_tables()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.dispose()
    if admin is not None:
        with admin.begin() as conn:
            conn.execute(sa.text(f'drop schema "{options["schema_translate_map"][None]}" cascade'))
        admin.dispose()


def _updates(round_: int) -> list[Update]:
    """One stream batch: every user's features and state at `round_` (absolute values),
    preceded by a stale update for half of them that the last-row-per-key merge drops."""

    def update(user: str, k: int) -> Update:
        rows = [
            FeatureRow(user, name, float(k), k, group_key=group, value_json=None)
            for name, group in FEATURES
        ]
        aliases = [Alias(f"anon-{user}", user)] if k == 1 else []
        return Update(rows, UserState(user, k, recent_items=[f"i{k}"]), aliases)

    stale = [update(u, round_ - 1) for u in USERS[::2]] if round_ > 1 else []
    return [*stale, *(update(u, round_) for u in USERS)]


@dataclass
class _Load:
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    rounds: int = 0  # stream batches committed
    decide_reads: int = 0  # snapshots through SnapshotReader
    feature_reads: int = 0
    caps: Counter[str] = field(default_factory=Counter)  # cap increments committed per user
    seen_rounds: set[int] = field(default_factory=set)

    def enough(self) -> bool:
        return self.rounds >= MIN_ROUNDS and min(self.decide_reads, self.feature_reads) >= MIN_READS

    def guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # asserted in the test thread
                self.errors.append(exc)
                self.stop.set()

        return run


def _check_snapshot(
    snap: Snapshot, actor: str, user: str, last: dict[str, int], caps: Counter[str]
) -> int:
    """One /v1/decide read: consistent, and never older than this client's last read of
    the user (by id or by the anonymous id linked in the user's first batch)."""
    assert snap.actor in (user, f"anon:anon-{user}")
    rounds = {int(f.value or 0) for f in snap.features}
    assert len(rounds) <= 1, f"torn features {rounds}"  # one transaction per batch
    k = rounds.pop() if rounds else 0
    state_k = snap.state.event_ts_ms if snap.state is not None else 0
    # The state is read before the features: neither older than the last read, and the
    # features never older than the state.
    assert k >= state_k >= last.get(user, 0), (k, state_k, last.get(user))
    if actor != user:  # the alias came in the user's first batch
        assert (snap.actor == user) == (k > 0)
    if snap.state is not None:
        assert snap.state.recent_items == [f"i{state_k}"]
    last[user] = k
    count = snap.cap_counts.get("offer", 0)
    assert count >= caps[user]
    caps[user] = count
    return k


def test_stream_writes_while_the_api_reads(
    open_store: Callable[[int | None], OnlineStore],
) -> None:
    stream = open_store(1)  # the stream's OnlineSink: one connection per worker
    api = open_store(None)
    serving = ServingStore(api)
    reader = SnapshotReader(serving, threads=2)
    load = _Load()

    @load.guard
    def write_stream() -> None:
        while not load.stop.is_set():
            features, states, aliases = merge_updates(_updates(load.rounds + 1))
            assert stream.write_stream_rows(features, states, aliases)
            load.rounds += 1

    @load.guard
    def count_caps() -> None:  # the API's decision-log thread (`DecisionLog.count_caps`)
        i = 0
        while not load.stop.is_set():
            user = USERS[i % len(USERS)]
            serving.increment_caps([(user, "offer", CAP_PERIOD_MS)])
            load.caps[user] += 1
            i += 1
            load.stop.wait(0.003)  # a steady rate of decisions, not a wait for a condition

    @load.guard
    def read_features() -> None:  # GET /v1/users/{id}/features
        last: dict[str, int] = {}
        i = 0
        while not load.stop.is_set():
            user = USERS[i % len(USERS)]
            i += 1
            values = {int(f.value or 0) for f in api.get_features(serving.resolve(user))}
            state = api.get_state(user)
            assert len(values) <= 1, f"torn features {values}"
            k = values.pop() if values else 0
            assert k >= last.get(user, 0)
            assert state is None or state.event_ts_ms >= k
            last[user] = k
            load.feature_reads += 1
            load.stop.wait(0.002)

    async def decide_clients() -> None:  # concurrent /v1/decide requests
        async def client(n: int) -> None:
            last: dict[str, int] = {}
            caps: Counter[str] = Counter()
            i = n
            while not load.stop.is_set():
                user = USERS[i % len(USERS)]
                actor = f"anon:anon-{user}" if i % 3 == 0 else user
                i += 1
                snap = await reader.read(actor, surface="default", caps=CAPS)
                load.seen_rounds.add(_check_snapshot(snap, actor, user, last, caps))
                load.decide_reads += 1
                await asyncio.sleep(0.002)

        await asyncio.gather(*(client(n) for n in range(4)))

    @load.guard
    def read_decide() -> None:
        asyncio.run(decide_clients())

    threads = [
        threading.Thread(target=fn, name=fn.__name__)
        for fn in (write_stream, count_caps, read_features, read_decide)
    ]
    for t in threads:
        t.start()
    try:
        wait_until(
            lambda: load.stop.is_set() or load.enough(),
            timeout=60,
            what="concurrent load",
        )
    finally:
        load.stop.set()
        for t in threads:
            t.join(timeout=60)
        reader.close()
    locked = [e for e in load.errors if "locked" in str(e)]
    assert locked == [], locked
    assert load.errors == []
    assert load.enough()
    assert len(load.seen_rounds - {0}) >= 3  # the reads interleaved with many batches

    # The final state is exactly the last batch written, and every cap increment counted.
    final = load.rounds
    for user in USERS:
        snap = serving.snapshot(f"anon:anon-{user}", surface="default", caps=CAPS)
        assert snap.actor == user
        assert snap.state is not None and snap.state.event_ts_ms == final
        assert snap.state.recent_items == [f"i{final}"]
        assert sorted((f.feature, f.group_key, f.value) for f in snap.features) == sorted(
            (name, group, float(final)) for name, group in FEATURES
        )
        assert snap.cap_counts.get("offer", 0) == load.caps[user]
    print(
        f"\nonline ({api.engine.dialect.name}): {load.rounds} stream batches of "
        f"{len(USERS)} users, {sum(load.caps.values())} cap increments, "
        f"{load.decide_reads} decide snapshots, {load.feature_reads} feature reads, 0 errors"
    )
