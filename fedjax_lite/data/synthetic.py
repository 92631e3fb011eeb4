"""Synthetic federated datasets (host side, NumPy only, seeded)."""

from __future__ import annotations

import numpy as np

from fedjax_lite.data.population import Population, from_ragged


def _skewed_sizes(rng: np.random.Generator, num_clients: int, mean: float, sigma: float,
                  minimum: int) -> np.ndarray:
    """Lognormal client sizes with the given mean, at least ``minimum``."""
    raw = rng.lognormal(mean=np.log(mean) - sigma ** 2 / 2, sigma=sigma, size=num_clients)
    return np.maximum(minimum, np.round(raw)).astype(int)


def _logistic_start(seed: int, num_clients: int, num_features: int, mean_examples: float,
                    size_sigma: float, min_examples: int):
    """The generator's first draws: (rng, w* unnormalized, client sizes)."""
    rng = np.random.default_rng(seed)
    w_star = rng.normal(size=num_features)
    return rng, w_star, _skewed_sizes(rng, num_clients, mean_examples, size_sigma,
                                      min_examples)


def _fedprox_sizes(rng: np.random.Generator, num_clients: int) -> np.ndarray:
    return np.floor(rng.lognormal(4, 2, size=num_clients)).astype(int) + 50


def client_sizes(kind: str, *, seed: int, num_clients: int, num_features: int,
                 mean_examples: float = 50.0, size_sigma: float = 0.5,
                 min_examples: int = 4) -> np.ndarray:
    """The example counts the generator ``kind`` (``synthetic_logistic`` or
    ``fedprox_synthetic``) will draw for these arguments, without generating the data
    (what a memory estimate needs before the population is built)."""
    if kind == "fedprox_synthetic":
        return _fedprox_sizes(np.random.default_rng(seed), num_clients)
    return _logistic_start(seed, num_clients, num_features, mean_examples, size_sigma,
                           min_examples)[2]


def synthetic_logistic(*, num_clients: int, num_features: int, mean_examples: float,
                       size_sigma: float = 0.5, min_examples: int = 4,
                       feature_shift: float = 1.0, label_noise: float = 0.02,
                       seed: int = 0) -> Population:
    """Binary clients that share one ground-truth linear boundary.

    A unit vector ``w*`` is drawn once. Client k draws a feature shift
    ``mu_k ~ N(0, feature_shift^2 I)`` and a size ``n_k`` (lognormal, mean
    ``mean_examples``); its examples are ``x ~ N(mu_k, I)`` with label
    ``1[x . w* > 0]`` flipped with probability ``label_noise``. The Bayes accuracy is
    ``1 - label_noise``, so the task is learnable while clients are non-IID in both
    feature distribution (covariate shift) and size.
    """
    rng, w_star, sizes = _logistic_start(seed, num_clients, num_features, mean_examples,
                                         size_sigma, min_examples)
    w_star /= np.linalg.norm(w_star)
    xs, ys = [], []
    for k in range(num_clients):
        mu = rng.normal(scale=feature_shift, size=num_features)
        x = rng.normal(size=(sizes[k], num_features)) + mu
        y = (x @ w_star > 0).astype(np.int32)
        flip = rng.random(sizes[k]) < label_noise
        xs.append(x.astype(np.float32))
        ys.append(np.where(flip, 1 - y, y))
    return from_ragged(xs, ys, num_classes=2, source="synthetic_logistic")


def fedprox_synthetic(*, alpha: float, beta: float, iid: bool = False, num_clients: int = 30,
                      num_features: int = 60, num_classes: int = 10,
                      seed: int = 0) -> Population:
    """Synthetic(alpha, beta) of Li et al., "Federated Optimization in Heterogeneous
    Networks" (MLSys 2020), section 5.1.

    Client k: ``u_k ~ N(0, alpha)``, ``W_k ~ N(u_k, 1)`` (d x c), ``b_k ~ N(u_k, 1)``;
    ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)`` (d); ``x ~ N(v_k, Sigma)`` with diagonal
    ``Sigma_jj = j^-1.2``; ``y = argmax softmax(W_k^T x + b_k)``. Client sizes follow the
    paper's released generator: ``floor(lognormal(4, 2)) + 50`` examples. ``alpha`` and
    ``beta`` are the paper's variances-as-written; like the released generator we use them
    as the normal's scale parameter. The IID variant shares one ``W, b ~ N(0, 1)`` across
    clients and draws every client's ``x ~ N(0, Sigma)``.
    """
    rng = np.random.default_rng(seed)
    sizes = _fedprox_sizes(rng, num_clients)
    std = np.power(np.arange(1, num_features + 1, dtype=np.float64), -1.2 / 2)
    if iid:
        w_shared = rng.normal(size=(num_features, num_classes))
        b_shared = rng.normal(size=num_classes)
    xs, ys = [], []
    for k in range(num_clients):
        if iid:
            w, b, v = w_shared, b_shared, np.zeros(num_features)
        else:
            u = rng.normal(0.0, alpha)
            w = rng.normal(u, 1.0, size=(num_features, num_classes))
            b = rng.normal(u, 1.0, size=num_classes)
            v = rng.normal(rng.normal(0.0, beta), 1.0, size=num_features)
        x = v + std * rng.normal(size=(sizes[k], num_features))
        xs.append(x.astype(np.float32))
        ys.append(np.argmax(x @ w + b, axis=1).astype(np.int32))  # argmax softmax = argmax
    return from_ragged(xs, ys, num_classes=num_classes, source="fedprox_synthetic")
