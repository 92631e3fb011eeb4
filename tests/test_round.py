"""Tests for fedjax_lite.core.round: cohort sampling, client keys, the chunked cohort
map (``map_cohort``, ``local_training_chunk``) and the round plumbing (with a toy
algorithm, so nothing heavy compiles)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.core.round import (Cohort, EngineOptions, FederatedAlgorithm, build_round,
                                    client_keys, client_mesh, local_training_chunk,
                                    make_cohort, map_cohort, round_key)
from fedjax_lite.core.sampling import sample_cohort
from fedjax_lite.core.shuffle import epoch_orders, epoch_orders_lanes

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


def test_full_participation_is_every_row_in_order():
    for seed in range(3):
        idx = sample_cohort(jax.random.key(seed), 5, 5)
        assert idx.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(idx), np.arange(5))
    assert np.asarray(sample_cohort(jax.random.key(0), 5, 4)).dtype == np.int32


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
        x = cohort.population["x"][cohort.index]
        metrics = {"index": cohort.index, "n": cohort.n, "x": x,
                   "population": cohort.population, "key": jax.random.key_data(key)}
        return {"params": state["params"] + jnp.sum(x), "calls": state["calls"] + 1}, metrics

    return FederatedAlgorithm(init, apply)


def _toy_population():
    rng = np.random.default_rng(0)
    return {"x": jnp.asarray(rng.normal(size=(POP, 3, 2)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, 2, size=(POP, 3)), jnp.int32),
            "n": jnp.asarray(rng.integers(1, 4, size=POP), jnp.int32)}


@pytest.mark.parametrize("bad", [POP + 1, 0, -1])
def test_build_round_rejects_bad_cohort_size(bad):
    with pytest.raises(ValueError, match=rf"clients_per_round={bad} must be in "
                                         rf"\[1, {POP}\] \(the population size\)"):
        build_round(_toy_algorithm(), num_clients=POP, clients_per_round=bad)


def test_round_samples_a_cohort_of_the_population_and_passes_the_training_key():
    population = _toy_population()
    alg = _toy_algorithm()
    round_fn = jax.jit(build_round(alg, num_clients=POP, clients_per_round=COHORT))
    state = alg.init(jnp.zeros(()))
    key = jax.random.key(11)
    new_state, m = round_fn(state, population, key)

    sample_key, train_key = jax.random.split(key)
    index = np.asarray(sample_cohort(sample_key, POP, COHORT))
    np.testing.assert_array_equal(m["index"], index)
    assert np.asarray(m["index"]).dtype == np.int32
    assert np.asarray(m["n"]).dtype == np.int32
    assert len(set(index.tolist())) == COHORT
    # the cohort carries the WHOLE population (not gathered up front) and its rows' n
    for name in ("x", "y", "n"):
        np.testing.assert_array_equal(m["population"][name], np.asarray(population[name]))
    np.testing.assert_array_equal(m["n"], np.asarray(population["n"])[index])
    np.testing.assert_array_equal(m["x"], np.asarray(population["x"])[index])
    np.testing.assert_array_equal(m["key"], np.asarray(jax.random.key_data(train_key)))
    np.testing.assert_allclose(new_state["params"], np.asarray(population["x"])[index].sum(),
                               rtol=1e-6)
    assert int(new_state["calls"]) == 1

    # deterministic for a key, different cohorts for other round keys
    _, m2 = round_fn(state, population, key)
    np.testing.assert_array_equal(m2["index"], m["index"])
    root = jax.random.key(0)
    cohorts = {tuple(np.asarray(round_fn(state, population, round_key(root, r))[1]["index"])
                     .tolist()) for r in range(6)}
    assert len(cohorts) > 1


def test_full_participation_round_sees_every_row_in_order():
    population = _toy_population()
    alg = _toy_algorithm()
    round_fn = jax.jit(build_round(alg, num_clients=POP, clients_per_round=POP))
    _, m = round_fn(alg.init(jnp.zeros(())), population, jax.random.key(5))
    np.testing.assert_array_equal(m["index"], np.arange(POP))
    np.testing.assert_array_equal(m["n"], np.asarray(population["n"]))


def test_cohort_is_a_pytree_and_make_cohort_takes_the_rows_counts():
    population = _toy_population()
    c = make_cohort(population, jnp.asarray([7, 2, 5]))
    assert c.index.dtype == jnp.int32 and c.n.dtype == jnp.int32
    assert c.population is population
    np.testing.assert_array_equal(c.n, np.asarray(population["n"])[[7, 2, 5]])
    assert len(jax.tree.leaves(c)) == 6  # x, y, n of the population; index; n; mask
    doubled = jax.tree.map(lambda a: a * 2, c._replace(mask=c.mask.astype(jnp.int32)))
    assert isinstance(doubled, Cohort)
    np.testing.assert_array_equal(doubled.index, [14, 4, 10])
    total = jax.jit(lambda c: jnp.sum(c.population["x"][c.index]) + jnp.sum(c.n))(c)
    np.testing.assert_allclose(
        total, np.asarray(population["x"])[[7, 2, 5]].sum()
        + np.asarray(population["n"])[[7, 2, 5]].sum(), rtol=1e-6)


# --------------------------------------------------------------------------- cohort map

P, NMAP = 12, 4  # population rows, padded examples per client
COHORTS = {"c7": np.array([9, 2, 11, 0, 5, 7, 3], np.int32),   # unordered, not a range
           "c5": np.array([4, 10, 1, 8, 6], np.int32)}


@pytest.fixture(scope="module")
def map_population():
    rng = np.random.default_rng(3)
    return {"x": jnp.asarray(rng.normal(size=(P, NMAP, 2)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, 5, size=(P, NMAP)), jnp.int32),
            "n": jnp.asarray(rng.integers(1, NMAP + 1, size=P), jnp.int32)}


def _per_client(C):
    rng = np.random.default_rng(C)
    return ({"a": jnp.asarray(rng.normal(size=(C, 3)), jnp.float32)},
            jnp.asarray(rng.integers(1, 5, size=C), jnp.int32))


def _one_client(x_k, y_k, n_k, a_k, b_k):
    """Uses every input, so a row / slice misalignment shows."""
    mask = jnp.arange(x_k.shape[0]) < n_k
    return {"s": jnp.sum(jnp.where(mask[:, None], x_k, 0.0)) * b_k + jnp.sum(y_k * mask),
            "n": n_k, "v": a_k["a"] * 2.0 + n_k, "x0": x_k[0], "y": y_k}


@functools.partial(jax.jit, static_argnums=(0,))
def _map_vmapped(options, population, index, per_client):
    return map_cohort(jax.vmap(_one_client), make_cohort(population, index), per_client,
                      options)


def _check_equals_vmap_over_gathered_rows(population, index, options):
    per_client = _per_client(len(index))
    got = _map_vmapped(options, population, jnp.asarray(index), per_client)
    want = jax.vmap(_one_client)(population["x"][index], population["y"][index],
                                 population["n"][index], *per_client)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert got[name].shape[0] == len(index)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("cohort", sorted(COHORTS))
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 10])
def test_map_cohort_equals_vmap_over_the_gathered_rows(map_population, cohort, chunk_size):
    _check_equals_vmap_over_gathered_rows(map_population, COHORTS[cohort],
                                          EngineOptions(chunk_size=chunk_size))


def test_map_cohort_on_a_client_mesh_equals_vmap(map_population):
    """The shard_map path (a mesh of this host's devices; 7 clients do not divide)."""
    _check_equals_vmap_over_gathered_rows(
        map_population, COHORTS["c7"], EngineOptions(chunk_size=3, mesh=client_mesh()))


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 4, 6, 7, 10])
def test_chunk_fn_is_traced_once_for_chunks_of_at_most_the_requested_size(
        map_population, chunk_size):
    C = 7
    seen = []

    def chunk_fn(x, y, n, b):
        seen.append((x.shape, y.shape, n.shape, b.shape))
        return b + n

    cohort = make_cohort(map_population, jnp.asarray(COHORTS["c7"]))
    out = jax.eval_shape(lambda: map_cohort(chunk_fn, cohort, (jnp.zeros(C, jnp.int32),),
                                            EngineOptions(chunk_size=chunk_size)))
    assert out.shape == (C,)
    assert len(seen) == 1, seen
    k = seen[0][0][0]
    assert seen[0] == ((k, NMAP, 2), (k, NMAP), (k,), (k,))
    if chunk_size is None or chunk_size >= C:
        assert k == C
    else:  # as many chunks as asked for, each no larger, the padding spread out
        assert k <= chunk_size and -(-C // k) == -(-C // chunk_size)


@pytest.mark.parametrize("options", [EngineOptions(chunk_size=3, group_by_size=False),
                                     EngineOptions(chunk_size=4, group_by_size=False),
                                     EngineOptions(chunk_size=3, mesh=client_mesh(),
                                                   group_by_size=False)],
                         ids=["chunk3", "chunk4", "mesh-chunk3"])
def test_padding_clients_have_no_examples_and_never_reach_the_outputs(map_population,
                                                                      options):
    """7 clients in chunks of 3 (or 4): the last chunk is padded with copies of a real
    row whose n is 0; the chunk sees them (its n sum shows they have none), the outputs
    do not."""
    index = COHORTS["c7"]
    C = len(index)

    def chunk_fn(x, y, n, pos):
        K = n.shape[0]
        return {"pos": pos, "n": n, "chunk_n": jnp.broadcast_to(jnp.sum(n), (K,)),
                "chunk_size": jnp.full((K,), K), "x0": x[:, 0, 0]}

    run = jax.jit(lambda pop, idx, pos: map_cohort(chunk_fn, make_cohort(pop, idx), (pos,),
                                                   options))
    out = run(map_population, jnp.asarray(index), jnp.arange(C, dtype=jnp.int32))
    n = np.asarray(map_population["n"])[index]
    assert all(v.shape[0] == C for v in jax.tree.leaves(out))
    np.testing.assert_array_equal(out["pos"], np.arange(C))      # cohort order, no pads
    np.testing.assert_array_equal(out["n"], n)
    np.testing.assert_array_equal(out["x0"], np.asarray(map_population["x"])[index, 0, 0])
    K = int(out["chunk_size"][0])
    assert C % K != 0  # the case under test: a padded last chunk
    for start in range(0, C, K):
        # the sum over the chunk counts only the real clients' examples
        np.testing.assert_array_equal(out["chunk_n"][start:start + K],
                                      n[start:start + K].sum())


N_ORD, E_ORD = 6, 2


@pytest.fixture(scope="module")
def orders_population():
    """13 rows padded to 6 examples, n from 1 to 6."""
    n = np.array([3, 5, 2, 2, 6, 4, 1, 6, 3, 5, 1, 2, 4], np.int32)
    x = np.arange(13 * N_ORD, dtype=np.float32).reshape(13, N_ORD, 1)
    return {"x": jnp.asarray(x), "y": jnp.zeros((13, N_ORD), jnp.int32), "n": jnp.asarray(n)}


@jax.jit
def _reference_orders(keys, n):
    return (epoch_orders(keys, n, N_ORD, E_ORD), epoch_orders_lanes(keys, n, N_ORD, E_ORD))


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3])
def test_local_training_chunk_orders_do_not_depend_on_chunking(orders_population,
                                                               chunk_size):
    index = jnp.asarray([7, 3, 9, 0, 12], jnp.int32)
    keys = client_keys(jax.random.key(9), index)
    extra = jnp.arange(5, dtype=jnp.float32) * 1.5

    def train_fn(x, y, n, orders, extra_k):
        K = x.shape[0]
        assert orders.shape == (E_ORD, N_ORD, K) and orders.dtype == jnp.int32
        return jnp.transpose(orders, (2, 0, 1)), n, extra_k, x[:, 0, 0]

    chunk_fn = local_training_chunk(train_fn, local_epochs=E_ORD)

    run = jax.jit(lambda population, index, keys, extra: map_cohort(
        chunk_fn, make_cohort(population, index), (keys, extra),
        EngineOptions(chunk_size)))
    orders, n_out, extra_out, x0 = run(orders_population, index, keys, extra)
    n = np.asarray(orders_population["n"])[np.asarray(index)]
    expected, lanes = _reference_orders(keys, jnp.asarray(n))
    np.testing.assert_array_equal(orders, expected)
    np.testing.assert_array_equal(orders, np.transpose(np.asarray(lanes), (2, 0, 1)))
    for k in range(5):  # a real order: each epoch permutes the client's n examples
        for e in range(E_ORD):
            assert sorted(np.asarray(orders[k, e, :n[k]]).tolist()) == list(range(n[k]))
    np.testing.assert_array_equal(n_out, n)
    np.testing.assert_array_equal(extra_out, extra)
    np.testing.assert_array_equal(x0, np.asarray(orders_population["x"])[index, 0, 0])


@pytest.mark.parametrize("mesh", [None, "mesh"])
def test_group_by_size_puts_similar_clients_in_a_chunk_and_keeps_cohort_order(
        map_population, mesh):
    """With ``group_by_size`` the chunks hold the cohort sorted by example count (largest
    first; with a mesh, dealt round-robin over the devices), and the outputs still come
    back in cohort order."""
    index = COHORTS["c7"]
    C = len(index)
    options = EngineOptions(chunk_size=2, mesh=client_mesh() if mesh else None)

    def chunk_fn(x, y, n, pos):
        K = n.shape[0]
        return {"pos": pos, "n": n, "chunk_min": jnp.broadcast_to(jnp.min(n), (K,)),
                "chunk_max": jnp.broadcast_to(jnp.max(n), (K,))}

    run = jax.jit(lambda pop, idx, pos: map_cohort(chunk_fn, make_cohort(pop, idx), (pos,),
                                                   options))
    out = run(map_population, jnp.asarray(index), jnp.arange(C, dtype=jnp.int32))
    n = np.asarray(map_population["n"])[index]
    assert len(set(n.tolist())) > 2  # the cohort has clients of several sizes
    np.testing.assert_array_equal(out["pos"], np.arange(C))
    np.testing.assert_array_equal(out["n"], n)
    # Expected chunks: sort by size (stable, largest first; padding clients, n = 0, sort
    # last), cut into chunks of K, chunk c on shard c % shards.
    shards = 1 if options.mesh is None else options.mesh.devices.size
    per_shard = -(-C // shards)
    chunks = -(-per_shard // 2)
    K = -(-per_shard // chunks)
    padded = np.concatenate([n, np.full(shards * chunks * K - C, -1)])
    order = np.argsort(-padded, kind="stable")
    chunk_n = np.concatenate([n, np.zeros(len(padded) - C, n.dtype)])  # pads: n = 0
    for c in range(shards * chunks):
        members = order[c * K:(c + 1) * K]
        for i in members[members < C]:
            assert out["chunk_min"][i] == chunk_n[members].min()
            assert out["chunk_max"][i] == chunk_n[members].max()
