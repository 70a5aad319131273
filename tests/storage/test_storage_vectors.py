"""VectorStore against a real LanceDB folder: schema, upserts, filtered search, versions,
erasure that leaves no byte of the user id on disk."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from nextbest.settings import Settings
from storage.vectors import AttrType, VectorStore

DIM = 4
ATTRS: dict[str, AttrType] = {
    "category": "string",
    "price": "float",
    "in_stock": "bool",
    "stock": "int",
}


def unit(*values: float) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def store(tmp_path: Path) -> VectorStore:
    s = VectorStore(str(tmp_path / "lance"), dim=DIM, item_attributes=ATTRS)
    s.ensure_tables()
    return s


def shop_items() -> list[dict]:
    return [
        {"item_id": "boot", "vector": unit(1, 0, 0, 0), "category": "shoes", "in_stock": True},
        {
            "item_id": "boot-oos",
            "vector": unit(1, 0.01, 0, 0),
            "category": "shoes",
            "in_stock": False,
        },
        {"item_id": "sneaker", "vector": unit(1, 0.5, 0, 0), "category": "shoes", "in_stock": True},
        {"item_id": "tent", "vector": unit(1, 0.05, 0, 0), "category": "camping", "in_stock": True},
        {"item_id": "stove", "vector": unit(0, 0, 1, 0), "category": "camping", "in_stock": True},
    ]


def user_vector(store: VectorStore, user_id: str) -> np.ndarray:
    vector = store.get_user_vector(user_id)
    assert vector is not None, user_id
    return vector


def files_containing(root: Path, needle: bytes) -> list[str]:
    return [
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and needle in path.read_bytes()
    ]


def test_schema_has_attribute_columns_and_types(store: VectorStore) -> None:
    items = store._table("items").schema
    assert items.field("item_id").type == pa.string()
    assert items.field("vector").type == pa.list_(pa.float32(), DIM)
    assert items.field("category").type == pa.string()
    assert items.field("price").type == pa.float64()
    assert items.field("in_stock").type == pa.bool_()
    assert items.field("stock").type == pa.int64()
    assert items.field("model_version").type == pa.string()
    assert items.field("updated_at").type == pa.timestamp("us", tz="UTC")
    users = store._table("users").schema
    assert users.names == ["user_id", "vector", "event_ts", "updated_at"]
    assert store.count("items") == 0 and store.count("users") == 0


def test_ensure_tables_is_idempotent_and_checks_dim(store: VectorStore) -> None:
    store.upsert_items(shop_items())
    store.ensure_tables()
    assert store.count("items") == 5
    wider = VectorStore(store.uri, dim=DIM + 1, item_attributes=ATTRS)
    with pytest.raises(ValueError, match="on_mismatch"):
        wider.ensure_tables()
    wider.ensure_tables(on_mismatch="recreate")
    assert wider.count("items") == 0
    assert wider._table("items").schema.field("vector").type.list_size == DIM + 1


def test_from_settings_uses_lance_root(settings: Settings) -> None:
    s = VectorStore.from_settings(settings, dim=DIM, item_attributes=ATTRS)
    s.ensure_tables()
    assert Path(settings.lance_root, "items.lance").is_dir()


def test_upsert_inserts_then_updates_without_duplicates(store: VectorStore) -> None:
    assert store.upsert_items(shop_items(), model_version="m1") == 5
    assert store.upsert_items(shop_items(), model_version="m1") == 5
    assert store.count("items") == 5
    moved = {
        "item_id": "stove",
        "vector": unit(0, 1, 0, 0),
        "category": "camping",
        "price": 9.5,
        "stock": 3,
    }
    assert store.upsert_items([moved], model_version="m2") == 1
    assert store.count("items") == 5
    np.testing.assert_allclose(store.get_item_vectors(["stove"])["stove"], unit(0, 1, 0, 0))
    hit = store.search_items(unit(0, 1, 0, 0), k=1)[0]
    assert hit["item_id"] == "stove"
    assert (hit["price"], hit["stock"], hit["model_version"]) == (9.5, 3, "m2")
    assert hit["in_stock"] is None  # full-row update: missing attributes become null


def test_duplicate_keys_within_one_batch_keep_last(store: VectorStore) -> None:
    # New keys duplicated in the batch (would be inserted twice by LanceDB).
    rows = [
        {"user_id": "u1", "vector": unit(1, 0, 0, 0)},
        {"user_id": "u2", "vector": unit(0, 1, 0, 0)},
        {"user_id": "u1", "vector": unit(0, 0, 1, 0)},
    ]
    assert store.upsert_users(rows) == 2
    assert store.count("users") == 2
    np.testing.assert_allclose(user_vector(store, "u1"), unit(0, 0, 1, 0))
    # Existing key duplicated in the batch (LanceDB would reject as ambiguous).
    event_ts = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    table = pa.table(
        {
            "user_id": ["u2", "u2", "u3"],
            "vector": [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [0.0, 1.0, 0.0, 0.0]],
            "event_ts": [event_ts, event_ts, event_ts],
        }
    )
    assert store.upsert_users(table) == 2
    assert store.count("users") == 3
    np.testing.assert_allclose(user_vector(store, "u2"), [0, 0, 0, 2])
    user = store.get_user("u2")
    assert user is not None and user["event_ts"] == event_ts
    assert user["updated_at"] >= event_ts
    assert store.get_user_vector("nobody") is None and store.get_user("nobody") is None


def test_upsert_rejects_bad_rows(store: VectorStore) -> None:
    with pytest.raises(ValueError, match="dimension"):
        store.upsert_users([{"user_id": "u", "vector": [1.0, 2.0]}])
    with pytest.raises(ValueError, match="unknown columns"):
        store.upsert_items([{"item_id": "i", "vector": unit(1, 0, 0, 0), "colour": "red"}])
    with pytest.raises(ValueError, match="null"):
        store.upsert_items([{"item_id": None, "vector": unit(1, 0, 0, 0)}])
    assert store.count("items") == 0 and store.count("users") == 0
    assert store.upsert_users([]) == 0


def test_filtered_search_respects_where_and_exclude(store: VectorStore) -> None:
    store.upsert_items(shop_items(), model_version="m1")
    query = unit(1, 0, 0, 0)
    unfiltered = [r["item_id"] for r in store.search_items(query, k=5)]
    assert unfiltered[:4] == ["boot", "boot-oos", "tent", "sneaker"]
    top = store.search_items(query, k=1)[0]
    assert top["item_id"] == "boot" and top["distance"] == pytest.approx(0.0, abs=1e-6)
    assert top["score"] == pytest.approx(1.0, abs=1e-6)
    assert top["category"] == "shoes" and top["in_stock"] is True

    where = "in_stock = true AND category = 'shoes'"
    filtered = store.search_items(query, k=5, where=where)
    assert [r["item_id"] for r in filtered] == ["boot", "sneaker"]  # prefilter: k not eaten
    excluded = store.search_items(query, k=5, where=where, exclude=["boot"])
    assert [r["item_id"] for r in excluded] == ["sneaker"]
    quoted = store.search_items(query, k=5, exclude=["it's", "boot", "boot-oos"])
    assert [r["item_id"] for r in quoted][:2] == ["tent", "sneaker"]


def test_item_vector_reads(store: VectorStore) -> None:
    items = shop_items()
    store.upsert_items(items)
    got = store.get_item_vectors(["tent", "missing", "boot", "tent"])
    assert set(got) == {"tent", "boot"}
    np.testing.assert_allclose(got["tent"], items[3]["vector"])
    ids, matrix = store.all_item_vectors()
    assert matrix.shape == (5, DIM) and matrix.dtype == np.float32
    by_id = dict(zip(ids, matrix, strict=True))
    for item in items:
        np.testing.assert_allclose(by_id[item["item_id"]], item["vector"])


def test_version_checkout_returns_older_data(store: VectorStore) -> None:
    store.upsert_items(shop_items()[:2], model_version="m1")
    v1 = store.version("items")
    store.upsert_items(shop_items()[2:], model_version="m2")
    store.upsert_items([{"item_id": "boot", "vector": unit(0, 0, 0, 1)}], model_version="m2")
    assert store.version("items") > v1
    assert v1 in store.list_versions("items")

    old = store.checkout("items", v1)
    assert old.count() == 2
    assert set(old.to_arrow().column("item_id").to_pylist()) == {"boot", "boot-oos"}
    np.testing.assert_allclose(old.get_vectors(["boot"])["boot"], unit(1, 0, 0, 0))
    assert old.search(unit(1, 0, 0, 0), k=1)[0]["model_version"] == "m1"
    # The store itself still reads the latest version.
    assert store.count("items") == 5
    np.testing.assert_allclose(store.get_item_vectors(["boot"])["boot"], unit(0, 0, 0, 1))


def test_reader_sees_writes_of_another_handle(store: VectorStore) -> None:
    reader = VectorStore(store.uri, dim=DIM, item_attributes=ATTRS)
    assert reader.get_user_vector("u1") is None
    store.upsert_users([{"user_id": "u1", "vector": unit(1, 0, 0, 0)}])
    np.testing.assert_allclose(user_vector(reader, "u1"), unit(1, 0, 0, 0))


@pytest.mark.parametrize("layout", ["updated_across_fragments", "inside_one_big_fragment"])
def test_delete_user_and_optimize_leave_no_trace(
    store: VectorStore, tmp_path: Path, layout: str
) -> None:
    secret = "erase-me-7f3a9c"
    rng = np.random.default_rng(0)
    others = [{"user_id": f"user-{i:04d}", "vector": rng.random(DIM)} for i in range(200)]
    if layout == "updated_across_fragments":
        store.upsert_users(others)
        for step in range(3):  # several versions and fragments hold the user
            store.upsert_users([{"user_id": secret, "vector": rng.random(DIM)}, others[step]])
    else:
        # One fragment, 1/201 deleted: below LanceDB's 10% compaction threshold, so a
        # plain optimize() would keep the erased row in the data file.
        store.upsert_users([*others[:100], {"user_id": secret, "vector": rng.random(DIM)}])
        store.upsert_users(others[100:])
        store.optimize("users")
    before = store.version("users")
    root = tmp_path / "lance"
    assert files_containing(root, secret.encode())  # positive control: the scan works

    assert store.delete_user(secret) == 1
    assert store.delete_user(secret) == 0
    assert store.get_user_vector(secret) is None
    store.optimize("users", cleanup_older_than=timedelta(0))

    assert files_containing(root, secret.encode()) == []
    assert store.count("users") == 200
    assert store.list_versions("users") == [store.version("users")]
    with pytest.raises(LookupError):
        store.checkout("users", before)
    latest = store.checkout("users", store.version("users"))
    assert secret not in latest.to_arrow().column("user_id").to_pylist()
    np.testing.assert_allclose(user_vector(store, "user-0150"), others[150]["vector"])


def test_optimize_default_keeps_recent_versions(store: VectorStore) -> None:
    store.upsert_items(shop_items()[:2])
    store.upsert_items(shop_items()[2:])
    versions = store.list_versions("items")
    store.optimize("items")
    assert set(versions) <= set(store.list_versions("items"))
    assert store.count("items") == 5


def test_index_items_keeps_search_and_lookups_correct(store: VectorStore) -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(300, DIM)).astype(np.float32)
    store.upsert_items(
        [
            {"item_id": f"i{n}", "vector": v, "category": "even" if n % 2 == 0 else "odd"}
            for n, v in enumerate(vectors)
        ]
    )
    assert store.index_items(vector_min_rows=10**6) == ["item_id"]
    assert store.index_items(vector_min_rows=256) == ["item_id", "vector"]
    hits = store.search_items(vectors[42], k=3, where="category = 'even'")
    assert hits[0]["item_id"] == "i42"
    assert all(h["category"] == "even" for h in hits)
    np.testing.assert_allclose(store.get_item_vectors(["i7"])["i7"], vectors[7])
    store.upsert_items([{"item_id": "i7", "vector": vectors[42], "category": "odd"}])
    store.optimize("items")
    assert store.count("items") == 300
    np.testing.assert_allclose(store.get_item_vectors(["i7"])["i7"], vectors[42])
