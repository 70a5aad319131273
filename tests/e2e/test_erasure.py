"""Erasure end to end: the API (in process), the stream (`python -m pipelines`, with
recovery) and a Dagster materialization of every asset put one user into every store,
including the silver/gold tables derived from bronze and a dead letter; after the
erasure no file under the data home keeps a byte of them, no older version of any
Delta table or of LanceDB yields them, and nobody else lost anything. Plus the fence
that stops an asset run which read bronze before the erasure, and the Kafka status."""

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError

from definitions.assets.decisions import forget_erased
from definitions.batch.importer import import_events
from definitions.runs import materialize
from nextbest.demo.shop import DemoConfig, write_demo
from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from serving.erasure import STORES, kafka_erasure
from serving.sinks import KafkaSink
from storage.delta.erasure import DERIVED_TABLES, erase_derived
from storage.delta.store import TABLES, DeltaStore, StaleWriteError
from storage.online.models import CachedDecision
from storage.online.serving import erasure_status
from storage.online.store import OnlineStore
from storage.vectors import VectorStore
from tests.serving.test_serving_world import train_and_promote
from tests.support.broker import TansuBroker, read_topic
from tests.support.erasure_stack import Stack, api_and_stream, scan_apart
from tests.support.stream_helpers import write_catalog
from tests.support.waiting import wait_until

TAG = uuid.uuid4().hex[:10]
USER = f"canary-user-{TAG}"
ANON = f"canary-anon-{TAG}"
PROP = f"canary-ref-{TAG}"
OTHER = f"other-user-{TAG}"
CANARIES = [USER.encode(), ANON.encode(), PROP.encode()]
# A small recent history, so the derived tables hold more than our two users and the
# day-partitioned sessions cover a few days only.
HISTORY = DemoConfig(n_users=30, n_items=60, n_events=500, days=3)


@pytest.fixture
def stack(settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    spec = load_spec(settings.spec)
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    cfg = HISTORY.replace(start=start - timedelta(days=4))
    write_catalog(settings, spec, cfg, vectors=True)
    write_demo(tmp_path / "demo", cfg)
    assert import_events(settings, spec, tmp_path / "demo" / "events.jsonl", progress=False)
    store = OnlineStore.from_settings(settings)
    train_and_promote(settings, spec, store, cfg)
    store.dispose()
    with api_and_stream(settings) as live:
        yield live


def _events(user: str, *, anon: str | None, items: list[str]) -> list[dict[str, Any]]:
    ts = int(time.time()) - 60
    out: list[dict[str, Any]] = []
    if anon is not None:
        base = {"anonymous_id": anon, "context": {"session_id": f"s-{anon}"}}
        out.append({"type": "view", "item_id": items[0], "ts": ts, **base})
        out.append({"type": "identify", "user_id": user, "ts": ts + 1, **base})
    for n, item in enumerate(items[1:]):
        out.append(
            {
                "type": "view",
                "user_id": user,
                "item_id": item,
                "ts": ts + 2 + n,
                "context": {"session_id": f"s-{user}"},
                "properties": {"referrer": PROP if user == USER else "search"},
            }
        )
    for n, e in enumerate(out):
        e["event_id"] = f"{user}-e{n}" if user != USER else f"ev-{TAG}-{n}"
    return out


def _invalid(user: str) -> tuple[str, bytes]:
    """A record a producer wrote straight to the log, bypassing the API's validation:
    the stream rejects it into dead_letters, user id and all."""
    body = {"type": "no_such_type", "user_id": user, "ts": int(time.time()), "event_id": user}
    return user, json.dumps(body).encode()


def _rows(delta: DeltaStore, table: str, user: str, version: int | None = None) -> int:
    if not delta.exists(table):
        return 0
    return delta.read(table, version=version, filters=[("user_id", "=", user)]).num_rows


def _dead_letters(delta: DeltaStore, user: str) -> int:
    if not delta.exists("dead_letters"):
        return 0
    raws = delta.read("dead_letters", columns=["raw"]).column("raw").to_pylist()
    return sum(f'"{user}"'.encode() in (r or b"") for r in raws)


def _actors(delta: DeltaStore, table: str) -> set[str]:
    column = DERIVED_TABLES[table][0]
    return set(delta.read(table, columns=[column]).column(column).to_pylist())


def _delta_tables(settings: Settings) -> list[str]:
    root = Path(settings.delta_root)
    return sorted(str(p.parent.relative_to(root)) for p in root.rglob("_delta_log"))


def _holds_canary(data: pa.Table) -> bool:
    text = repr(data.to_pylist())
    return any(c.decode() in text for c in CANARIES)


def _versions_with_canary(delta: DeltaStore, table: str) -> list[int]:
    """Versions of `table` that still yield the canary; a version whose files were
    vacuumed or whose log entry was purged does not load, which is what erasure wants."""
    found = []
    for version in range(delta.version(table) + 1):
        try:
            data = delta.read(table, version=version)
        except (OSError, DeltaError):
            continue
        if _holds_canary(data):
            found.append(version)
    return found


def _scan(home: Path) -> list[str]:
    return scan_apart(home, CANARIES)


def test_erasure_leaves_no_trace_in_any_file(settings: Settings, stack: Stack) -> None:
    client, proc = stack
    spec = load_spec(settings.spec)
    items = [f"i{n:05d}" for n in range(5)]
    for user, anon in ((USER, ANON), (OTHER, f"anon-{OTHER}")):
        r = client.post("/v1/events", json={"events": _events(user, anon=anon, items=items)})
        assert r.status_code == 202 and r.json()["accepted"] == 6, r.text
    client.app.state.runtime.sink.append([_invalid(USER), _invalid(OTHER)])
    delta = DeltaStore.from_settings(settings)
    types = {n: a.type for n, a in spec.entities.item.attributes.items()}
    vectors = VectorStore.from_settings(settings, dim=spec.model.dim, item_attributes=types)  # type: ignore[arg-type]

    def streamed() -> bool:
        assert proc.poll() is None, (settings.home_dir / "logs" / "stream.log").read_text()
        return (
            _rows(delta, "events", USER) == 5
            and _rows(delta, "events", OTHER) == 5
            and _dead_letters(delta, USER) == 1
            and _dead_letters(delta, OTHER) == 1
        )

    wait_until(streamed, timeout=20, what="events and dead letters in Delta")
    for user in (USER, OTHER):
        r = client.post("/v1/decide", json={"user_id": user, "k": 3})
        assert r.status_code in (200, 201), r.text
        feedback = {"decision_id": r.json()["decision_id"], "user_id": user, "outcome": "click"}
        assert client.post("/v1/feedback", json=feedback).status_code == 202
    wait_until(
        lambda: (
            all(_rows(delta, t, u) for t in ("decisions", "feedback") for u in (USER, OTHER))
            and vectors.get_user(USER) is not None
        ),
        timeout=20,
        what="decisions, feedback and the user vector",
    )
    # Dagster derives silver/gold tables, a model and cached decisions from all of it.
    assert materialize(settings) is True
    for table in DERIVED_TABLES:
        assert {USER, OTHER} <= _actors(delta, table), table
    tables = _delta_tables(settings)
    assert set(tables) <= {*TABLES, "items", *DERIVED_TABLES}, "a table erasure does not know"
    online = OnlineStore.from_settings(settings)
    assert online.get_cached_decision(USER) is not None
    online.dispose()
    assert client.get(f"/v1/users/{USER}/features").status_code == 200
    old_lance = vectors.version("users")
    # The scan below covers what the assets write besides Delta: models, metrics, the
    # uplift/OPE reports, Dagster's run and event storage.
    assert list((settings.home_dir / "models").glob("*.metrics.json"))
    assert any(p.is_file() for p in settings.dagster_home.rglob("*"))
    assert _scan(settings.home_dir), "the canaries should be on disk before erasure"
    assert any(_versions_with_canary(delta, t) for t in tables)

    r = client.delete(f"/v1/users/{USER}")
    assert r.status_code == 202, r.text

    last: list[Any] = []

    def finished() -> dict[str, Any] | None:
        job = client.get(f"/v1/users/{USER}/erasure").json()
        last[:] = [job]
        return job if job["status"] in ("done", "failed") else None

    try:
        job = wait_until(finished, timeout=40, what="the erasure job")
    except AssertionError:
        log = (settings.home_dir / "logs" / "stream.log").read_text(errors="replace")
        raise AssertionError(f"{last}\n{_scan(settings.home_dir)}\n{log[-3000:]}") from None
    assert job["status"] == "done", job["stores"]
    assert set(job["stores"]) == set(STORES), job["stores"]
    assert all(v.startswith("done") for v in job["stores"].values()), job

    # Nothing of the canary user in any file: Parquet, _delta_log JSON and checkpoints,
    # Lance, SQLite (+WAL), the event log, recovery snapshots, Dagster's storage, models.
    assert _scan(settings.home_dir) == []
    # Time travel: no version of any Delta table yields them; old Lance versions are gone.
    assert {t: _versions_with_canary(delta, t) for t in tables} == {t: [] for t in tables}
    assert old_lance not in vectors.list_versions("users")
    for v in vectors.list_versions("users"):
        assert USER not in vectors.checkout("users", v).to_arrow().column("user_id").to_pylist()
    # Everyone else is intact.
    assert _rows(delta, "events", OTHER) == 5 and _dead_letters(delta, OTHER) == 1
    assert _rows(delta, "decisions", OTHER) == 1 and _rows(delta, "feedback", OTHER) == 1
    for table in DERIVED_TABLES:
        actors = _actors(delta, table)
        assert OTHER in actors and USER not in actors and f"anon:{ANON}" not in actors, table
    assert vectors.get_user(OTHER) is not None and vectors.get_user(USER) is None
    assert client.get(f"/v1/users/{OTHER}/features").status_code == 200
    assert client.get(f"/v1/users/{USER}/features").status_code == 404

    # A later materialization recomputes from the erased bronze: the user stays gone.
    assert materialize(settings) is True
    assert _scan(settings.home_dir) == []
    for table in DERIVED_TABLES:
        assert OTHER in _actors(delta, table) and USER not in _actors(delta, table), table


def test_an_asset_write_computed_before_the_erasure_is_refused(tmp_path: Path) -> None:
    """The race the fence closes: an asset pinned the table, read bronze with the user,
    and writes after the erasure. Refused (it recomputes); a write pinned later is not."""
    store = DeltaStore(str(tmp_path / "delta"))
    table = "gold/interactions"

    def rows(users: list[str]) -> pa.Table:
        return pa.table({"user_id": users, "weight": [1.0] * len(users)})

    store.write(table, rows([USER, OTHER]), mode="overwrite")
    stale = store.pin(table)  # an asset run starts: pins, then reads bronze (with USER)
    assert erase_derived(store.uri(table), [USER], ["user_id"]) == 1
    with pytest.raises(StaleWriteError):
        store.write(table, rows([USER, OTHER]), mode="overwrite", based_on=stale)
    assert _actors(store, table) == {OTHER}
    # A writer that checked just before the fence holds an older snapshot: its commit
    # fails (metadata changed, or its version's log entry was purged), never lands.
    pinned = DeltaTable(store.uri(table))
    erase_derived(store.uri(table), ["nobody"], ["user_id"])
    with pytest.raises(DeltaError):  # CommitFailedError or "Invalid table version"
        write_deltalake(pinned, rows([USER]), mode="overwrite")
    assert _actors(store, table) == {OTHER}
    fresh = store.pin(table)
    store.write(table, rows([OTHER, "third"]), mode="overwrite", based_on=fresh)
    assert _actors(store, table) == {OTHER, "third"}
    # Old versions: purged from the log, not readable.
    with pytest.raises(DeltaError):
        store.read(table, version=0)
    # A table created by a writer that pinned it before it existed is fenced too.
    assert store.pin("gold/training_set") == -1
    store.write("gold/training_set", rows([USER]), mode="overwrite", based_on=-1)
    erase_derived(store.uri("gold/training_set"), [USER], ["user_id"])
    with pytest.raises(StaleWriteError):
        store.write("gold/training_set", rows([USER]), mode="overwrite", based_on=-1)


def test_cached_decisions_scored_before_the_erasure_are_dropped(settings: Settings) -> None:
    """`cached_decisions` read gold before the erasure and puts after the stream's own
    delete from the online store: it sees the fence and drops the rows it wrote for
    users gold no longer holds, bytes included."""
    store = DeltaStore.from_settings(settings)
    table = "gold/interactions"
    store.write(table, pa.table({"user_id": [USER, OTHER], "weight": [1.0, 1.0]}), mode="overwrite")
    online = OnlineStore.from_settings(settings)
    try:
        base = store.pin(table)
        assert forget_erased(store, online, base, [USER, OTHER]) == 0  # nothing erased yet
        erase_derived(store.uri(table), [USER], ["user_id"])
        actions = [{"item_id": "i00001", "score": 1.0, "action_id": "recommend"}]
        online.put_cached_decisions([CachedDecision(u, actions) for u in (USER, OTHER)])
        assert forget_erased(store, online, base, [USER, OTHER]) == 1
        assert online.get_cached_decision(USER) is None
        assert online.get_cached_decision(OTHER) is not None
        assert _scan(settings.home_dir) == []  # the WAL and free pages too, store still open
    finally:
        online.dispose()


def _topic(broker: TansuBroker, config: dict[str, str]) -> str:
    name = f"erasure-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(broker.client_config())
    topic = NewTopic(name, num_partitions=1, replication_factor=1, config=config)
    admin.create_topics([topic])[name].result(timeout=10)
    return name


def test_kafka_eventlog_status_says_what_the_topic_does(
    kafka_broker: TansuBroker, tmp_path: Path
) -> None:
    """Kafka records cannot be deleted: the job reports the topic's retention, produces
    tombstones on a compacted topic, and fails on one that keeps records forever."""
    keys = [USER, f"anon:{ANON}"]

    def status(config: dict[str, str]) -> tuple[str, str]:
        topic = _topic(kafka_broker, config)
        settings = Settings(  # type: ignore[call-arg]
            home=tmp_path, kafka_bootstrap=kafka_broker.bootstrap, kafka_topic=topic
        )
        sink = KafkaSink(settings)
        try:
            return topic, kafka_erasure(sink, kafka_broker.bootstrap, keys)
        finally:
            sink.close()

    _, default = status({})
    assert default.startswith("retention:") and "default retention" in default
    _, timed = status({"retention.ms": "3600000"})
    assert timed.startswith("retention:") and "retention.ms=3600000" in timed
    topic, compacted = status({"cleanup.policy": "compact"})
    assert compacted.startswith("retention:") and "2 tombstones" in compacted
    records = read_topic(kafka_broker.bootstrap, topic)
    assert sorted((r.key, r.value) for r in records) == sorted((k.encode(), None) for k in keys)
    _, forever = status({"retention.ms": "-1"})
    assert forever.startswith("failed:") and "forever" in forever
    # A job whose only unfinished store waits for a retention is pending, not running.
    assert erasure_status({"online": "done", "eventlog": default}) == "pending"
    assert erasure_status({"online": "done", "eventlog": forever}) == "failed"
