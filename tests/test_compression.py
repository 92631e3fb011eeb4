"""Uplink compression: QSGD and top-k against NumPy references, exact byte counts, and
the round with compression off/lossless equal to the plain round."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms import fedavg
from fedjax_lite.core import build_round, compression
from fedjax_lite.core.faults import Faults
from fedjax_lite.models import logistic_regression

C, SHAPES = 6, {"w": (4, 5), "b": (5,)}
D = 25


def _updates(rng):
    return {k: jnp.asarray(rng.normal(size=(C,) + s), jnp.float32) for k, s in SHAPES.items()}


def _flat(t):
    """[C, D] in ravel_pytree order (leaves sorted by key: b, w)."""
    return np.concatenate([np.asarray(t["b"]).reshape(C, -1),
                           np.asarray(t["w"]).reshape(C, -1)], axis=1)


def test_qsgd_is_unbiased_on_the_grid_and_counts_bits():
    rng = np.random.default_rng(0)
    u = _updates(rng)
    x = _flat(u)
    bits = 3
    s = 2 ** (bits - 1) - 1
    comp = jax.jit(compression.qsgd(bits).apply)
    outs = np.stack([_flat(comp(u, k)[0]) for k in jax.random.split(jax.random.key(0), 3000)])
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # every decoded value is ||v|| * sign(v_i) * l / s for an integer level l in [0, s]
    levels = np.abs(outs) / norms[None] * s
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert levels.max() <= s + 1e-3
    assert np.all((outs == 0) | (np.sign(outs) == np.sign(x)[None]))
    # unbiased: the mean over draws approaches v (standard error of a level step / sqrt(n))
    err = np.abs(outs.mean(0) - x)
    assert np.all(err < 5 * (norms / s) / math.sqrt(len(outs)) + 1e-6)
    _, b = comp(u, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(b), 32 + bits * D)


def test_top_k_keeps_the_largest_coordinates_and_counts_bits():
    rng = np.random.default_rng(1)
    u = _updates(rng)
    x = _flat(u)
    out, b = jax.jit(compression.top_k(0.2).apply)(u, jax.random.key(0))
    k = math.ceil(0.2 * D)
    ref = np.zeros_like(x)
    for c in range(C):
        keep = np.argsort(-np.abs(x[c]))[:k]
        ref[c, keep] = x[c, keep]
    np.testing.assert_array_equal(_flat(out), ref)
    np.testing.assert_array_equal(np.asarray(b), k * (32 + math.ceil(math.log2(D))))


def test_lossless_settings_and_byte_metrics_in_a_round():
    """top_k(1.0) sends everything: the round equals the uncompressed one; the metrics
    count the payloads of the clients that reported."""
    rng = np.random.default_rng(2)
    K, N, d = 12, 9, 4
    pop = {"x": jnp.asarray(rng.normal(size=(K, N, d)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 2, size=(K, N)), jnp.int32),
           "n": jnp.asarray(rng.integers(1, N + 1, size=K), jnp.int32)}
    model = logistic_regression(d)

    def run(faults):
        alg = fedavg(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0),
                     local_epochs=2, batch_size=3, faults=faults)
        fn = jax.jit(build_round(alg, num_clients=K, clients_per_round=8))
        state, metrics = fn(alg.init(model.init(jax.random.key(0))), pop, jax.random.key(5))
        return state.params, metrics

    plain, _ = run(Faults())
    full, m = run(Faults(compressor=compression.top_k(1.0)))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(full)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert float(m["upload_bytes_uncompressed"]) == 8 * 32 * (d + 1) / 8
    # with dropout, only reporting clients upload
    _, m = run(Faults(dropout=0.5, compressor=compression.qsgd(4)))
    reporting = float(m["reporting_clients"])
    assert 0 < reporting < 8
    assert float(m["upload_bytes"]) == pytest.approx(reporting * (32 + 4 * (d + 1)) / 8)


@pytest.mark.parametrize("call,match", [(lambda: compression.qsgd(1), "bits must be"),
                                        (lambda: compression.top_k(0.0), "fraction must be")])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
