"""Uplink compression: QSGD, top-k and random-rotation quantization against NumPy
references, exact byte counts, and the round with compression off/lossless equal to the
plain round."""

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


def _round_runner(seed, K, N, d, epochs, cohort, key):
    """``run(faults) -> (params, metrics)``: one FedAvg round on a random population."""
    rng = np.random.default_rng(seed)
    pop = {"x": jnp.asarray(rng.normal(size=(K, N, d)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 2, size=(K, N)), jnp.int32),
           "n": jnp.asarray(rng.integers(1, N + 1, size=K), jnp.int32)}
    model = logistic_regression(d)

    def run(faults):
        alg = fedavg(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0),
                     local_epochs=epochs, batch_size=3, faults=faults)
        fn = jax.jit(build_round(alg, num_clients=K, clients_per_round=cohort))
        state, metrics = fn(alg.init(model.init(jax.random.key(0))), pop,
                            jax.random.key(key))
        return state.params, metrics

    return run


def test_lossless_settings_and_byte_metrics_in_a_round():
    """top_k(1.0) sends everything: the round equals the uncompressed one; the metrics
    count the payloads of the clients that reported."""
    d = 4
    run = _round_runner(seed=2, K=12, N=9, d=d, epochs=2, cohort=8, key=5)

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


@pytest.mark.parametrize("call,match", [
    (lambda: compression.qsgd(1), "bits must be"),
    (lambda: compression.top_k(0.0), "fraction must be"),
    (lambda: compression.rotated_quantization(0), "bits must be"),
    (lambda: compression.rotated_quantization(17), "bits must be"),
    (lambda: compression.hadamard(jnp.ones(6)), "power of two")])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------- random rotation + quantization (pi_srk)


def _np_hadamard(d):
    """Sylvester's construction in float64, normalized: H_1 = [1], H_2m = [[H, H],
    [H, -H]] / sqrt(2)."""
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]]) / np.sqrt(2.0)
    return h


def _np_levels(z, u, bits):
    """pi_sk in float64: 2^bits levels evenly spaced in [min z, max z]; z_j goes up to
    the next level with probability (its distance from the level below) / step."""
    lo, hi = z.min(), z.max()
    if hi == lo:
        return z.copy()
    step = (hi - lo) / (2 ** bits - 1)
    below = np.floor((z - lo) / step)
    up = u < (z - lo) / step - below
    return lo + (below + up) * step


def _np_stochastic_mse(v, bits):
    """E||pi_sk(v) - v||^2, exactly: sum_j (v_j - lower level)(upper level - v_j)."""
    lo, hi = v.min(), v.max()
    step = (hi - lo) / (2 ** bits - 1)
    below = lo + np.floor((v - lo) / step) * step
    return float(np.sum((v - below) * (below + step - v)))


@pytest.mark.parametrize("d", [1, 2, 8, 64])
def test_fast_hadamard_matches_the_matrix(d):
    rng = np.random.default_rng(d)
    x = rng.normal(size=(3, d))
    got = jax.jit(jax.vmap(compression.hadamard))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), x @ _np_hadamard(d).T, rtol=1e-5, atol=1e-5)


def test_rotation_is_orthogonal_and_inverted_by_unrotate():
    d = 32
    signs = compression.rotation_signs(jax.random.key(4), d)
    s = np.asarray(signs, np.float64)
    assert set(np.unique(s)) == {-1.0, 1.0}
    columns = jax.jit(jax.vmap(lambda e: compression.rotate(e, signs)))(jnp.eye(d))  # R e_j
    R = np.asarray(columns, np.float64).T
    np.testing.assert_allclose(R, _np_hadamard(d) @ np.diag(s), atol=1e-6)
    np.testing.assert_allclose(R.T @ R, np.eye(d), atol=1e-5)
    x = np.random.default_rng(5).normal(size=d)
    back = jax.jit(lambda v: compression.unrotate(compression.rotate(v, signs), signs))(
        jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(back), x, rtol=1e-5, atol=1e-5)


def test_rotated_quantization_matches_a_float64_reference():
    """Same rotation signs and uniforms as the compressor draws (the per-client key is
    split into a rotation key and a noise key): pad to 32, rotate, quantize, decode,
    rotate back, truncate -- all in float64 NumPy."""
    rng = np.random.default_rng(6)
    u = _updates(rng)
    x = _flat(u)
    bits, d = 3, 32
    key = jax.random.key(8)
    out, b = jax.jit(compression.rotated_quantization(bits).apply)(u, key)
    np.testing.assert_array_equal(np.asarray(b), bits * d + 64)
    H = _np_hadamard(d)
    for c, ck in enumerate(jax.random.split(key, C)):
        sign_key, noise_key = jax.random.split(ck)
        s = np.asarray(compression.rotation_signs(sign_key, d), np.float64)
        draws = np.asarray(jax.random.uniform(noise_key, (d,)), np.float64)
        z = H @ (s * np.pad(x[c], (0, d - D)))
        z_hat = _np_levels(z, draws, bits)
        want = (s * (H @ z_hat))[:D]
        np.testing.assert_allclose(_flat(out)[c], want, rtol=1e-4, atol=1e-5)


def test_rotated_quantization_is_unbiased():
    rng = np.random.default_rng(7)
    u = _updates(rng)
    x = _flat(u)
    bits = 2
    comp = jax.jit(jax.vmap(compression.rotated_quantization(bits).apply, in_axes=(None, 0)))
    n = 4000
    outs = _flat_many(comp(u, jax.random.split(jax.random.key(9), n))[0])
    # every rotated coordinate lies in [-||x||, ||x||], so a level step is at most
    # 2 ||x|| / (2^bits - 1) and each decoded coordinate has variance <= step^2 / 4
    step = 2 * np.linalg.norm(x, axis=1, keepdims=True) / (2 ** bits - 1)
    err = np.abs(outs.mean(0) - x)
    assert np.all(err < 5 * (step / 2) / math.sqrt(n))
    assert np.mean((outs - x[None]) ** 2) > 1e-3          # it does quantize


def _flat_many(t):
    """[draws, C, D] in ravel_pytree order."""
    lead = np.asarray(t["b"]).shape[:2]
    return np.concatenate([np.asarray(t["b"]).reshape(*lead, -1),
                           np.asarray(t["w"]).reshape(*lead, -1)], axis=-1)


def test_rotation_beats_plain_stochastic_quantization_on_a_skewed_vector():
    """Suresh et al.'s point (Sec. 4): a few large coordinates make the [min, max] range
    of pi_sk wide and every small coordinate noisy; after the rotation the range shrinks
    to about ||v|| sqrt(log d / d). 200 coordinates (padded to 256), 2 bits."""
    rng = np.random.default_rng(10)
    v = 0.05 * rng.normal(size=200)
    v[[3, 77, 150]] = [8.0, -6.0, 5.0]
    bits = 2
    comp = jax.jit(jax.vmap(compression.rotated_quantization(bits).apply, in_axes=(None, 0)))
    n = 500
    out, b = comp({"v": jnp.asarray(v[None], jnp.float32)}, jax.random.split(jax.random.key(1), n))
    mse_rotated = float(np.mean(np.sum((np.asarray(out["v"])[:, 0] - v) ** 2, axis=1)))
    mse_plain = _np_stochastic_mse(v, bits)
    assert mse_rotated < mse_plain / 5, (mse_rotated, mse_plain)
    assert float(b[0, 0]) == bits * 256 + 64


def test_high_resolution_rotated_quantization_round_is_close_to_the_plain_round():
    run = _round_runner(seed=11, K=10, N=6, d=5, epochs=1, cohort=6, key=3)

    plain, _ = run(Faults())
    fine, m = run(Faults(compressor=compression.rotated_quantization(16)))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(fine)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert float(m["upload_bytes"]) == 6 * (16 * 8 + 64) / 8
