"""Robust aggregators against independent float64 NumPy references.

The references never call fedjax_lite: they work on the flattened [C, D] matrix of
reporting clients (leaf order "a", "b", as ``ravel_pytree`` of a dict) with explicit
loops. Each aggregator is jitted once at module level and reused with identical shapes,
so every test compiles each aggregator at most once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.core import aggregators as agg

C = 7
SHAPES = {"a": (3,), "b": (2, 2)}
D = sum(int(np.prod(s)) for s in SHAPES.values())

TRIM = 0.3           # floor(0.3 * m): 2 per side at m = 7, 1 at m = 4..6
NUM_BYZ = 2          # krum needs C > 2f + 2 = 6 for its guarantee
NUM_SEL = 3

AGGREGATORS = {
    "mean": agg.mean(),
    "median": agg.median(),
    "trimmed_mean": agg.trimmed_mean(TRIM),
    "krum": agg.krum(NUM_BYZ),
    "multi_krum": agg.multi_krum(NUM_BYZ, NUM_SEL),
    "geometric_median": agg.geometric_median(max_iters=200, eps=0.0, nu=1e-8),
    "norm_bound": agg.norm_bound(2.0),
}
_JITTED = {name: jax.jit(a.apply) for name, a in AGGREGATORS.items()}
_KEY = jax.random.PRNGKey(0)


def run(name, deltas, weights):
    a = AGGREGATORS[name]
    state = a.init(jax.tree.map(lambda d: d[0], deltas))
    delta, _, metrics = _JITTED[name](deltas, jnp.asarray(weights, jnp.float32), state, _KEY)
    return delta, {k: np.asarray(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------
# data helpers and NumPy references
# ----------------------------------------------------------------------------------------

def make_deltas(rng, weights, scale=1.0, garbage=np.nan):
    """Random [C, D] float64 matrix; rows of non-reporting clients hold ``garbage`` (they
    must never influence the result). Returns (pytree of float32 [C, ...], float64 [C, D])."""
    x = rng.normal(size=(C, D)) * scale
    x[np.asarray(weights) == 0] = garbage
    return unflatten(x), x


def unflatten(x):
    out, i = {}, 0
    for name, shape in SHAPES.items():
        n = int(np.prod(shape))
        out[name] = jnp.asarray(x[:, i:i + n].reshape((len(x),) + shape), jnp.float32)
        i += n
    return out


def flatten_one(tree):
    return np.concatenate([np.asarray(tree[name], np.float64).reshape(-1) for name in SHAPES])


def np_median(x, w):
    return np.median(x[w > 0], axis=0)


def np_trimmed_mean(x, w, trim):
    r = np.sort(x[w > 0], axis=0)
    m = len(r)
    b = int(np.floor(trim * m))
    return r[b:m - b].mean(axis=0)


def np_krum_scores(x, w, f):
    idx = [i for i in range(len(x)) if w[i] > 0]
    m = len(idx)
    n = max(m - f - 2, 1)
    scores = {}
    for i in idx:
        d = []
        for j in idx:
            if j != i:
                d.append(sum((x[i, k] - x[j, k]) ** 2 for k in range(x.shape[1])))
        scores[i] = sum(sorted(d)[:n])
    return scores


def np_krum(x, w, f):
    scores = np_krum_scores(x, w, f)
    best = min(scores, key=lambda i: (scores[i], i))
    return x[best], best


def np_multi_krum(x, w, f, k):
    scores = np_krum_scores(x, w, f)
    chosen = sorted(scores, key=lambda i: (scores[i], i))[:k]
    return x[chosen].mean(axis=0), len(chosen)


def np_weiszfeld(x, w, nu, iters=5000):
    pts, a = x[w > 0], w[w > 0] / w[w > 0].sum()
    z = a @ pts
    for _ in range(iters):
        beta = a / np.maximum(nu, np.linalg.norm(pts - z, axis=1))
        z = beta @ pts / beta.sum()
    return z, float(a @ np.linalg.norm(pts - z, axis=1))


def np_norm_bound(x, w, max_norm):
    rep = w > 0
    pts, ww = x[rep], w[rep]
    norms = np.linalg.norm(pts, axis=1)
    clipped = pts * np.minimum(1.0, max_norm / norms)[:, None]
    return ww @ clipped / ww.sum(), float(np.mean(norms > max_norm))


WEIGHT_CASES = [
    np.array([3, 1, 4, 1, 5, 9, 2], np.float64),      # all report, m = 7 (odd)
    np.array([3, 0, 4, 1, 0, 9, 2], np.float64),      # 2 dropouts, m = 5
    np.array([1, 1, 0, 1, 1, 1, 1], np.float64),      # m = 6 (even)
    np.array([0, 2, 0, 1, 0, 1, 5], np.float64),      # m = 4 (even)
]


# ----------------------------------------------------------------------------------------
# correctness against NumPy
# ----------------------------------------------------------------------------------------

def test_median_matches_numpy():
    rng = np.random.default_rng(0)
    for trial in range(3):
        for w in WEIGHT_CASES:
            tree, x = make_deltas(rng, w)
            out, metrics = run("median", tree, w)
            np.testing.assert_allclose(flatten_one(out), np_median(x, w), rtol=1e-5, atol=1e-6)
            assert out["a"].shape == (3,) and out["b"].shape == (2, 2)
            assert metrics["num_reporting"] == (w > 0).sum()


def test_trimmed_mean_matches_numpy():
    rng = np.random.default_rng(1)
    for trial in range(3):
        for w in WEIGHT_CASES:
            tree, x = make_deltas(rng, w)
            out, metrics = run("trimmed_mean", tree, w)
            np.testing.assert_allclose(flatten_one(out), np_trimmed_mean(x, w, TRIM),
                                       rtol=1e-5, atol=1e-6)
            assert metrics["trimmed_per_side"] == np.floor(TRIM * (w > 0).sum())


def test_trimmed_mean_zero_trim_is_unweighted_mean_and_exact_floor():
    # trim = 0 is the plain unweighted mean of reporting clients; trim * m exactly integral
    # (0.2 * 5 = 1) must trim 1 per side, like NumPy's float64 floor.
    rng = np.random.default_rng(2)
    w = WEIGHT_CASES[1]                                    # m = 5
    tree, x = make_deltas(rng, w)
    both = jax.jit(lambda d, ww: (agg.trimmed_mean(0.0).apply(d, ww, (), _KEY)[0],
                                  agg.trimmed_mean(0.2).apply(d, ww, (), _KEY)[0]))
    out0, out2 = both(tree, jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(flatten_one(out0), x[w > 0].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flatten_one(out2), np_trimmed_mean(x, w, 0.2), rtol=1e-5,
                               atol=1e-6)


def test_krum_matches_brute_force():
    rng = np.random.default_rng(3)
    for trial in range(3):
        for w in WEIGHT_CASES:
            tree, x = make_deltas(rng, w)
            out, metrics = run("krum", tree, w)
            ref, best = np_krum(x, w, NUM_BYZ)
            assert int(metrics["krum_selected"]) == best
            np.testing.assert_allclose(flatten_one(out), ref, rtol=1e-6)


def test_multi_krum_matches_brute_force():
    rng = np.random.default_rng(4)
    for trial in range(3):
        for w in WEIGHT_CASES:
            tree, x = make_deltas(rng, w)
            out, metrics = run("multi_krum", tree, w)
            ref, count = np_multi_krum(x, w, NUM_BYZ, NUM_SEL)
            assert metrics["multi_krum_num_selected"] == count
            np.testing.assert_allclose(flatten_one(out), ref, rtol=1e-5, atol=1e-6)


def test_krum_handles_few_reporting_clients_inside_jit():
    # m - f - 2 < 1 at run time (m = 2, 1): clamp to one neighbour / none, no NaN.
    rng = np.random.default_rng(5)
    for w in (np.array([0, 0, 1, 0, 3, 0, 0.]), np.array([0, 0, 0, 0, 2, 0, 0.])):
        tree, x = make_deltas(rng, w)
        out, metrics = run("krum", tree, w)
        ref, best = np_krum(x, w, NUM_BYZ)
        assert int(metrics["krum_selected"]) == best
        np.testing.assert_allclose(flatten_one(out), ref, rtol=1e-6)
        out, metrics = run("multi_krum", tree, w)
        np.testing.assert_allclose(flatten_one(out), x[w > 0].mean(axis=0), rtol=1e-5)
        assert metrics["multi_krum_num_selected"] == (w > 0).sum()


def test_geometric_median_converges_to_numpy_weiszfeld():
    rng = np.random.default_rng(6)
    for w in WEIGHT_CASES[:2]:
        tree, x = make_deltas(rng, w)
        out, metrics = run("geometric_median", tree, w)
        ref, obj = np_weiszfeld(x, w, nu=1e-8)
        np.testing.assert_allclose(flatten_one(out), ref, atol=2e-4)
        np.testing.assert_allclose(metrics["geomed_objective"], obj, rtol=1e-4)
        assert metrics["geomed_iterations"] == 200          # eps = 0: no early stop


def test_geometric_median_is_robust_to_one_huge_outlier():
    rng = np.random.default_rng(7)
    w = np.ones(C)
    x = rng.normal(size=(C, D))
    honest, _ = run("geometric_median", unflatten(x), w)
    x_bad = x.copy()
    x_bad[3] = 1e4
    robust, _ = run("geometric_median", unflatten(x_bad), w)
    moved = np.linalg.norm(flatten_one(robust) - flatten_one(honest))
    mean_moved = np.linalg.norm(x_bad.mean(0) - x.mean(0))
    assert mean_moved > 1e3
    assert moved < 2.0
    # The early-stopping tolerance path: few iterations, still close to the solution.
    quick = agg.geometric_median(max_iters=50, eps=1e-4, nu=1e-6)
    out, _, metrics = jax.jit(quick.apply)(unflatten(x), jnp.ones(C), (), _KEY)
    assert int(metrics["geomed_iterations"]) < 50
    ref, _ = np_weiszfeld(x, w, nu=1e-6)
    np.testing.assert_allclose(flatten_one(out), ref, atol=0.05)


def test_norm_bound_matches_numpy():
    rng = np.random.default_rng(8)
    for w in WEIGHT_CASES:
        tree, x = make_deltas(rng, w, scale=0.8)
        out, metrics = run("norm_bound", tree, w)
        ref, frac = np_norm_bound(x, w, 2.0)
        np.testing.assert_allclose(flatten_one(out), ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["clipped_fraction"], frac, rtol=1e-6)
        assert 0 < frac < 1                               # both branches exercised


# ----------------------------------------------------------------------------------------
# jit, empty cohorts, validation
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_jits_and_returns_zeros_when_nobody_reported(name):
    rng = np.random.default_rng(9)
    w = np.zeros(C)
    tree, _ = make_deltas(rng, np.ones(C))                # real values, but nobody reported
    out, metrics = run(name, tree, w)
    for leaf in jax.tree.leaves(out):
        assert np.all(np.asarray(leaf) == 0)
    if name != "mean":
        assert metrics["num_reporting"] == 0 and metrics["no_client_reported"] == 1
        assert all(np.isfinite(v) for v in metrics.values())


def test_validation_errors_name_the_parameter():
    for bad in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="trim"):
            agg.trimmed_mean(bad)
    with pytest.raises(ValueError, match="num_byzantine"):
        agg.krum(-1)
    with pytest.raises(ValueError, match="num_byzantine"):
        agg.multi_krum(-1, 2)
    with pytest.raises(ValueError, match="num_selected"):
        agg.multi_krum(1, 0)
    with pytest.raises(ValueError, match="max_iters"):
        agg.geometric_median(max_iters=0)
    with pytest.raises(ValueError, match="nu"):
        agg.geometric_median(nu=0.0)
    with pytest.raises(ValueError, match="max_norm"):
        agg.norm_bound(0.0)
    # Static C known at trace time: krum needs C > f + 2.
    tree = unflatten(np.zeros((4, D)))
    with pytest.raises(ValueError, match=r"(?s)(?=.*num_byzantine)(?=.*C=4)"):
        jax.eval_shape(lambda d: agg.krum(2).apply(d, jnp.ones(4), (), _KEY), tree)
    with pytest.raises(ValueError, match="num_selected"):
        jax.eval_shape(lambda d: agg.multi_krum(0, 5).apply(d, jnp.ones(4), (), _KEY), tree)


# ----------------------------------------------------------------------------------------
# property: fewer than the tolerated number of attackers cannot leave the honest range
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,max_attackers", [
    ("median", 3),                         # < m / 2 = 3.5
    ("trimmed_mean", 2),                   # <= floor(0.3 * 7)
    ("krum", NUM_BYZ),                     # C = 7 > 2f + 2
])
def test_output_stays_in_honest_range_under_attack(name, max_attackers):
    rng = np.random.default_rng(10)
    w = np.ones(C)
    for trial in range(20):
        x = rng.normal(size=(C, D))
        num_bad = int(rng.integers(0, max_attackers + 1))
        bad = rng.choice(C, size=num_bad, replace=False)
        honest = np.setdiff1d(np.arange(C), bad)
        x[bad] = rng.choice([-1e6, 1e6], size=(num_bad, D)) * rng.uniform(1, 2, (num_bad, D))
        out, _ = run(name, unflatten(x), w)
        y = flatten_one(out)
        lo, hi = x[honest].min(axis=0), x[honest].max(axis=0)
        assert np.all(y >= lo - 1e-5) and np.all(y <= hi + 1e-5), (trial, bad)
        if name == "krum":
            assert np.any(np.all(np.abs(x[honest] - y) < 1e-5, axis=1))
