"""DP mechanisms (privacy/gaussian.py, privacy/ftrl.py) against independent references:
float64 NumPy clip-and-sum, the noise law each mechanism promises (empirical moments over
many coordinates), Theorem 1 of Andrew et al. (2021) checked through dp-accounting's RDP
composition, and the covariance of tree-aggregated prefix noise from a brute-force dyadic
decomposition."""

from __future__ import annotations

import itertools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.privacy.ftrl import dp_ftrl, tree_depth, tree_sensitivity_factor
from fedjax_lite.privacy.gaussian import (AdaptiveClipping, adaptive_noise_split,
                                          dp_gaussian)

NOISE_STREAM = 0x44504E53   # the update-noise stream of the earlier dp_gaussian


# ------------------------------------------------------------------ references (float64)

def np_clip_sum(rows: np.ndarray, weights: np.ndarray, clip: float) -> np.ndarray:
    """Sum over reporting clients of each row clipped to L2 norm ``clip``; a row with a
    non-finite entry counts as zero."""
    total = np.zeros(rows.shape[1], np.float64)
    for row, w in zip(np.asarray(rows, np.float64), weights):
        if w <= 0 or not np.all(np.isfinite(row)):
            continue
        scale = np.max(np.abs(row))
        norm = scale * np.linalg.norm(row / scale) if scale > 0 else 0.0
        total += row * min(1.0, clip / norm) if norm > 0 else row
    return total


def flat_rows(tree) -> np.ndarray:
    return np.concatenate([np.asarray(tree[k], np.float64).reshape(tree[k].shape[0], -1)
                           for k in sorted(tree)], axis=1)


def flat_one(tree) -> np.ndarray:
    return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in sorted(tree)])


def dyadic_nodes(t: int) -> set[tuple[int, int]]:
    """The tree nodes (level, first leaf) whose disjoint union is the leaves 1..t."""
    nodes, start = set(), 0
    for h in reversed(range(t.bit_length())):
        if t >> h & 1:
            nodes.add((h, start))
            start += 2 ** h
    assert start == t
    return nodes


def check_metrics(metrics: dict) -> None:
    for name, v in metrics.items():
        assert v.shape == () and v.dtype == jnp.float32, (name, v.shape, v.dtype)


def run_rounds(agg, inputs, weights, keys):
    """Runs ``agg`` over rounds (leading axis of inputs / keys), jitted once."""
    state = agg.init(jax.tree.map(lambda x: x[0, 0], inputs))

    def step(state, xs):
        deltas, key = xs
        out, state, metrics = agg.apply(deltas, weights, state, key)
        return state, (out, metrics)

    return jax.jit(lambda s: jax.lax.scan(step, s, (inputs, keys)))(state)


# ------------------------------------------------------------------ Gaussian mechanism

def test_gaussian_without_noise_is_clip_sum_over_fixed_denominator():
    rng = np.random.default_rng(0)
    C = 9
    deltas = {"w": rng.normal(size=(C, 3, 4)).astype(np.float32),
              "b": rng.normal(size=(C, 5)).astype(np.float32)}
    deltas["w"][2] *= 30.0                                   # clipped
    deltas["b"][5] *= 1e-3                                   # tiny, kept
    weights = np.array([1, 3, 2, 0, 1, 7, 0, 1, 1], np.float32)   # values ignored
    clip, denom = 2.5, 6.5
    agg = dp_gaussian(clip, 0.0, denom)
    state = agg.init(jax.tree.map(lambda x: x[0], deltas))
    out, state2, metrics = jax.jit(agg.apply)(deltas, weights, state,
                                              jax.random.key(1))
    expected = np_clip_sum(flat_rows(deltas), weights, clip) / denom
    np.testing.assert_allclose(flat_one(out), expected, rtol=2e-6, atol=1e-7)
    assert out["w"].shape == (3, 4) and out["b"].shape == (5,)
    check_metrics(metrics)
    norms = np.linalg.norm(flat_rows(deltas), axis=1)
    reporting = weights > 0
    assert metrics["num_reporting"] == 7 and metrics["no_client_reported"] == 0
    assert metrics["clipped_fraction"] == pytest.approx(
        np.sum(reporting & (norms > clip)) / 7)
    assert metrics["clip_norm"] == pytest.approx(clip) and metrics["noise_std"] == 0
    assert jax.tree.leaves(state2) == []


def test_gaussian_noise_stream_and_std():
    D, z, clip, denom = 20000, 1.3, 0.7, 10.0
    deltas = {"x": jnp.zeros((4, D), jnp.float32)}
    key = jax.random.key(7)
    agg = dp_gaussian(clip, z, denom)
    out, _, metrics = jax.jit(agg.apply)(deltas, jnp.ones(4), agg.init({"x": deltas["x"][0]}),
                                         key)
    expected = (jax.random.normal(jax.random.fold_in(key, NOISE_STREAM), (D,), jnp.float32)
                * (z * clip)) / denom
    np.testing.assert_allclose(out["x"], expected, rtol=1e-6, atol=1e-9)
    assert np.std(np.asarray(out["x"], np.float64)) == pytest.approx(z * clip / denom,
                                                                     rel=0.03)
    assert metrics["noise_std"] == pytest.approx(z * clip / denom, rel=1e-6)


@pytest.mark.parametrize("adaptive", [None, AdaptiveClipping(count_stddev=0.0)])
def test_gaussian_nonfinite_and_huge_rows_stay_bounded(adaptive):
    rng = np.random.default_rng(3)
    D, clip, denom = 6, 1.5, 4.0
    rows = rng.normal(size=(6, D)).astype(np.float32)
    rows[0, 2] = np.nan
    rows[1, 0] = np.inf
    rows[2, 4] = -np.inf
    rows[3] = 1e38                                           # ||row|| overflows float32
    weights = np.ones(6, np.float32)
    agg = dp_gaussian(clip, 0.0, denom, adaptive=adaptive)
    apply = jax.jit(agg.apply)
    state = agg.init({"x": rows[0]})
    out, _, metrics = apply({"x": rows}, weights, state, jax.random.key(0))
    out = np.asarray(out["x"], np.float64)
    assert np.all(np.isfinite(out))
    expected = np_clip_sum(rows, weights, clip) / denom      # NaN/inf rows as zero
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert metrics["nonfinite_clients"] == 3
    # the 1e38 row alone contributes a vector of norm S (clipped, not zeroed)
    alone = np.zeros(6, np.float32)
    alone[3] = 1.0
    out, _, metrics = apply({"x": rows}, alone, state, jax.random.key(0))
    assert np.linalg.norm(np.asarray(out["x"], np.float64) * denom) == pytest.approx(
        clip, rel=1e-5)
    assert metrics["clipped_fraction"] == 1.0 and metrics["nonfinite_clients"] == 0


def test_noise_split_is_theorem_1_of_andrew_et_al():
    """Releasing the update sum (sensitivity 1 in units of S, noise z_delta) and the
    centred count (sensitivity 1/2, noise sigma_b) composes, in RDP (exactly, for
    Gaussians), to one Gaussian mechanism with noise multiplier z."""
    orders = [1.5, 2.0, 4.0, 16.0, 64.0]
    for z, sigma_b in [(1.0, 5.0), (0.8, 0.41), (3.0, 50.0), (1e-3, 1.0)]:
        zd = adaptive_noise_split(z, sigma_b)
        assert zd > z
        assert 1 / z ** 2 == pytest.approx(1 / zd ** 2 + 1 / (2 * sigma_b) ** 2, rel=1e-12)
        pair = dp_accounting.rdp.RdpAccountant(orders)
        pair.compose(dp_accounting.GaussianDpEvent(zd))
        pair.compose(dp_accounting.GaussianDpEvent(2 * sigma_b))   # sensitivity 1/2
        single = dp_accounting.rdp.RdpAccountant(orders)
        single.compose(dp_accounting.GaussianDpEvent(z))
        assert pair.get_epsilon(1e-6) == pytest.approx(single.get_epsilon(1e-6), rel=1e-9)
    # the paper's recommended sigma_b = m / 20 costs little: m = 100, z = 1
    assert adaptive_noise_split(1.0, 5.0) == pytest.approx(1 / math.sqrt(0.99), rel=1e-12)
    assert adaptive_noise_split(0.0, 0.0) == 0.0
    for sigma_b in [0.5, 0.3, 0.0]:                          # sigma_b <= z / 2
        with pytest.raises(ValueError, match="count_stddev.*0.5"):
            adaptive_noise_split(1.0, sigma_b)
    # default count_stddev = expected_clients / 20 = 0.5 = z / 2: rejected at build time
    with pytest.raises(ValueError, match="count_stddev"):
        dp_gaussian(1.0, 1.0, 10.0, adaptive=AdaptiveClipping())
    dp_gaussian(1.0, 1.0, 10.5, adaptive=AdaptiveClipping())


def test_adaptive_one_step_and_noise_levels():
    # one exact step: 10 reporting clients, 3 above S_0 = 1, m = 12 expected
    norms = np.array([0.1, 0.5, 0.9, 0.99, 0.2, 3.0, 1.5, 0.3, 2.0, 0.7, 9.0, 9.0])
    rows = np.zeros((12, 2), np.float32)
    rows[:, 0] = norms
    weights = np.array([1] * 10 + [0, 0], np.float32)
    gamma, eta = 0.6, 0.3
    agg = dp_gaussian(1.0, 0.0, 12.0, adaptive=AdaptiveClipping(gamma, eta, 0.0))
    state = agg.init({"x": rows[0]})
    _, state, metrics = jax.jit(agg.apply)({"x": rows}, weights, state, jax.random.key(0))
    b_noisy = (7 - 10 / 2) / 12 + 0.5                        # centred count, public m
    assert metrics["clipped_fraction"] == pytest.approx(0.3)
    assert metrics["clipped_fraction_noisy"] == pytest.approx(1 - b_noisy, rel=1e-6)
    assert state.clip_norm == pytest.approx(math.exp(-eta * (b_noisy - gamma)), rel=1e-6)
    check_metrics(metrics)

    # noise levels, over many keys: update noise z_delta S / m, count noise sigma_b / m
    C, D, z, sigma_b, clip = 20, 64, 1.1, 2.0, 0.8
    agg = dp_gaussian(clip, z, C, adaptive=AdaptiveClipping(0.5, 0.2, sigma_b))
    state = agg.init({"x": jnp.zeros(D)})
    keys = jax.random.split(jax.random.key(5), 4000)
    out, _, metrics = jax.jit(jax.vmap(
        lambda k: agg.apply({"x": jnp.zeros((C, D))}, jnp.ones(C), state, k)))(keys)
    zd = adaptive_noise_split(z, sigma_b)
    assert np.std(np.asarray(out["x"], np.float64)) == pytest.approx(zd * clip / C,
                                                                     rel=0.02)
    assert np.asarray(metrics["noise_std"])[0] == pytest.approx(zd * clip / C, rel=1e-6)
    noisy = np.asarray(metrics["clipped_fraction_noisy"], np.float64)  # true value 0
    assert abs(np.mean(noisy)) < 4 * sigma_b / C / math.sqrt(len(keys))
    assert np.std(noisy) == pytest.approx(sigma_b / C, rel=0.05)


@pytest.mark.parametrize("gamma", [0.5, 0.9])
@pytest.mark.parametrize("noisy", [False, True])
def test_adaptive_clip_norm_converges_to_the_target_quantile(gamma, noisy):
    """Update norms ~ Uniform(0, 10): the gamma-quantile is 10 gamma."""
    C, D, rounds = 100, 4, 500
    key = jax.random.key(11)
    k_dir, k_norm, k_round = jax.random.split(key, 3)
    direction = jax.random.normal(k_dir, (rounds, C, D))
    direction /= jnp.linalg.norm(direction, axis=-1, keepdims=True)
    norms = 10.0 * jax.random.uniform(k_norm, (rounds, C, 1))
    adaptive = AdaptiveClipping(gamma, 0.2, None if noisy else 0.0)   # None: m / 20 = 5
    agg = dp_gaussian(0.5, 1.0 if noisy else 0.0, C, adaptive=adaptive)
    _, (_, metrics) = run_rounds(agg, {"x": direction * norms}, jnp.ones(C),
                                 jax.random.split(k_round, rounds))
    s = np.asarray(metrics["clip_norm"], np.float64)
    assert s[0] == pytest.approx(0.5)
    settled = math.exp(np.mean(np.log(s[rounds // 2:])))
    assert settled == pytest.approx(10.0 * gamma, rel=0.04)
    assert np.mean(np.asarray(metrics["clipped_fraction"])[rounds // 2:]) == pytest.approx(
        1 - gamma, abs=0.02)


# ------------------------------------------------------------------ DP-FTRL

def zero_rounds(rounds: int, D: int, seed: int):
    agg_inputs = {"x": jnp.zeros((rounds, 2, D), jnp.float32)}
    return agg_inputs, jax.random.split(jax.random.key(seed), rounds)


@pytest.mark.parametrize("rounds,restart_every", [(8, 8), (11, 11), (11, 16)])
def test_ftrl_prefix_noise_covariance_is_shared_tree_nodes(rounds, restart_every):
    D, z, clip, denom = 20000, 1.0, 1.0, 1.0
    inputs, keys = zero_rounds(rounds, D, seed=rounds + restart_every)
    agg = dp_ftrl(clip, z, denom, restart_every=restart_every)
    _, (out, metrics) = run_rounds(agg, inputs, jnp.ones(2), keys)
    prefix = np.cumsum(np.asarray(out["x"], np.float64) * denom, axis=0)   # P_t, [T, D]
    empirical = prefix @ prefix.T / D                        # the noise has mean 0
    expected = np.array([[len(dyadic_nodes(s) & dyadic_nodes(t)) for t in
                          range(1, rounds + 1)] for s in range(1, rounds + 1)], float)
    np.testing.assert_allclose(empirical, (z * clip) ** 2 * expected, atol=0.15)
    np.testing.assert_allclose(metrics["noise_std"],
                               z * clip / denom * np.sqrt(np.diag(expected)), rtol=1e-6)
    np.testing.assert_array_equal(metrics["tree_round"], np.arange(1, rounds + 1))


def test_ftrl_without_noise_sums_to_the_prefix_sums():
    rng = np.random.default_rng(4)
    rounds, C, clip, denom = 7, 6, 1.2, 5.0
    inputs = {"a": rng.normal(size=(rounds, C, 3)).astype(np.float32),
              "b": rng.normal(size=(rounds, C, 2, 2)).astype(np.float32)}
    inputs["a"][2, 1] *= 50.0
    inputs["b"][4, 3, 0, 0] = np.nan
    weights = np.array([1, 0, 2, 1, 1, 0], np.float32)
    agg = dp_ftrl(clip, 0.0, denom, restart_every=rounds)
    _, (out, metrics) = run_rounds(agg, jax.tree.map(jnp.asarray, inputs),
                                   jnp.asarray(weights), jax.random.split(jax.random.key(0),
                                                                           rounds))
    got = np.cumsum(np.stack([flat_one(jax.tree.map(lambda x: x[r], out))
                              for r in range(rounds)]), axis=0)
    leaves = np.stack([np_clip_sum(flat_rows(jax.tree.map(lambda x: x[r], inputs)),
                                   weights, clip) for r in range(rounds)])
    np.testing.assert_allclose(got, np.cumsum(leaves, axis=0) / denom, rtol=1e-5,
                               atol=1e-6)
    check_metrics(jax.tree.map(lambda x: x[0], metrics))
    np.testing.assert_array_equal(metrics["nonfinite_clients"], [0, 0, 0, 0, 1, 0, 0])


def test_ftrl_restart_starts_a_fresh_tree():
    T, D, z = 4, 20000, 1.0
    inputs, keys = zero_rounds(2 * T + 1, D, seed=9)
    agg = dp_ftrl(1.0, z, 1.0, restart_every=T)
    state, (out, metrics) = run_rounds(agg, inputs, jnp.ones(2), keys)
    np.testing.assert_array_equal(metrics["tree_round"], [1, 2, 3, 4, 1, 2, 3, 4, 1])
    assert int(state.round_in_tree) == 1
    deltas = np.asarray(out["x"], np.float64)
    first, second = np.cumsum(deltas[:T], axis=0), np.cumsum(deltas[T:2 * T], axis=0)
    # round T + 1 releases a fresh leaf noise (prefix P_1 of the new tree): variance z^2,
    # uncorrelated with everything released before
    assert np.var(deltas[T]) == pytest.approx(z ** 2, rel=0.04)
    assert np.max(np.abs(first @ deltas[T] / D)) < 0.05
    # the second tree repeats the first one's covariance, independently of it
    np.testing.assert_allclose(second @ second.T / D, first @ first.T / D, atol=0.15)
    assert np.max(np.abs(first @ second.T / D)) < 0.08


def test_tree_depth_matches_dp_accounting():
    orders = [2.0, 8.0, 32.0]
    special = dp_accounting.NeighboringRelation.REPLACE_SPECIAL   # DP-FTRL's "zero-out"
    for steps in list(range(1, 70)) + [127, 128, 129, 1000, 1023, 1024]:
        assert tree_depth(steps) == math.ceil(math.log2(steps + 1))
        tree = dp_accounting.rdp.RdpAccountant(orders, special)
        tree.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(1.3, steps))
        gauss = dp_accounting.rdp.RdpAccountant(orders, special)
        gauss.compose(dp_accounting.GaussianDpEvent(1.3 / tree_sensitivity_factor(1, steps)))
        assert tree.get_epsilon(1e-5) == pytest.approx(gauss.get_epsilon(1e-5), rel=1e-9)


def brute_force_tree_sensitivity(k: int, steps: int) -> float:
    """Worst case over placements of k distinct leaves (each a unit vector, all aligned)
    of sqrt(sum over the complete tree nodes of (number of the client's leaves)^2)."""
    depth = tree_depth(steps)
    nodes = [range(j * 2 ** h, (j + 1) * 2 ** h) for h in range(depth)
             for j in range(steps // 2 ** h)]
    return max(math.sqrt(sum(len(set(node) & set(leaves)) ** 2 for node in nodes))
               for leaves in itertools.combinations(range(steps), k))


def test_tree_sensitivity_factor_bounds_the_worst_case():
    for steps in range(1, 9):
        for k in range(1, min(4, steps) + 1):
            bound, exact = tree_sensitivity_factor(k, steps), brute_force_tree_sensitivity(
                k, steps)
            assert bound >= exact - 1e-12, (k, steps, bound, exact)
            if k == 1:
                assert bound == pytest.approx(math.sqrt(tree_depth(steps)), rel=1e-12)
                assert exact == pytest.approx(bound, rel=1e-12)
    assert tree_sensitivity_factor(2, 8) == pytest.approx(math.sqrt(2 * (1 + 2 + 2 + 2)))
    with pytest.raises(ValueError, match="max_participations"):
        tree_sensitivity_factor(5, 4)
