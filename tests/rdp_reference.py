"""A hand-written RDP accountant of the sampled Gaussian mechanism, kept as an independent
TEST REFERENCE for fedjax_lite.privacy.accounting (which uses dp-accounting).

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018) releases, every round, the sum of clipped client updates plus Gaussian noise
of standard deviation ``noise_multiplier * clip_norm``, over a cohort that includes each
client with probability ``q``. One round is the *sampled Gaussian mechanism* (SGM); its
privacy is tracked in Rényi differential privacy (Mironov, "Rényi Differential
Privacy", CSF 2017), where T rounds simply add up, then converted to (epsilon, delta).

RDP of one SGM step at integer order ``alpha >= 2`` (Mironov, Talwar and Zhang, "Rényi
Differential Privacy of the Sampled Gaussian Mechanism", 2019, Sec. 3.3):

    A_alpha = sum_{k=0}^{alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 s^2))
    eps_RDP(alpha) = log(A_alpha) / (alpha - 1)

with ``s`` the noise multiplier. At ``q = 1`` this is the Gaussian mechanism's
``alpha / (2 s^2)``. Conversion to (epsilon, delta)-DP for T steps, minimized over the
orders: ``eps = T eps_RDP(alpha) + log((alpha - 1) / alpha) - (log delta + log alpha) /
(alpha - 1)`` (Canonne, Kamath and Steinke, "The Discrete Gaussian for Differential
Privacy", NeurIPS 2020, Prop. 12; ``conversion="classic"`` uses Mironov 2017, Prop. 3:
``T eps_RDP(alpha) + log(1 / delta) / (alpha - 1)``, looser).

The analysis assumes Poisson sampling (each client independently with probability q);
a fixed-size uniform cohort of C out of K clients with ``q = C / K`` is the usual
approximation (as in McMahan et al. 2018). Host-side NumPy: accounting is bookkeeping,
not part of the jitted round.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

# Integer orders: dense where the optimum usually lies, sparse up to 1024 for tiny epsilon.
DEFAULT_ORDERS: tuple[int, ...] = tuple(range(2, 65)) + (80, 96, 128, 192, 256, 384, 512,
                                                          768, 1024)


class PrivacySpent(NamedTuple):
    epsilon: float
    delta: float
    order: int        # the Rényi order that gave the bound


def _check(q: float, noise_multiplier: float) -> None:
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sampling probability q must be in [0, 1], got {q}")
    if not noise_multiplier > 0.0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")


def rdp_sampled_gaussian(q: float, noise_multiplier: float,
                         orders: Sequence[int] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP epsilon of ONE step of the sampled Gaussian mechanism at each integer order."""
    _check(q, noise_multiplier)
    out = np.empty(len(orders))
    for i, alpha in enumerate(orders):
        if int(alpha) != alpha or alpha < 2:
            raise ValueError(f"orders must be integers >= 2, got {alpha}")
        alpha = int(alpha)
        if q == 0.0:
            out[i] = 0.0
            continue
        if q == 1.0:
            out[i] = alpha / (2.0 * noise_multiplier ** 2)
            continue
        k = np.arange(alpha + 1, dtype=np.float64)
        log_terms = (math.lgamma(alpha + 1) - np.array([math.lgamma(j + 1) for j in k])
                     - np.array([math.lgamma(alpha - j + 1) for j in k])
                     + (alpha - k) * math.log1p(-q) + k * math.log(q)
                     + (k * k - k) / (2.0 * noise_multiplier ** 2))
        top = log_terms.max()
        log_a = top + math.log(np.sum(np.exp(log_terms - top)))
        out[i] = max(log_a, 0.0) / (alpha - 1)
    return out


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders: Sequence[int] = DEFAULT_ORDERS,
                     conversion: str = "improved") -> PrivacySpent:
    """(epsilon, delta)-DP from accumulated RDP values at ``orders`` (the best order)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(orders, np.float64)
    rdp = np.asarray(rdp, np.float64)
    if conversion == "improved":
        eps = rdp + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)
    elif conversion == "classic":
        eps = rdp + math.log(1.0 / delta) / (a - 1)
    else:
        raise ValueError(f"conversion must be 'improved' or 'classic', got {conversion!r}")
    best = int(np.argmin(eps))
    return PrivacySpent(max(float(eps[best]), 0.0), delta, int(orders[best]))


def dp_epsilon(q: float, noise_multiplier: float, steps: int, delta: float,
               orders: Sequence[int] = DEFAULT_ORDERS,
               conversion: str = "improved") -> PrivacySpent:
    """(epsilon, delta) after ``steps`` rounds of the sampled Gaussian mechanism."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps == 0 or q == 0.0:
        _check(q, noise_multiplier)
        return PrivacySpent(0.0, delta, int(orders[0]))      # nothing released
    rdp = steps * rdp_sampled_gaussian(q, noise_multiplier, orders)
    return epsilon_from_rdp(rdp, delta, orders, conversion)


def noise_multiplier_for(target_epsilon: float, q: float, steps: int, delta: float,
                         orders: Sequence[int] = DEFAULT_ORDERS, tol: float = 1e-4) -> float:
    """The smallest noise multiplier (to ``tol``, relative) whose ``dp_epsilon`` is at most
    ``target_epsilon``: bisection, epsilon decreasing in the noise."""
    if not target_epsilon > 0.0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    eps = lambda s: dp_epsilon(q, s, steps, delta, orders).epsilon
    lo, hi = 1e-2, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            raise ValueError(f"no noise multiplier <= 1e6 reaches epsilon {target_epsilon}")
    if eps(lo) <= target_epsilon:
        return lo
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi
