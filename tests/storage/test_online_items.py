"""`storage.online.items`: merged item attribute rows and a change number a poller
can follow without missing a change, on SQLite and PostgreSQL."""

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from storage.online.engine import create_online_engine
from storage.online.items import ItemAttributeStore
from storage.online.store import OnlineStore


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def items(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ItemAttributeStore]:
    if request.param == "sqlite":
        store = OnlineStore(create_online_engine(f"sqlite:///{tmp_path / 'online.db'}"))
        s = ItemAttributeStore(store)
        s.ensure_tables()
        yield s
        store.dispose()
        return
    base = create_online_engine(request.getfixturevalue("pg_url"))
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with base.begin() as conn:
        conn.execute(sa.text(f'create schema "{schema}"'))
    s = ItemAttributeStore(OnlineStore(base.execution_options(schema_translate_map={None: schema})))
    s.ensure_tables()
    try:
        yield s
    finally:
        with base.begin() as conn:
            conn.execute(sa.text(f'drop schema "{schema}" cascade'))
        base.dispose()


def test_updates_merge_and_number_changes(items: ItemAttributeStore) -> None:
    first = items.upsert({"a": {"price": 1.0, "in_stock": True}}, update_id="u1")
    second = items.upsert({"a": {"price": 2.0}, "b": {"in_stock": False}}, update_id="u2")
    assert second == first + 1
    assert items.get_many(["a", "b", "c"]) == {
        "a": {"price": 2.0, "in_stock": True},
        "b": {"in_stock": False},
    }
    assert items.changes_since(second).items == {}
    since = items.changes_since(first)
    assert since.seq == second and set(since.items) == {"a", "b"}
    assert items.changes_since(0).items["a"] == {"price": 2.0, "in_stock": True}


def test_a_poller_misses_no_change_under_concurrent_writers(items: ItemAttributeStore) -> None:
    """Writers in threads, a reader following `seq`: every write is seen, once the
    writers are done, by a reader that only ever asked for changes after its last."""
    seen: dict[str, int] = {}
    done = threading.Event()
    last = 0

    def poll() -> None:
        nonlocal last
        changes = items.changes_since(last)
        for item, attrs in changes.items.items():
            seen[item] = int(attrs["n"])
        last = changes.seq

    def write(w: int) -> None:
        for n in range(15):
            items.upsert({f"w{w}-{n}": {"n": n}}, update_id=f"{w}-{n}")

    writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in writers:
        t.start()

    def follow() -> None:
        while not done.is_set():
            poll()

    reader = threading.Thread(target=follow)
    reader.start()
    for t in writers:
        t.join()
    done.set()
    reader.join()
    poll()
    assert seen == {f"w{w}-{n}": n for w in range(4) for n in range(15)}
    assert last == 60
