"""RDP accountant of the sampled Gaussian mechanism against independent references: a
published figure, the Gaussian mechanism's closed forms, and float64 numerical
integration of the Rényi divergence."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from fedjax_lite.privacy import (dp_epsilon, epsilon_from_rdp, noise_multiplier_for,
                                 rdp_sampled_gaussian)


def test_matches_the_moments_accountant_figure_of_abadi_et_al():
    """Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016), Sec. 3.1:
    q = 0.01, sigma = 4, delta = 1e-5, T = 10000 steps gives epsilon ~ 1.26 with the
    moments accountant (the same log(1/delta)/(alpha-1) conversion as 'classic')."""
    spent = dp_epsilon(0.01, 4.0, 10000, 1e-5, conversion="classic")
    assert abs(spent.epsilon - 1.26) < 0.01, spent
    # the improved conversion is valid and tighter
    assert dp_epsilon(0.01, 4.0, 10000, 1e-5).epsilon < spent.epsilon


def test_full_participation_is_the_gaussian_mechanism():
    orders = [2, 3, 7, 32]
    np.testing.assert_allclose(rdp_sampled_gaussian(1.0, 1.7, orders),
                               [a / (2 * 1.7 ** 2) for a in orders], rtol=1e-12)
    np.testing.assert_array_equal(rdp_sampled_gaussian(0.0, 1.7, orders), 0.0)


@pytest.mark.parametrize("q,sigma,alpha", [(0.01, 1.0, 2), (0.05, 0.8, 5), (0.2, 2.0, 12),
                                           (0.5, 1.5, 3)])
def test_rdp_matches_numerical_integration(q, sigma, alpha):
    """A_alpha = E_{x ~ N(0, s^2)} [((1 - q) + q exp((2x - 1) / (2 s^2)))^alpha], by
    quadrature in float64 (Mironov, Talwar, Zhang 2019, Sec. 3.3)."""
    def f(x):   # in log space: the mixture's ratio grows like exp(alpha x / s^2)
        log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * x - 1) / (2 * sigma ** 2))
        return math.exp(stats.norm.logpdf(x, scale=sigma) + alpha * log_ratio)

    # the integrand peaks near x = alpha and decays like a Gaussian of scale sigma
    a_alpha, _ = integrate.quad(f, -60 * sigma, alpha + 60 * sigma, points=[0.0, alpha],
                                epsabs=0, epsrel=1e-12, limit=400)
    expected = math.log(a_alpha) / (alpha - 1)
    got = rdp_sampled_gaussian(q, sigma, [alpha])[0]
    assert got == pytest.approx(expected, rel=1e-7, abs=1e-12)


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Tight epsilon of the Gaussian mechanism with sensitivity/sigma ratio mu (Balle and
    Wang, ICML 2018, Thm. 8): delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    d = lambda e: (stats.norm.cdf(-e / mu + mu / 2)
                   - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2))
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (2.0, 100), (5.0, 1000)])
def test_rdp_bound_is_valid_and_close_for_composed_gaussians(sigma, steps):
    """T compositions of the Gaussian mechanism = one with sigma / sqrt(T): the RDP bound
    must never be below the exact epsilon, and should be within 30% of it."""
    delta = 1e-5
    exact = _exact_gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    got = dp_epsilon(1.0, sigma, steps, delta).epsilon
    assert exact <= got <= 1.3 * exact, (exact, got)


def test_epsilon_grows_with_rounds_and_sampling_and_shrinks_with_noise():
    e = lambda q, s, t: dp_epsilon(q, s, t, 1e-5).epsilon
    assert e(0.01, 1.0, 100) < e(0.01, 1.0, 1000) < e(0.01, 1.0, 10000)
    assert e(0.01, 1.0, 1000) < e(0.05, 1.0, 1000) < e(0.2, 1.0, 1000)
    assert e(0.01, 0.7, 1000) > e(0.01, 1.0, 1000) > e(0.01, 2.0, 1000)
    assert dp_epsilon(0.01, 1.0, 0, 1e-5).epsilon == 0.0


def test_noise_multiplier_for_inverts_dp_epsilon():
    s = noise_multiplier_for(2.0, q=0.02, steps=500, delta=1e-6)
    assert dp_epsilon(0.02, s, 500, 1e-6).epsilon <= 2.0
    assert dp_epsilon(0.02, s * 0.99, 500, 1e-6).epsilon > 2.0


@pytest.mark.parametrize("call,match", [
    (lambda: rdp_sampled_gaussian(1.5, 1.0), "q must be in"),
    (lambda: rdp_sampled_gaussian(0.1, 0.0), "noise_multiplier must be > 0"),
    (lambda: rdp_sampled_gaussian(0.1, 1.0, [1.5]), "orders must be integers >= 2"),
    (lambda: dp_epsilon(0.1, 1.0, 10, 0.0), "delta must be in"),
    (lambda: dp_epsilon(0.1, 1.0, -1, 1e-5), "steps must be >= 0"),
    (lambda: epsilon_from_rdp(np.zeros(2), 1e-5, [2, 3], conversion="x"), "conversion"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- DP-FedAvg aggregator

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fedjax_lite.core.aggregators import dp_gaussian  # noqa: E402


def _tree(x):
    """[C, 7] float64 -> {'w': [C, 2, 3], 'b': [C]} float32 (a model-shaped pytree)."""
    x = np.asarray(x, np.float32)
    return {"w": jnp.asarray(x[:, :6].reshape(-1, 2, 3)), "b": jnp.asarray(x[:, 6])}


def _flat(t):
    return np.concatenate([np.asarray(t["w"]).reshape(-1), np.asarray(t["b"]).reshape(-1)])


def test_dp_gaussian_without_noise_is_the_clipped_sum_over_the_expected_count():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 7)) * np.array([[0.1], [0.5], [2.0], [0.3], [5.0], [1.0]])
    w = np.array([1.0, 3.0, 1.0, 0.0, 1.0, 2.0])         # client 3 did not report
    x[3] = np.nan                                         # ... and its row is garbage
    S, denom = 1.0, 4.0
    a = dp_gaussian(S, 0.0, denom)
    out, _, metrics = jax.jit(a.apply)(_tree(x), jnp.asarray(w, jnp.float32), (),
                                       jax.random.key(0))
    norms = np.linalg.norm(np.nan_to_num(x), axis=1)
    ref = sum(x[k] * min(1.0, S / norms[k]) for k in range(6) if w[k] > 0) / denom
    np.testing.assert_allclose(_flat(out), ref, rtol=1e-5, atol=1e-7)
    assert float(metrics["clipped_fraction"]) == pytest.approx(
        np.mean(norms[w > 0] > S))
    assert float(metrics["num_reporting"]) == 5


def test_dp_gaussian_noise_has_the_calibrated_scale_and_bounded_sensitivity():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 7))
    w = jnp.ones(5)
    S, z, denom = 0.7, 1.5, 5.0
    noisy = dp_gaussian(S, z, denom)
    keys = jax.random.split(jax.random.key(3), 4000)
    outs = jax.jit(jax.vmap(lambda k: _flat_jnp(noisy.apply(_tree(x), w, (), k)[0])))(keys)
    clean = _flat(dp_gaussian(S, 0.0, denom).apply(_tree(x), w, (), keys[0])[0])
    noise = np.asarray(outs) - clean
    assert abs(noise.std() / (z * S / denom) - 1) < 0.03       # 28,000 draws
    assert abs(noise.mean()) < 4 * (z * S / denom) / np.sqrt(noise.size)
    assert not np.allclose(noise[0], noise[1])                   # fresh noise per key
    # One more client, however large its update, moves the clean sum by at most S.
    bigger = np.concatenate([x, 1e6 * np.ones((1, 7))])
    moved = _flat(dp_gaussian(S, 0.0, denom).apply(_tree(bigger), jnp.ones(6), (),
                                                   keys[0])[0]) - clean
    assert np.linalg.norm(moved) * denom == pytest.approx(S, rel=1e-5)


def _flat_jnp(t):
    return jnp.concatenate([t["w"].reshape(-1), t["b"].reshape(-1)])


@pytest.mark.parametrize("args,match", [((0.0, 1.0, 10), "clip_norm must be > 0"),
                                        ((1.0, -1.0, 10), "noise_multiplier must be >= 0"),
                                        ((1.0, 1.0, 0), "expected_clients must be > 0")])
def test_dp_gaussian_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        dp_gaussian(*args)


# ---------------------------------------------------------------- secure aggregation

from fedjax_lite.core.aggregators import secure_mean  # noqa: E402


def test_secure_mean_is_the_fixed_point_mean_of_the_reporting_clients():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 7)) * 0.4
    x[0, 0], x[2, 3] = 3.0, -5.0                         # clipped at c = 1
    w = np.array([1.0, 0.0, 2.0, 1.0, 1.0, 1.0])         # client 1 did not report
    x[1] = np.nan
    c, bits = 1.0, 12
    agg = secure_mean(c, bits)
    keys = jax.random.split(jax.random.key(0), 1000)
    wj = jnp.asarray(w, jnp.float32)
    outs = np.asarray(jax.jit(jax.vmap(
        lambda k: _flat_jnp(agg.apply(_tree(x), wj, (), k)[0])))(keys))
    rep = w > 0
    target = np.clip(x[rep], -c, c).mean(0)              # unweighted mean, clipped
    step = 2 * c / (2 ** bits - 1)
    # each decode is within one fixed-point step of the target (stochastic rounding) ...
    assert np.max(np.abs(outs - target)) <= step + 1e-5
    # ... and unbiased over rounds
    assert np.max(np.abs(outs.mean(0) - target)) < 4 * step / np.sqrt(len(outs)) + 1e-6
    _, _, metrics = jax.jit(agg.apply)(_tree(x), wj, (), keys[0])
    assert float(metrics["secagg_clipped_fraction"]) == pytest.approx(2 / (5 * 7))
    assert float(metrics["secagg_bytes_per_client"]) == (bits + 3) * 7 / 8   # C = 6


def test_secure_mean_masked_uploads_look_uniform():
    """What the server receives from a client is uniform over Z_R whatever the update
    (chi-square of the top bits), yet the uploads sum to the encodings' sum."""
    import functools
    from fedjax_lite.core.aggregators import secagg_uploads
    C, D, bits, r = 4, 4096, 8, 10
    uploads = jax.jit(functools.partial(secagg_uploads, clip_value=1.0, bits=bits,
                                        modulus_bits=r))
    mask = jnp.ones(C, bool)
    for val in (0.0, 0.9, -1.0, 1.0):
        flat = jnp.full((C, D), val, jnp.float32)
        sent = np.asarray(uploads(flat, mask, jax.random.key(11)))
        for k in range(C):
            counts = np.bincount(sent[k] >> (r - 3), minlength=8)    # top 3 bits
            chi2 = np.sum((counts - D / 8) ** 2 / (D / 8))
            assert chi2 < 35.0, (val, k, counts)                      # df 7, p ~ 1e-5
        total = np.sum(sent.astype(np.int64), axis=0) % (1 << r)
        grid = (val + 1) / 2 * (2 ** bits - 1)        # each client rounds to floor or ceil
        assert np.all((total >= C * math.floor(grid)) & (total <= C * math.ceil(grid)))
    # a client that does not report sends nothing and carries no mask
    sent = np.asarray(uploads(jnp.full((C, D), 0.5), jnp.array([1, 0, 1, 1], bool),
                              jax.random.key(1)))
    assert np.all(sent[1] == 0)
    total = np.sum(sent.astype(np.int64), 0) % (1 << r)
    grid = 0.75 * (2 ** bits - 1)
    assert np.all((total >= 3 * math.floor(grid)) & (total <= 3 * math.ceil(grid)))


def test_secure_mean_rejects_bad_arguments():
    with pytest.raises(ValueError, match="clip_value must be > 0"):
        secure_mean(0.0)
    with pytest.raises(ValueError, match="bits must be an integer"):
        secure_mean(1.0, bits=40)
