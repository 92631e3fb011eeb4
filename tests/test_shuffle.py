"""Tests for fedjax_lite.core.shuffle: per-(client, epoch) example orders."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.core.shuffle import epoch_orders, fmix32

GOLDEN = 0x9E3779B9
MASK32 = 0xFFFFFFFF


def fmix32_reference(h: np.ndarray) -> np.ndarray:
    """murmur3 fmix32 (Appleby), in uint64 arithmetic with explicit 32-bit wrap-around."""
    h = np.asarray(h, dtype=np.uint64) & MASK32
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & MASK32
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & MASK32
    h ^= h >> np.uint64(16)
    return h.astype(np.uint32)


def fmix32_scalar(h: int) -> int:
    """The same, on Python ints (a second, independent reference)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    h ^= h >> 16
    return h


@functools.partial(jax.jit, static_argnums=(2, 3))
def orders_jit(keys, n, N, E):
    return epoch_orders(keys, n, N, E)


def make_keys(seed: int, k: int):
    return jax.random.split(jax.random.key(seed), k)


# --------------------------------------------------------------------------- fmix32


def test_fmix32_matches_numpy_reference():
    rng = np.random.default_rng(0)
    h = np.concatenate([
        np.array([0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, GOLDEN],
                 dtype=np.uint32),
        rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32),
    ])
    got = np.asarray(jax.jit(fmix32)(jnp.asarray(h, jnp.uint32)))
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, fmix32_reference(h))
    for v in h[:16]:
        assert int(got[list(h).index(v)]) == fmix32_scalar(int(v))


def test_fmix32_known_values():
    # fmix32(0) = 0 (fixed point); fmix32(1) = 0x514E28B7 (well-known murmur3 vector)
    assert fmix32_scalar(0) == 0
    assert fmix32_scalar(1) == 0x514E28B7
    got = np.asarray(fmix32(jnp.asarray([0, 1], jnp.uint32)))
    np.testing.assert_array_equal(got, [0, 0x514E28B7])


def test_fmix32_is_a_bijection_on_a_sample():
    # distinct inputs -> distinct outputs (it is a bijection on 32-bit words)
    h = np.arange(1 << 16, dtype=np.uint32) * np.uint32(GOLDEN)
    out = np.asarray(fmix32(jnp.asarray(h)))
    assert len(np.unique(out)) == len(h)


# --------------------------------------------------------------------------- orders


# Shapes are shared between tests (K=6, E=3, N in {1, 5, 8, 15}) so each compiles once.
K6, E3 = 6, 3


@pytest.mark.parametrize("N", [1, 5, 8, 15])
def test_orders_are_permutations_of_the_real_examples(N):
    n = np.array([N, 1, max(N - 1, 0), (N + 1) // 2, 0, N], np.int32)
    out = np.asarray(orders_jit(make_keys(N, K6), jnp.asarray(n), N, E3))
    assert out.shape == (K6, E3, N) and out.dtype == np.int32
    assert out.min() >= 0 and out.max() < N  # padding indices are in range too
    for k in range(K6):
        for e in range(E3):
            np.testing.assert_array_equal(np.sort(out[k, e, :n[k]]), np.arange(n[k]))


@jax.jit
def _epoch_seeds(keys):
    return jax.vmap(lambda k: jax.random.bits(k, (E3,), jnp.uint32))(keys)


def assert_documented_hash_sort(out, keys, n):
    """out[k, e, :n[k]] == argsort of fmix32(seed_e ^ i * golden) over i < n[k] (NumPy)."""
    seeds = np.asarray(_epoch_seeds(keys))
    for k in range(K6):
        for e in range(E3):
            i = np.arange(n[k], dtype=np.uint64)
            h = fmix32_reference((np.uint64(seeds[k, e]) ^ ((i * GOLDEN) & MASK32)))
            np.testing.assert_array_equal(out[k, e, :n[k]], np.argsort(h, kind="stable"))


def test_orders_follow_the_documented_hash_sort():
    """First n positions = argsort of fmix32(seed_e ^ i * golden) over i < n, where
    seed_e is the e-th uint32 of ``jax.random.bits(client_key, (E,))`` -- checks the
    bitonic network against NumPy's sort."""
    N = 15
    keys = make_keys(11, K6)
    n = np.array([15, 1, 6, 9, 12, 14], np.int32)
    out = np.asarray(orders_jit(keys, jnp.asarray(n), N, E3))
    assert_documented_hash_sort(out, keys, n)


@pytest.mark.parametrize("largest", [50, 64, 100, 300])
def test_orders_of_small_clients_in_a_long_padding_sort_only_what_they_need(largest):
    """N = 300 (a 512-long network): a chunk whose largest client has ``largest``
    examples sorts a shorter network (64, 64, 128, 512); every branch must give the
    documented hash-sort order."""
    N = 300
    keys = make_keys(21, K6)
    n = np.array([largest, 1, 7, largest // 2, 0, largest - 1], np.int32)
    out = np.asarray(orders_jit(keys, jnp.asarray(n), N, E3))
    assert_documented_hash_sort(out, keys, n)
    assert out.min() >= 0 and out.max() < N


def test_orders_are_padding_invariant():
    keys = make_keys(3, K6)
    n = np.array([5, 1, 3, 5, 2, 4], np.int32)
    small = np.asarray(orders_jit(keys, jnp.asarray(n), 5, E3))
    for N in (8, 15):  # same and larger power-of-two network
        big = np.asarray(orders_jit(keys, jnp.asarray(n), N, E3))
        for k in range(K6):
            np.testing.assert_array_equal(small[k, :, :n[k]], big[k, :, :n[k]])


def test_orders_of_a_client_do_not_depend_on_the_other_clients():
    N = 15
    keys = make_keys(5, K6)
    n = jnp.asarray([15, 3, 4, 8, 1, 6], jnp.int32)
    together = np.asarray(orders_jit(keys, n, N, E3))
    perm = np.array([3, 0, 5, 1, 4, 2])
    shuffled = np.asarray(orders_jit(keys[perm], n[perm], N, E3))
    np.testing.assert_array_equal(shuffled, together[perm])


def test_orders_are_deterministic_and_differ_across_epochs_and_keys():
    N = 8
    n = jnp.full((K6,), N, jnp.int32)
    a = np.asarray(orders_jit(make_keys(0, K6), n, N, E3))
    b = np.asarray(orders_jit(make_keys(0, K6), n, N, E3))
    c = np.asarray(orders_jit(make_keys(1, K6), n, N, E3))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # 8! = 40320 orders; with these fixed seeds no two coincide (a repeat would hint at
    # epochs or clients sharing a seed)
    rows = {tuple(r) for r in a.reshape(-1, N)}
    assert len(rows) == K6 * E3


def test_orders_are_uniform_permutations():
    """Over many (key, epoch) pairs, every one of the 4! orders of n=4 examples appears
    about equally often, and for n=5 (padded to 8) each example lands in each position
    about equally often. Fixed seeds: deterministic; thresholds are chi-square critical
    values at p ~ 1e-9."""
    K, E, N = 1500, 4, 8
    n = np.array([4] * 750 + [5] * 750, np.int32)
    out = np.asarray(orders_jit(make_keys(2024, K), jnp.asarray(n), N, E))

    four = out[:750, :, :4].reshape(-1, 4)
    perms = {p: i for i, p in enumerate(itertools.permutations(range(4)))}
    counts = np.zeros(len(perms))
    for row in four:
        counts[perms[tuple(row)]] += 1
    expected = len(four) / len(perms)
    chi2_perm = np.sum((counts - expected) ** 2 / expected)
    assert chi2_perm < 89.1, (chi2_perm, counts)  # df 23

    five = out[750:, :, :5].reshape(-1, 5)
    table = np.stack([np.bincount(five[:, pos], minlength=5) for pos in range(5)], axis=1)
    expected5 = len(five) / 5
    chi2_pos = np.sum((table - expected5) ** 2 / expected5)
    assert chi2_pos < 75.7, (chi2_pos, table)  # df 16

    # no bias toward (or away from) the identity order for adjacent items
    frac = np.mean(five[:, 0] < five[:, 1])
    assert abs(frac - 0.5) < 0.05, frac


@pytest.mark.parametrize("M", [2, 8, 64, 128, 512])
def test_rolled_bitonic_network_sorts_like_the_unrolled_one(M):
    from fedjax_lite.core.shuffle import _bitonic_sort_axis0, _bitonic_sort_rolled
    rng = np.random.default_rng(M)
    a = rng.integers(0, 2**32, (M, 3, 4), dtype=np.uint64).astype(np.uint32)
    a[: M // 4] = a[0]                                     # ties too
    want = np.sort(a, axis=0)
    assert (np.asarray(jax.jit(_bitonic_sort_rolled)(jnp.asarray(a))) == want).all()
    assert (np.asarray(_bitonic_sort_axis0(jnp.asarray(a))) == want).all()
