"""Partitioning a centralized dataset over simulated clients (host side, NumPy only).

Every partitioner takes the labels ``y`` (int[N]) of a dataset ``(x, y)`` and returns one
int64 index array per client: client k holds ``x[parts[k]], y[parts[k]]``. The arrays are
disjoint and together cover ``range(N)`` exactly once, no client is empty, and the same
seed (an int or a ``numpy.random.Generator``) gives the same partition. Impossible
requests (more clients than examples, more shards than examples, ...) raise ValueError.

* :func:`iid` -- a uniform shuffle cut into near-equal parts (sizes differ by at most 1).
* :func:`dirichlet` -- label skew of Hsu, Qi & Brown, "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification" (2019,
  arXiv:1909.06335), section 3: client k's class proportions are
  ``q_k ~ Dir(alpha * p)``, ``p`` the dataset's class prior.
* :func:`shards` -- the pathological non-IID split of McMahan et al., "Communication-
  Efficient Learning of Deep Networks from Decentralized Data" (AISTATS 2017), section 3:
  sort by label, cut into ``num_clients * shards_per_client`` shards, deal
  ``shards_per_client`` shards to every client.
* :func:`quantity_skew` -- unbalanced client sizes ("quantity skew", Kairouz et al.,
  "Advances and Open Problems in Federated Learning", 2021, section 3.1): lognormal
  sizes with log-scale ``sigma``, labels IID.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PARTITIONS = ("iid", "dirichlet", "shards", "quantity_skew")

Seed = int | Sequence[int] | np.random.Generator


def _labels(y, num_clients: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{what}: labels must be a 1-D array, got shape {y.shape}")
    if len(y) and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what}: labels must be integers, got {y.dtype}")
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"{what}: num_clients={num_clients} must be a positive integer")
    if num_clients > len(y):
        raise ValueError(f"{what}: cannot split {len(y)} examples over {num_clients} "
                         "clients (every client needs at least one example)")
    return y


def _cut(order: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    bounds = np.cumsum(sizes)[:-1]
    return [part.astype(np.int64) for part in np.split(order, bounds)]


def equal_sizes(n: int, num_clients: int) -> np.ndarray:
    """Near-equal sizes: ``n // K`` each, the first ``n % K`` clients one more."""
    sizes = np.full(num_clients, n // num_clients, dtype=np.int64)
    sizes[:n % num_clients] += 1
    return sizes


def iid(y, num_clients: int, *, seed: Seed) -> list[np.ndarray]:
    """Uniformly shuffled examples cut into ``num_clients`` parts of near-equal size."""
    y = _labels(y, num_clients, "iid partition")
    rng = np.random.default_rng(seed)
    return _cut(rng.permutation(len(y)), equal_sizes(len(y), num_clients))


def dirichlet(y, num_clients: int, *, alpha: float, seed: Seed) -> list[np.ndarray]:
    """Label skew of Hsu et al. (2019): ``q_k ~ Dir(alpha * p)`` per client.

    ``p`` is the empirical class prior of ``y`` (over the classes present). Client sizes
    are fixed first, near-equal as in :func:`iid` (Hsu et al. give every client the same
    number of examples), so no client is ever empty. Clients are then filled in order
    0..K-1 without replacement: client k draws its ``n_k`` examples with class
    probabilities proportional to ``q_k[c] / p[c] * remaining[c]`` -- each remaining
    example weighted by the likelihood ratio of the client's label distribution to the
    dataset's. From a full pool (``remaining = N p``) these are exactly ``q_k``, as in
    the paper; as the pool empties they lean towards the classes with examples left, so
    the last clients are not left with one class's leftovers, and for ``alpha -> inf``
    (``q_k = p``) the draw is a uniform one from the remaining pool: an IID partition.
    A draw is ``Multinomial(n_k, probabilities)`` capped at each class's remaining
    count, the shortfall redrawn the same way; if the weights vanish on every class with
    examples left (``q_k`` is numerically one-hot for tiny alpha), the remaining
    examples are drawn uniformly. Since the capacities add up, every example is
    assigned exactly once.
    """
    y = _labels(y, num_clients, "dirichlet partition")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"dirichlet partition: alpha={alpha} must be a number > 0")
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    prior = counts / counts.sum()
    # each class's examples in random order; a client takes from the front of a queue
    queues = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(len(classes))]
    taken = np.zeros(len(classes), dtype=np.int64)
    remaining = counts.astype(np.int64).copy()
    parts = []
    for n_k in equal_sizes(len(y), num_clients):
        q = rng.dirichlet(alpha * prior)
        ratio = np.where(np.isfinite(q), q, 0.0) / prior
        got = np.zeros(len(classes), dtype=np.int64)
        need = int(n_k)
        while need > 0:
            weights = ratio * remaining
            if weights.sum() <= 0:
                weights = remaining.astype(np.float64)
            draw = np.minimum(rng.multinomial(need, weights / weights.sum()), remaining)
            got += draw
            remaining -= draw
            need -= int(draw.sum())
        idx = [queues[c][taken[c]:taken[c] + got[c]] for c in np.flatnonzero(got)]
        taken += got
        parts.append(rng.permutation(np.concatenate(idx)).astype(np.int64))
    return parts


def shards(y, num_clients: int, *, shards_per_client: int, seed: Seed) -> list[np.ndarray]:
    """The pathological non-IID partition of McMahan et al. (2017).

    Examples are sorted by label (ties in random order), cut into
    ``S = num_clients * shards_per_client`` contiguous shards of near-equal size
    (``N // S`` or one more), and every client receives ``shards_per_client`` shards
    chosen uniformly at random. What holds exactly: a shard covers a contiguous range of
    the sorted labels, so it holds one label unless a class boundary falls inside it;
    there are ``num_classes - 1`` boundaries, so the number of distinct labels summed over
    clients is at most ``S + num_classes - 1``. When every class's count is a multiple of
    the shard size (e.g. McMahan's MNIST: 200 shards of 300), every client sees at most
    ``shards_per_client`` labels.
    """
    y = _labels(y, num_clients, "shards partition")
    if isinstance(shards_per_client, bool) or int(shards_per_client) != shards_per_client \
            or shards_per_client < 1:
        raise ValueError(f"shards partition: shards_per_client={shards_per_client} must be "
                         "a positive integer")
    num_shards = num_clients * shards_per_client
    if num_shards > len(y):
        raise ValueError(f"shards partition: {num_clients} clients x {shards_per_client} "
                         f"shards = {num_shards} shards, more than the {len(y)} examples")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(y))
    order = shuffled[np.argsort(y[shuffled], kind="stable")]
    pieces = _cut(order, equal_sizes(len(y), num_shards))
    deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [rng.permutation(np.concatenate([pieces[s] for s in row])).astype(np.int64)
            for row in deal]


def quantity_skew(y, num_clients: int, *, sigma: float, seed: Seed) -> list[np.ndarray]:
    """Lognormal client sizes, labels IID.

    Weights ``w_k ~ LogNormal(0, sigma^2)``; client k gets ``1 + m_k`` examples where the
    ``N - K`` examples beyond one per client are divided in proportion to ``w`` (largest
    remainders rounded up, so the sizes add up to N exactly). The examples themselves
    are a uniform shuffle, so every client's labels are an IID sample. ``sigma = 0`` gives
    near-equal sizes, as :func:`iid`.
    """
    y = _labels(y, num_clients, "quantity_skew partition")
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"quantity_skew partition: sigma={sigma} must be a number >= 0")
    rng = np.random.default_rng(seed)
    w = rng.lognormal(0.0, sigma, size=num_clients) if sigma > 0 else np.ones(num_clients)
    extra = len(y) - num_clients
    share = extra * w / w.sum()
    sizes = np.floor(share).astype(np.int64)
    short = extra - int(sizes.sum())
    sizes[np.argsort(-(share - sizes), kind="stable")[:short]] += 1
    return _cut(rng.permutation(len(y)), sizes + 1)


def partition(y, num_clients: int, kind: str, *, seed: Seed, alpha: float = 0.5,
              shards_per_client: int = 2, sigma: float = 1.0) -> list[np.ndarray]:
    """Dispatches to the partitioner ``kind`` (one of :data:`PARTITIONS`); only the
    argument of that kind is used."""
    if kind == "iid":
        return iid(y, num_clients, seed=seed)
    if kind == "dirichlet":
        return dirichlet(y, num_clients, alpha=alpha, seed=seed)
    if kind == "shards":
        return shards(y, num_clients, shards_per_client=shards_per_client, seed=seed)
    if kind == "quantity_skew":
        return quantity_skew(y, num_clients, sigma=sigma, seed=seed)
    raise ValueError(f"unknown partition kind {kind!r}; allowed: {', '.join(PARTITIONS)}")
