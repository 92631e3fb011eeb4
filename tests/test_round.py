"""Tests for fedjax_lite.core.round: cohort sampling, client keys, the chunked client
map and the round plumbing (with a toy algorithm, so nothing heavy compiles)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.core.round import (Cohort, FederatedAlgorithm, build_round, client_keys,
                                    map_chunks, map_clients, map_local_training, round_key,
                                    sample_cohort)
from fedjax_lite.core.shuffle import epoch_orders

POP, COHORT = 10, 4


@functools.partial(jax.jit, static_argnums=(1, 2))
def sample_many(keys, num_clients, clients_per_round):
    return jax.vmap(lambda k: sample_cohort(k, num_clients, clients_per_round))(keys)


@pytest.fixture(scope="module")
def many_cohorts():
    keys = jax.random.split(jax.random.key(7), 3000)
    return np.asarray(sample_many(keys, POP, COHORT))


# --------------------------------------------------------------------------- sampling


def test_sampled_cohorts_are_distinct_members_of_the_right_size(many_cohorts):
    assert many_cohorts.shape == (3000, COHORT)
    assert many_cohorts.min() >= 0 and many_cohorts.max() < POP
    for row in many_cohorts:
        assert len(set(row.tolist())) == COHORT


def test_sampling_is_deterministic_for_a_key_and_varies_across_keys(many_cohorts):
    keys = jax.random.split(jax.random.key(7), 3000)
    again = np.asarray(sample_many(keys, POP, COHORT))
    np.testing.assert_array_equal(again, many_cohorts)
    single = np.asarray(sample_cohort(keys[5], POP, COHORT))
    np.testing.assert_array_equal(single, many_cohorts[5])
    distinct_sets = {tuple(sorted(r.tolist())) for r in many_cohorts[:200]}
    assert len(distinct_sets) > 100  # C(10, 4) = 210 possible cohorts


def test_sampling_covers_the_population_uniformly(many_cohorts):
    """Each client is in a cohort with probability C/K; each pair with probability
    C(C-1)/(K(K-1)). Fixed keys, so deterministic; generous bounds."""
    rounds = len(many_cohorts)
    counts = np.bincount(many_cohorts.ravel(), minlength=POP)
    expected = rounds * COHORT / POP
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 60.7, (chi2, counts)  # chi-square, df 9, p ~ 1e-9 (conservative here)
    assert np.all(np.abs(counts - expected) < 0.1 * expected), counts

    pairs = np.zeros((POP, POP))
    for row in many_cohorts:
        pairs[np.ix_(row, row)] += 1
    off = pairs[~np.eye(POP, dtype=bool)]
    expected_pair = rounds * COHORT * (COHORT - 1) / (POP * (POP - 1))
    assert np.all(np.abs(off - expected_pair) < 0.25 * expected_pair), off


def test_full_participation_is_a_permutation():
    idx = np.asarray(sample_cohort(jax.random.key(0), 5, 5))
    np.testing.assert_array_equal(np.sort(idx), np.arange(5))


def test_round_key_is_deterministic_and_distinct_per_round():
    root = jax.random.key(0)
    data = [tuple(np.asarray(jax.random.key_data(round_key(root, r))).tolist())
            for r in range(5)]
    assert len(set(data)) == 5
    again = np.asarray(jax.random.key_data(round_key(root, 3)))
    np.testing.assert_array_equal(again, data[3])
    np.testing.assert_array_equal(
        again, np.asarray(jax.random.key_data(jax.random.fold_in(root, 3))))


def test_client_keys_come_from_the_population_row():
    key = jax.random.key(3)
    index = jnp.asarray([4, 0, 9], jnp.int32)
    got = np.asarray(jax.random.key_data(client_keys(key, index)))
    for pos, i in enumerate([4, 0, 9]):
        np.testing.assert_array_equal(
            got[pos], np.asarray(jax.random.key_data(jax.random.fold_in(key, i))))
    reversed_ = np.asarray(jax.random.key_data(client_keys(key, index[::-1])))
    np.testing.assert_array_equal(reversed_, got[::-1])


# --------------------------------------------------------------------------- build_round


def _toy_algorithm():
    """apply returns what it was given, so the round's plumbing can be checked."""

    def init(params):
        return {"params": params, "calls": jnp.zeros((), jnp.int32)}

    def apply(state, cohort, key):
        metrics = {"index": cohort.index, "x": cohort.x, "y": cohort.y, "n": cohort.n,
                   "key": jax.random.key_data(key)}
        return {"params": state["params"] + jnp.sum(cohort.x),
                "calls": state["calls"] + 1}, metrics

    return FederatedAlgorithm(init, apply)


@pytest.mark.parametrize("bad", [POP + 1, 0, -1])
def test_build_round_rejects_bad_cohort_size(bad):
    with pytest.raises(ValueError, match=rf"clients_per_round={bad} must be in "
                                         rf"\[1, {POP}\] \(the population size\)"):
        build_round(_toy_algorithm(), num_clients=POP, clients_per_round=bad)


def test_round_samples_gathers_and_passes_the_training_key():
    rng = np.random.default_rng(0)
    population = {"x": jnp.asarray(rng.normal(size=(POP, 3, 2)), jnp.float32),
                  "y": jnp.asarray(rng.integers(0, 2, size=(POP, 3)), jnp.int32),
                  "n": jnp.asarray(rng.integers(1, 4, size=POP), jnp.int32)}
    alg = _toy_algorithm()
    round_fn = jax.jit(build_round(alg, num_clients=POP, clients_per_round=COHORT))
    state = alg.init(jnp.zeros(()))
    key = jax.random.key(11)
    new_state, m = round_fn(state, population, key)

    sample_key, train_key = jax.random.split(key)
    index = np.asarray(sample_cohort(sample_key, POP, COHORT))
    np.testing.assert_array_equal(m["index"], index)
    assert np.asarray(m["index"]).dtype == np.int32
    assert len(set(index.tolist())) == COHORT
    np.testing.assert_array_equal(m["x"], np.asarray(population["x"])[index])
    np.testing.assert_array_equal(m["y"], np.asarray(population["y"])[index])
    np.testing.assert_array_equal(m["n"], np.asarray(population["n"])[index])
    np.testing.assert_array_equal(m["key"], np.asarray(jax.random.key_data(train_key)))
    assert int(new_state["calls"]) == 1

    # deterministic for a key, different cohorts for other round keys
    _, m2 = round_fn(state, population, key)
    np.testing.assert_array_equal(m2["index"], m["index"])
    root = jax.random.key(0)
    cohorts = {tuple(np.asarray(round_fn(state, population, round_key(root, r))[1]["index"])
                     .tolist()) for r in range(6)}
    assert len(cohorts) > 1


# --------------------------------------------------------------------------- client map


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 10])
def test_map_clients_equals_vmap(chunk_size):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
    b = jnp.asarray(rng.integers(0, 5, size=7), jnp.int32)

    def one(a_k, b_k):
        return {"s": jnp.sum(a_k) * b_k, "v": a_k * 2.0}

    got = map_clients(one, (a, b), chunk_size)
    np.testing.assert_allclose(got["s"], np.asarray(a).sum(1) * np.asarray(b), rtol=1e-6)
    np.testing.assert_allclose(got["v"], 2 * np.asarray(a), rtol=1e-6)
    assert got["s"].shape == (7,) and got["v"].shape == (7, 3)


def test_map_chunks_sees_chunks_of_the_requested_size():
    seen = []

    def chunk_fn(a):
        seen.append(a.shape[0])
        return a + 1

    out = map_chunks(chunk_fn, (jnp.arange(7),), 3)
    np.testing.assert_array_equal(out, np.arange(7) + 1)
    assert seen == [3]  # traced once, for a chunk of 3 (the last one padded)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_map_local_training_orders_do_not_depend_on_chunking(chunk_size):
    N, E = 6, 2
    n = jnp.asarray([6, 2, 5, 1, 4], jnp.int32)
    x = jnp.zeros((5, N, 1), jnp.float32)
    y = jnp.zeros((5, N), jnp.int32)
    keys = client_keys(jax.random.key(9), jnp.asarray([7, 3, 9, 0, 12]))
    extra = jnp.arange(5, dtype=jnp.float32)

    def fn(x_k, y_k, n_k, orders_k, extra_k):
        return orders_k, n_k, extra_k

    @jax.jit
    def both(x, y, n, keys, extra):
        return (map_local_training(fn, x, y, n, keys, (extra,), local_epochs=E,
                                   chunk_size=chunk_size),
                epoch_orders(keys, n, N, E))

    (orders, n_out, extra_out), expected = both(x, y, n, keys, extra)
    np.testing.assert_array_equal(orders, expected)
    np.testing.assert_array_equal(n_out, n)
    np.testing.assert_array_equal(extra_out, extra)


def test_cohort_is_a_pytree():
    c = Cohort(jnp.zeros((2, 3, 1)), jnp.zeros((2, 3), jnp.int32), jnp.ones(2, jnp.int32),
               jnp.arange(2))
    assert len(jax.tree.leaves(c)) == 4
