"""Self-tuning retraining (`nextbest.learn.tune`): the time-aware split, EASE from one
eigendecomposition, the search, and the issue's acceptance on the demo shop."""

import numpy as np
import pytest
import scipy.sparse as sp

from nextbest.demo.config import DemoConfig
from nextbest.demo.sessions import iter_ordered
from nextbest.demo.world import world_for
from nextbest.learn.model import train_ease
from nextbest.learn.tune import (
    Events,
    _ease_scores,
    holdout_ndcg,
    matrix,
    ndcg_of_scores,
    split,
    time_split,
    tune,
)
from nextbest.spec.models import Model

DAY = 86_400_000
DEMO_WEIGHTS = np.array([1.0, 3.0, 5.0, 2.0, 0.0])  # view, add_to_cart, purchase, rate, identify


def params_of(**fields: object) -> Model:
    """Model params as a spec writes them (`tune: false`, `half_life: none`)."""
    return Model.model_validate(fields)


def _events(users, items, ts, weights=None, n_items=None) -> Events:
    ids = [str(i) for i in range(n_items or max(items) + 1)]
    w = np.ones(len(users)) if weights is None else weights
    return Events.encode(users, [str(i) for i in items], w, ts, item_ids=ids)


def test_user_split_holds_out_each_users_newest_events() -> None:
    ev = _events(["a"] * 5 + ["b"] * 2 + ["c"], [0, 1, 2, 3, 4, 0, 1, 2], [5, 1, 4, 2, 3, 9, 8, 1])
    val = time_split(ev, fraction=0.4, how="user")
    # a: 5 events -> its 2 newest (ts 5, 4); b: 2 -> the newer (ts 9); c: 1 -> none.
    assert val.tolist() == [True, False, True, False, False, True, False, False]


def test_global_split_is_a_time_cut() -> None:
    ev = _events(["a", "b", "a", "b", "c"], [0, 1, 2, 3, 4], [10, 20, 30, 40, 50])
    assert time_split(ev, fraction=0.4, how="global").tolist() == [False, False, False, True, True]
    with pytest.raises(ValueError, match="split"):
        time_split(ev, how="random")


def test_matrix_decays_and_none_keeps_raw_sums() -> None:
    ev = _events(["a", "a", "b"], [0, 0, 1], [0, 10 * DAY, 10 * DAY], weights=np.array([2.0, 1, 1]))
    raw = matrix(ev, half_life_ms=None).toarray()
    np.testing.assert_allclose(raw, np.log1p([[3.0, 0], [0, 1]]))
    half = matrix(ev, half_life_ms=10 * DAY).toarray()
    np.testing.assert_allclose(half[0, 0], np.log1p(2 * 0.5 + 1))


def test_one_eigendecomposition_gives_ease_at_every_l2() -> None:
    rng = np.random.default_rng(0)
    x = sp.csr_matrix((rng.random((40, 12)) < 0.3).astype(float))
    eig = np.linalg.eigh((x.T @ x).toarray())
    xv = x.toarray() @ eig[1]
    for l2 in (0.5, 10.0, 300.0):
        direct = x.toarray() @ train_ease(x, l2=l2)
        fast = _ease_scores(eig, xv, l2)
        off = ~x.toarray().astype(bool)  # the diagonal only touches seen items (masked)
        np.testing.assert_allclose(fast[off], direct[off], rtol=1e-4, atol=1e-5)


def test_ndcg_of_scores_masks_seen_items() -> None:
    scores = np.array([[3.0, 2.0, 1.0, 0.0]])
    seen = sp.csr_matrix([[1, 0, 0, 0]])
    assert ndcg_of_scores(scores, seen, sp.csr_matrix([[0, 1, 0, 0]])) == pytest.approx(1.0)
    second = ndcg_of_scores(scores, seen, sp.csr_matrix([[0, 0, 1, 0]]))
    assert second == pytest.approx(1 / np.log2(3))


def test_tune_records_every_candidate_and_the_spec_setting() -> None:
    ev = demo_events(DemoConfig.small(days=60, n_events=8000))
    params = params_of(tune={"l2": [100, 1000], "half_life": ["7d", "none"], "kinds": ["ease"]})
    result = tune(ev, params)
    # 7d, none, plus the spec's 30d; 100, 1000 plus the spec's 200 ...
    grid = {(h, l2) for h in ("7d", "30d", None) for l2 in (100.0, 200.0, 1000.0)}
    assert grid <= {(c.half_life, c.l2) for c in result.candidates}
    for hl in ("7d", "30d", None):  # ... and 3000, 9000, ... only while the largest wins
        mine = sorted((c for c in result.candidates if c.half_life == hl), key=lambda c: c.l2 or 0)
        for i in range(3, len(mine)):
            assert mine[i].l2 == 3 * mine[i - 1].l2  # type: ignore[operator]
            assert max(mine[:i], key=lambda c: c.ndcg) is mine[i - 1]
        assert len(mine) <= 3 + 3
    assert {(c.half_life, c.l2) for c in result.candidates} >= {("30d", 200.0), (None, 1000.0)}
    assert result.baseline is not None and result.baseline.half_life == "30d"
    assert result.best.ndcg == max(c.ndcg for c in result.candidates)
    assert result.gain is not None and result.gain >= 0
    assert result.params.half_life == result.best.half_life
    assert result.params.l2 == result.best.l2


def test_ease_is_skipped_beyond_max_dense_items() -> None:
    ev = demo_events(DemoConfig.small(days=30, n_events=4000))
    result = tune(ev, params_of(max_dense_items=10, tune={"half_life": ["7d"], "l2": [100]}))
    assert {c.kind for c in result.candidates} == {"item_knn"}
    assert result.params.kind == "item_knn"


def demo_events(cfg: DemoConfig) -> Events:
    parts = list(iter_ordered(world_for(cfg)))
    c = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    w = DEMO_WEIGHTS[c["type"]]
    keep = (c["user"] >= 0) & (c["item"] >= 0) & (w > 0)
    ids = [str(i) for i in range(cfg.n_items)]
    return Events.encode(c["user"][keep], c["item"][keep].astype(str), w[keep], c["ts"][keep],
                         item_ids=ids)  # fmt: skip


def _train_part(ev: Events, fraction: float) -> Events:
    return ev.select(~time_split(ev, fraction=fraction, how="global"))


# Issue #16, item 1, "done when".
LONG = DemoConfig.small(n_users=1000, n_events=80_000, days=180)
DRIFT = DemoConfig.small(
    n_users=1000, n_events=80_000, days=42, taste_shift_days=14, favourite_intent=0.8
)


def test_long_stable_history_picks_a_long_half_life_and_beats_the_old_default() -> None:
    ev = demo_events(LONG)
    # The tuner sees only the older 80%; the newest 20% (a global time cut) is the test.
    older = _train_part(ev, 0.2)
    result = tune(older, Model())
    assert result.best.half_life in ("180d", None), result.summary()
    tuned, users = holdout_ndcg(ev, result.params, fraction=0.2)
    old_default, _ = holdout_ndcg(ev, params_of(tune=False), fraction=0.2)
    assert users > 300
    assert tuned > old_default + 0.01, (tuned, old_default)


def test_short_drifting_history_keeps_a_short_half_life() -> None:
    ev = demo_events(DRIFT)
    result = tune(_train_part(ev, 0.2), Model())
    assert result.best.half_life in ("7d", "30d"), result.summary()
    tuned, _ = holdout_ndcg(ev, result.params, fraction=0.2)
    no_decay, _ = holdout_ndcg(ev, params_of(half_life="none", tune=False), fraction=0.2)
    assert tuned > no_decay, (tuned, no_decay)


def test_search_runs_on_the_most_used_items_only() -> None:
    ev = demo_events(DemoConfig.small(days=30, n_events=6000))
    tuning = {"half_life": ["30d"], "l2": [200], "kinds": ["ease"], "max_items": 40}
    result = tune(ev, params_of(tune=tuning))
    assert any("40 most used of 300 items" in n for n in result.notes)
    s = split(ev, fraction=0.2, how="global", max_users=10_000, max_items=40)
    assert s.seen.shape == s.targets.shape == (len(s.users), 40)
    counts = np.bincount(ev.items[~time_split(ev, how="global")], minlength=300)
    # the kept items are the 40 with most training events: none outside beats the least kept
    assert int(s.train.weights.size) == int(np.sort(counts)[::-1][:40].sum())
