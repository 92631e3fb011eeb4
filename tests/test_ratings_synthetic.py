"""Tests for fedjax_lite.data.ratings_synthetic: ml-100k's shape and its calibration.

The calibration test fits independent float64 NumPy baselines (a global mean, biases-only
ALS, biased-MF ALS) on a random 80/20 split of the default (ml-100k-shaped) data and checks
where they land: the numbers are printed (run with -s) and stated in the module docstring.
"""

from __future__ import annotations

import itertools
import resource
import time

import numpy as np
import pytest

from fedjax_lite.data.ratings import find_duplicate
from fedjax_lite.data.ratings_split import split_ratings
from fedjax_lite.data.ratings_synthetic import (ML100K_PROPORTIONS, _pick_items,
                                                generate_ratings, synthetic_ratings)


def _rmse(pred, target) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - target) ** 2)))


def _group_sum(values: np.ndarray, group: np.ndarray, num_groups: int) -> np.ndarray:
    """Sums ``values[r, ...]`` per ``group[r]`` (sort + reduceat, float64)."""
    order = np.argsort(group, kind="stable")
    g = group[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    out = np.zeros((num_groups,) + values.shape[1:])
    out[g[starts]] = np.add.reduceat(values[order], starts, axis=0)
    return out


def _als(rows, items, r, num_users, num_items, k, reg, iters):
    """Biased MF r ~ mu + b_u + b_i + p_u . q_i by alternating ridge regressions (k = 0:
    biases only). Returns a predictor clipped to [1, 5]."""
    rng = np.random.default_rng(0)
    mu = r.mean()
    p = np.c_[rng.normal(0, 0.1, (num_users, k)), np.zeros(num_users)]  # [p_u, b_u]
    q = np.c_[rng.normal(0, 0.1, (num_items, k)), np.zeros(num_items)]  # [q_i, b_i]
    eye = reg * np.eye(k + 1)

    def solve(fixed, target, group, n):
        z = np.c_[fixed[:, :k], np.ones(len(fixed))]
        gram = _group_sum(z[:, :, None] * z[:, None, :], group, n) + eye
        return np.linalg.solve(gram, _group_sum(z * target[:, None], group, n)[..., None])[
            ..., 0]

    for _ in range(iters):
        p = solve(q[items], r - mu - q[items, k], rows, num_users)
        q = solve(p[rows], r - mu - p[rows, k], items, num_items)
    return lambda u, i: np.clip(mu + p[u, k] + q[i, k] + (p[u, :k] * q[i, :k]).sum(1), 1, 5)


@pytest.fixture(scope="module")
def ml100k_like():
    flat, model = generate_ratings(seed=0)
    return flat, model, split_ratings(flat, "random", test_fraction=0.2, seed=0)


def test_shape_like_ml100k(ml100k_like):
    flat, _, split = ml100k_like
    assert flat.num_ratings == 100_000 and flat.scale == (1.0, 5.0)
    assert find_duplicate(flat.user, flat.item) is None
    per_user = np.bincount(flat.user)
    assert len(per_user) == 943 and per_user.min() >= 20  # like ml-100k: >= 20 each
    assert 50 <= np.median(per_user) <= 90 and 600 <= per_user.max() <= 742  # 65, 737
    per_item = np.sort(np.bincount(flat.item, minlength=1682))[::-1]
    assert per_item[0] < 943 and np.median(per_item) < 0.7 * per_item.mean()  # long tail
    assert per_item[:168].sum() > 0.35 * flat.num_ratings  # top 10% of items
    assert (per_item == 1).sum() > 30  # ml-100k: 141 items rated once
    hist = np.bincount(flat.rating.astype(int), minlength=6)[1:] / flat.num_ratings
    np.testing.assert_allclose(hist, ML100K_PROPORTIONS, atol=2e-3)
    assert np.all(flat.rating == np.round(flat.rating))
    assert abs(flat.rating.mean() - 3.530) < 0.01 and abs(flat.rating.std() - 1.126) < 0.01
    assert 874_724_710 <= flat.timestamp.min() and flat.timestamp.max() <= 893_286_638
    assert split.train.num_users == 943 and split.num_items <= 1682
    print(f"\nsynthetic ml-100k: mean {flat.rating.mean():.3f} std {flat.rating.std():.3f} "
          f"hist {np.round(hist, 4).tolist()}; ratings/user median {np.median(per_user)} "
          f"max {per_user.max()}; ratings/item median {np.median(per_item)} "
          f"max {per_item[0]}, rated once {(per_item == 1).sum()}")


def test_calibration_mean_oracle_and_mf(ml100k_like):
    _, model, split = ml100k_like
    rows, items, r = split.train.flat()
    te_rows, te_items, te_r = split.test.flat()
    te_r = te_r.astype(np.float64)
    mean_rmse = _rmse(np.full(len(te_r), r.mean()), te_r)
    oracle = model.expected_rating(split.train.user_ids[te_rows], split.item_ids[te_items])
    oracle_rmse = _rmse(oracle, te_r)
    u, i = split.train.num_users, split.num_items
    bias_rmse = _rmse(_als(rows, items, r, u, i, 0, 5.0, 6)(te_rows, te_items), te_r)
    mf_rmse = _rmse(_als(rows, items, r, u, i, 10, 15.0, 12)(te_rows, te_items), te_r)
    print(f"\nRMSE on the 20% test split: global mean {mean_rmse:.4f}, biases only "
          f"{bias_rmse:.4f}, biased MF (ALS, k=10) {mf_rmse:.4f}, oracle E[r|s] "
          f"{oracle_rmse:.4f}")
    assert 1.10 <= mean_rmse <= 1.15  # ml-100k u1: 1.154
    assert 0.92 <= bias_rmse <= 0.97  # ml-100k (Surprise BaselineOnly, 5-fold): 0.944
    assert mf_rmse < min(0.945, bias_rmse - 0.005)  # ml-100k u1 biased SVD: 0.941-0.949
    assert oracle_rmse < min(0.86, mf_rmse - 0.05, mean_rmse - 0.25)


def test_model_generated_the_ratings(ml100k_like):
    flat, model, _ = ml100k_like
    expected = model.expected_rating(flat.user, flat.item)
    assert abs(np.mean(flat.rating - expected)) < 0.01
    edges = np.quantile(expected, np.linspace(0, 1, 11))
    bins = np.clip(np.searchsorted(edges, expected, side="right") - 1, 0, 9)
    for b in range(10):  # calibrated within every decile of the oracle's prediction
        sel = bins == b
        assert abs(np.mean(flat.rating[sel] - expected[sel])) < 0.03
    probs = model.level_probabilities(flat.user[:50], flat.item[:50])
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-12)
    assert (np.diff(model.thresholds) > 0).all()


def test_expected_rating_matches_sampling():
    _, model = generate_ratings(50, 40, 1500, seed=3)
    rng = np.random.default_rng(0)
    users, items = np.array([0, 7, 19]), np.array([3, 11, 29])
    noise = rng.normal(0.0, model.noise_std, (200_000, 1))
    draws = model.levels[np.searchsorted(model.thresholds, model.score(users, items) + noise)]
    np.testing.assert_allclose(draws.mean(0), model.expected_rating(users, items), atol=0.01)


def _successive_inclusion(w: np.ndarray, n: int) -> np.ndarray:
    """Exact inclusion probabilities of successive weighted sampling without replacement,
    by enumerating every ordered draw."""
    out = np.zeros(len(w))
    for seq in itertools.permutations(range(len(w)), n):
        prob, left = 1.0, w.sum()
        for i in seq:
            prob *= w[i] / left
            left -= w[i]
        out[list(seq)] += prob
    return out


@pytest.mark.parametrize("n_draw", [2, 5])  # 2: the weighted-stream path; 5: exponential keys
def test_pick_items_is_successive_sampling(n_draw):
    w = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    users = 20_000
    u, items = _pick_items(np.random.default_rng(1), np.full(users, n_draw), w)
    assert len(u) == users * n_draw
    assert find_duplicate(u, items) is None
    freq = np.bincount(items, minlength=len(w)) / users
    exact = _successive_inclusion(w, n_draw)
    np.testing.assert_allclose(freq, exact, atol=4 * np.sqrt(0.25 / users))


def test_synthetic_ratings_splits_and_is_seeded():
    a = synthetic_ratings(200, 300, 8_000, seed=4, split="leave_one_out")
    b = synthetic_ratings(200, 300, 8_000, seed=4, split="leave_one_out")
    c = synthetic_ratings(200, 300, 8_000, seed=5, split="leave_one_out")
    np.testing.assert_array_equal(a.train.item, b.train.item)
    np.testing.assert_array_equal(a.test.rating, b.test.rating)
    assert not np.array_equal(a.train.rating, c.train.rating)
    assert a.test.n.sum() + a.unseen_test_items == 200
    assert a.train.timestamp is None
    held = synthetic_ratings(200, 300, 8_000, heldout_users=0.1, timestamps=True)
    assert held.heldout is not None and held.train.timestamp is not None
    assert held.train.num_users + held.heldout.num_users <= 200


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_ratings=100), "num_ratings=100 must lie in \\[18860, "),
    (dict(num_users=10, num_items=30, num_ratings=10_000), "must lie in \\[200, 300\\]"),
    (dict(proportions=(0.5, 0.6)), "proportions"),
    (dict(rank=0), "rank >= 1"),
])
def test_generator_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_ratings(**kwargs)


def test_scale_many_users_timing():
    """20 000 users x 5 000 items x 100 ratings per user (the generator and the split
    are vectorized: no loop over users); timing printed, not asserted."""
    t0 = time.perf_counter()
    flat, _ = generate_ratings(20_000, 5_000, 2_000_000, rank=32)
    t1 = time.perf_counter()
    split = split_ratings(flat, "random", seed=0, check_duplicates=False,
                          keep_timestamps=False)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"\n20k users x 5k items, {flat.num_ratings:,} ratings: generate {t1 - t0:.1f} s, "
          f"split + pad {t2 - t1:.1f} s; train {split.train.item.shape}, test "
          f"{split.test.item.shape}; process peak RSS {peak:.2f} GiB")
    assert split.train.num_users == 20_000
    assert split.train.num_ratings + split.test.num_ratings + split.unseen_test_items == \
        2_000_000
