"""The hand-written RDP reference accountant (tests/rdp_reference.py, used to cross-check
dp-accounting in test_accounting.py) against independent references: a published figure,
the Gaussian mechanism's closed forms, and float64 numerical integration of the Rényi
divergence."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from rdp_reference import (dp_epsilon, epsilon_from_rdp, noise_multiplier_for,
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
