"""Ranking metrics on hand-computed examples, and the per-user stratified split."""

import math

import numpy as np
import pytest

from nextbest.learn.metrics import (
    average_precision_at_k,
    coverage,
    hit_rate_at_k,
    ndcg_at_k,
    precision_at_k,
    ranking_metrics,
    recall_at_k,
    split_test_counts,
    stratified_split,
)

REC = ["a", "b", "c", "d", "e"]
REL = {"b", "d", "x"}  # hits at ranks 2 and 4, one relevant item never recommended


def test_precision_and_recall_by_hand() -> None:
    assert precision_at_k(REC, REL, 5) == pytest.approx(2 / 5)
    assert precision_at_k(REC, REL, 2) == pytest.approx(1 / 2)
    assert recall_at_k(REC, REL, 5) == pytest.approx(2 / 3)
    assert recall_at_k(REC, REL, 1) == 0.0
    assert precision_at_k(["b"], REL, 10) == pytest.approx(1 / 10)  # a short list is not padded up


def test_ndcg_by_hand() -> None:
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(REC, REL, 5) == pytest.approx(dcg / ideal)
    assert ndcg_at_k(["b", "d", "x"], REL, 3) == pytest.approx(1.0)
    assert ndcg_at_k(REC, set(), 5) == 0.0


def test_average_precision_by_hand() -> None:
    # precision at the hit ranks: 1/2 and 2/4, divided by min(k, |rel|) = 3
    assert average_precision_at_k(REC, REL, 5) == pytest.approx((1 / 2 + 2 / 4) / 3)
    # k = 2 caps the denominator at 2
    assert average_precision_at_k(REC, REL, 2) == pytest.approx((1 / 2) / 2)
    assert average_precision_at_k(["b", "d"], {"b", "d"}, 10) == pytest.approx(1.0)


def test_hit_rate_and_coverage() -> None:
    assert hit_rate_at_k(REC, {"e"}, 5) == 1.0
    assert hit_rate_at_k(REC, {"e"}, 4) == 0.0
    assert coverage([["a", "b"], ["b", "c"], ["z", "y"]], n_items=10, k=2) == pytest.approx(0.5)
    assert coverage([["a", "b", "c"]], n_items=10, k=1) == pytest.approx(0.1)


def test_ranking_metrics_averages_over_users_with_relevant_items() -> None:
    recs = {"u1": ["a", "b"], "u2": ["c", "d"], "u3": ["a"]}
    relevant = {"u1": {"a"}, "u2": {"x"}, "u3": set(), "u4": {"a"}}
    m = ranking_metrics(recs, relevant, k=2, n_items=8)
    # u1 perfect, u2 and u4 (no list) score 0, u3 has no relevant item and is skipped
    assert m["users"] == 3
    assert m["ndcg@2"] == pytest.approx(1 / 3)
    assert m["precision@2"] == pytest.approx((1 / 2) / 3)
    assert m["recall@2"] == pytest.approx(1 / 3)
    assert m["map@2"] == pytest.approx(1 / 3)
    assert m["coverage@2"] == pytest.approx(4 / 8)


def test_split_counts_keep_a_training_row() -> None:
    sizes = np.array([1, 2, 3, 4, 8, 9])
    assert split_test_counts(sizes, 0.25).tolist() == [0, 1, 1, 1, 2, 2]


def test_stratified_split_is_per_user_random_and_deterministic() -> None:
    users = np.array(["u1"] * 8 + ["u2"] * 4 + ["u3"] * 1 + ["u4"] * 20)
    mask = stratified_split(users, test_fraction=0.25, seed=3)
    per_user = {u: int(mask[users == u].sum()) for u in ("u1", "u2", "u3", "u4")}
    assert per_user == {"u1": 2, "u2": 1, "u3": 0, "u4": 5}
    assert np.array_equal(mask, stratified_split(users, test_fraction=0.25, seed=3))
    other = stratified_split(users, test_fraction=0.25, seed=4)
    assert not np.array_equal(mask, other)  # which rows go to test depends on the seed
    # row order does not change the per-user counts
    perm = np.random.default_rng(0).permutation(len(users))
    shuffled = stratified_split(users[perm], test_fraction=0.25, seed=3)
    assert {u: int(shuffled[users[perm] == u].sum()) for u in per_user} == per_user


def test_stratified_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError):
        stratified_split(np.array(["u"]), test_fraction=1.0)
