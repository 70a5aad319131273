"""The default recommender on small synthetic data with a known structure."""

from pathlib import Path

import numpy as np
import pytest

from nextbest.learn.model import ItemModel, fit, interaction_matrix, train_ease, train_item_knn
from nextbest.spec.models import Model as ModelParams


def two_taste_data(n_users: int = 200, seed: int = 0):
    """Items 0-9 are bought together, items 10-19 together: a model must learn that."""
    rng = np.random.default_rng(seed)
    users, items, weights = [], [], []
    for u in range(n_users):
        block = 0 if u % 2 == 0 else 10
        for j in rng.choice(10, size=5, replace=False):
            users.append(f"u{u}")
            items.append(f"i{block + j}")
            weights.append(1.0)
    item_ids = [f"i{j}" for j in range(21)]  # i20 never seen: cold start
    return users, items, weights, item_ids


@pytest.mark.parametrize("kind", ["ease", "item_knn"])
def test_model_learns_co_occurrence(kind: str) -> None:
    users, items, weights, item_ids = two_taste_data()
    x, _ = interaction_matrix(users, items, weights, item_ids=item_ids)
    params = ModelParams(kind=kind, l2=10.0, dim=4, neighbours=5)  # type: ignore[arg-type]
    groups = ["a"] * 10 + ["b"] * 10 + ["b"]
    model = fit(x, item_ids=item_ids, groups=groups, params=params, version="v1")
    recs = model.recommend({"i0": 1.0, "i1": 1.0}, k=5)
    assert len(recs) == 5
    assert all(int(i[1:]) < 10 for i, _ in recs), recs
    assert {"i0", "i1"}.isdisjoint(i for i, _ in recs)
    recs_b = model.recommend({"i12": 1.0}, k=3)
    assert all(10 <= int(i[1:]) < 20 for i, _ in recs_b), recs_b
    # the cold-start item borrows its group's vector
    v = model.vectors
    assert np.linalg.norm(v[20]) > 0
    assert float(v[20] @ v[15]) > float(v[20] @ v[5])


def test_ease_diagonal_is_zero() -> None:
    users, items, weights, item_ids = two_taste_data(50)
    x, _ = interaction_matrix(users, items, weights, item_ids=item_ids)
    b = train_ease(x, l2=5.0)
    assert np.allclose(np.diag(b), 0.0)
    knn = train_item_knn(x, neighbours=3)
    assert knn.diagonal().max() == 0.0
    assert max(np.diff(knn.tocsc().indptr)) <= 3


def test_time_decay_weights_recent_more() -> None:
    x, order = interaction_matrix(
        ["u", "u"],
        ["a", "b"],
        [1.0, 1.0],
        item_ids=["a", "b"],
        ts_ms=[0, 1000],
        now_ms=1000,
        half_life_ms=1000.0,
    )
    assert order == ["u"]
    assert x[0, 1] > x[0, 0] > 0


@pytest.mark.parametrize("kind", ["ease", "item_knn"])
def test_save_load_round_trip(tmp_path: Path, kind: str) -> None:
    users, items, weights, item_ids = two_taste_data(40)
    x, _ = interaction_matrix(users, items, weights, item_ids=item_ids)
    params = ModelParams(kind=kind, dim=4)  # type: ignore[arg-type]
    model = fit(x, item_ids=item_ids, groups=[None] * 21, params=params, version="v7")
    loaded = ItemModel.load(model.save(tmp_path / "m.npz"))
    assert loaded.version == "v7" and loaded.item_ids == item_ids
    history = {"i3": 2.0, "i4": 1.0}
    np.testing.assert_allclose(loaded.score(history), model.score(history), rtol=1e-6)
    assert loaded.popular(k=3) == model.popular(k=3)
