"""Federated data on the host: ragged clients stacked into padded arrays.

NumPy only. A :class:`Population` holds every client's examples with a leading client
axis; padding sits at the end of each client's row and is described by ``n`` (real
example count per client), from which ``mask`` is derived. The engine never needs to know
which client ids the rows came from; ``client_ids`` keeps that for error messages and
outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Population:
    """Stacked, padded federated data.

    Attributes:
      x: float32[K, N, ...] examples, client k's real ones in ``x[k, :n[k]]``.
      y: int32[K, N] labels (0 in padding).
      n: int32[K] real example counts (the default aggregation weights).
      client_ids: int64[K] the ids the clients had in the source data.
    """

    x: np.ndarray
    y: np.ndarray
    n: np.ndarray
    client_ids: np.ndarray

    @property
    def num_clients(self) -> int:
        return int(self.x.shape[0])

    @property
    def max_examples(self) -> int:
        return int(self.x.shape[1])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[2:])

    @property
    def mask(self) -> np.ndarray:
        """bool[K, N]: True for real examples."""
        return np.arange(self.max_examples)[None, :] < self.n[:, None]

    @property
    def num_examples(self) -> int:
        return int(self.n.sum())

    def gather(self, indices: np.ndarray) -> "Population":
        """The clients at ``indices`` (array indexing, no loop over clients)."""
        indices = np.asarray(indices)
        return Population(self.x[indices], self.y[indices], self.n[indices],
                          self.client_ids[indices])

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays the engine consumes: ``{'x', 'y', 'n'}``."""
        return {"x": self.x, "y": self.y, "n": self.n}


def padded_width(longest: int) -> int:
    """The example axis's length for a longest client of ``longest`` examples: the next
    power of two (lengths up to 8 as they are). Populations whose longest clients differ
    -- another seed of the same generator (a lognormal's largest draw moves by tens of
    percent between seeds), another split -- then share array shapes, hence compiled
    programs (the persistent compilation cache). Padding never changes results (every
    slot past a client's n is masked, and chunks skip the steps only longer clients
    need); it costs up to 2x the padded arrays' memory (the shuffle network already
    sorts a power-of-two length)."""
    longest = max(int(longest), 1)
    return longest if longest <= 8 else 1 << (longest - 1).bit_length()


def from_ragged(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], *,
                client_ids: Sequence[int] | None = None,
                num_classes: int | None = None,
                allow_empty: bool = False,
                source: str = "data") -> Population:
    """Stacks per-client arrays into a padded :class:`Population`, validating them.

    Args:
      xs: per-client features, each float[n_k, ...] with the same trailing shape.
      ys: per-client integer labels, each [n_k].
      client_ids: ids to name clients by in errors (default 0..K-1).
      num_classes: if given, labels must lie in [0, num_classes).
      allow_empty: whether clients with no examples are accepted (test splits).
      source: what to call the data in error messages (e.g. a file name).

    Raises:
      ValueError naming the client id and the problem.
    """
    if len(xs) != len(ys):
        raise ValueError(f"{source}: {len(xs)} feature arrays but {len(ys)} label arrays")
    if len(xs) == 0:
        raise ValueError(f"{source}: no clients")
    ids = np.arange(len(xs)) if client_ids is None else np.asarray(client_ids)
    if len(ids) != len(xs):
        raise ValueError(f"{source}: {len(ids)} client ids for {len(xs)} clients")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{source}: client id {unique[np.argmax(counts > 1)]} appears more "
                         "than once")
    feature_shape = None
    for cid, x, y in zip(ids, xs, ys):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{source}: client {cid}: features {x.shape} and labels {y.shape} "
                             "do not match (expected x [n, ...] and y [n])")
        if x.shape[0] == 0 and not allow_empty:
            raise ValueError(f"{source}: client {cid} has no examples")
        if feature_shape is None:
            feature_shape = x.shape[1:]
        elif x.shape[1:] != feature_shape:
            raise ValueError(f"{source}: client {cid}: feature shape {x.shape[1:]} differs "
                             f"from the first client's {feature_shape}")
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"{source}: client {cid}: features must be numeric, got {x.dtype}")
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1) if x.size else np.zeros(0, bool)
        if bad.any():
            raise ValueError(f"{source}: client {cid}: non-finite feature (NaN or inf) in "
                             f"example {int(np.argmax(bad))}")
        if y.size and not np.issubdtype(y.dtype, np.integer):
            if not (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))):
                raise ValueError(f"{source}: client {cid}: labels must be integers, got {y.dtype}")
        if y.size and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
            allowed = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            j = int(np.argmax((y < 0) | ((y >= num_classes) if num_classes else False)))
            raise ValueError(f"{source}: client {cid}: label {y[j]} of example {j} is out of "
                             f"range, expected {allowed}")
    n = np.array([len(y) for y in ys], dtype=np.int32)
    width = padded_width(int(n.max()))
    x_out = np.zeros((len(xs), width) + tuple(feature_shape), dtype=np.float32)
    y_out = np.zeros((len(xs), width), dtype=np.int32)
    for k, (x, y) in enumerate(zip(xs, ys)):  # host-side, once, at load time
        x_out[k, :n[k]] = x
        y_out[k, :n[k]] = y
    return Population(x_out, y_out, n, ids.astype(np.int64))


def from_flat(x: np.ndarray, y: np.ndarray, client: np.ndarray, *,
              num_classes: int | None = None, allow_empty: bool = False,
              source: str = "data") -> Population:
    """Groups flat arrays ``x[N, ...]``, ``y[N]``, ``client[N]`` by client id."""
    x, y, client = np.asarray(x), np.asarray(y), np.asarray(client)
    if not (len(x) == len(y) == len(client)):
        raise ValueError(f"{source}: mismatched lengths: x has {len(x)} rows, y {len(y)}, "
                         f"client {len(client)}")
    if client.ndim != 1 or not np.issubdtype(client.dtype, np.integer):
        raise ValueError(f"{source}: 'client' must be a 1-D integer array, got "
                         f"{client.dtype}{list(client.shape)}")
    # Check per row first, so messages point at the row of the file as well.
    if len(x) and np.issubdtype(x.dtype, np.number):
        bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
        if bad.size:
            r = int(bad[0])
            raise ValueError(f"{source}: client {client[r]}: non-finite feature (NaN or inf) "
                             f"in row {r}")
    if len(y) and np.issubdtype(y.dtype, np.number):
        out = (y < 0) | ((y >= num_classes) if num_classes is not None else False)
        if out.any():
            r = int(np.argmax(out))
            allowed = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise ValueError(f"{source}: client {client[r]}: label {y[r]} in row {r} is out "
                             f"of range, expected {allowed}")
    order = np.argsort(client, kind="stable")
    ids, starts = np.unique(client[order], return_index=True)
    bounds = list(starts) + [len(order)]
    xs = [x[order[bounds[i]:bounds[i + 1]]] for i in range(len(ids))]
    ys = [y[order[bounds[i]:bounds[i + 1]]] for i in range(len(ids))]
    return from_ragged(xs, ys, client_ids=ids, num_classes=num_classes,
                       allow_empty=allow_empty, source=source)


def split_examples(pop: Population, test_fraction: float,
                   rng: np.random.Generator) -> tuple[Population, Population]:
    """Splits every client's examples into train and test parts (each client keeps at
    least one training example; clients with one example have no test examples)."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in [0, 1)")
    xs_tr, ys_tr, xs_te, ys_te = [], [], [], []
    for k in range(pop.num_clients):
        nk = int(pop.n[k])
        perm = rng.permutation(nk)
        n_test = min(int(round(test_fraction * nk)), nk - 1)
        te, tr = perm[:n_test], perm[n_test:]
        xs_tr.append(pop.x[k, tr]); ys_tr.append(pop.y[k, tr])
        xs_te.append(pop.x[k, te]); ys_te.append(pop.y[k, te])
    return (from_ragged(xs_tr, ys_tr, client_ids=pop.client_ids),
            from_ragged(xs_te, ys_te, client_ids=pop.client_ids, allow_empty=True))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 (a bijective, well-mixed hash)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def split_clients(pop: Population, test_fraction: float,
                  seed: int) -> tuple[Population, Population]:
    """Holds out whole clients: client k is a test client iff a hash of (seed, its id) is
    below ``test_fraction`` -- a decision that depends on nothing but the client's own id,
    so adding, removing or changing other clients never moves it (what a user-level DP
    run needs: its test data is disjoint from the training population). At least one
    client stays in training."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in [0, 1)")
    ids = pop.client_ids.astype(np.uint64)
    u = _splitmix64(_splitmix64(np.full(ids.shape, seed, np.uint64)) ^ ids)
    test = (u >> np.uint64(11)).astype(np.float64) / 2.0 ** 53 < test_fraction
    if test.all():
        test[np.argmax(u)] = False
    return pop.gather(np.flatnonzero(~test)), pop.gather(np.flatnonzero(test))


def check_cohort_size(pop: Population, clients_per_round: int) -> None:
    if clients_per_round < 1:
        raise ValueError(f"clients_per_round={clients_per_round} must be at least 1")
    if clients_per_round > pop.num_clients:
        raise ValueError(f"clients_per_round={clients_per_round} is larger than the "
                         f"population ({pop.num_clients} clients)")


def sample_cohort(rng: np.random.Generator, num_clients: int, cohort_size: int) -> np.ndarray:
    """Host-side uniform sampling without replacement (the engine samples on device;
    this is for host-resident populations and for tests)."""
    if cohort_size > num_clients:
        raise ValueError(f"cohort size {cohort_size} exceeds the population ({num_clients})")
    return rng.choice(num_clients, size=cohort_size, replace=False)


def choose_attackers(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """bool[K]: a fixed, seeded subset of round(fraction * K) Byzantine clients."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"attack fraction={fraction} must be in [0, 1]")
    rng = np.random.default_rng([seed, 7])
    mask = np.zeros(num_clients, bool)
    mask[rng.choice(num_clients, int(round(fraction * num_clients)), replace=False)] = True
    return mask


def flip_labels(pop: Population, clients: np.ndarray, num_classes: int) -> Population:
    """Label-flipping attack: clients (bool[K]) train on ``num_classes - 1 - y``."""
    y = np.where(clients[:, None] & pop.mask, num_classes - 1 - pop.y, pop.y).astype(np.int32)
    return Population(pop.x, y, pop.n, pop.client_ids)
