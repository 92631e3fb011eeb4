"""scikit-learn's bundled 8x8 handwritten digits, partitioned over simulated clients.

``sklearn.datasets.load_digits``: 1797 grayscale 8x8 images of the digits 0-9 (pixel
values 0..16), shipped inside scikit-learn -- nothing is downloaded. Features are
float32[8, 8] scaled to [0, 1] (divided by 16), labels int 0..9.

``test_split="pooled"`` (the default): a stratified test split of ``test_fraction`` is
held out first (per class:
``round(test_fraction * count)`` examples chosen at random); it depends only on the
seed and ``test_fraction``, so every partition of the training part is evaluated on the
same examples. The test set is cut into clients of at most :data:`TEST_CLIENT_SIZE`
examples (evaluation is example-weighted, so how it is cut does not change the metric;
small clients keep the padded test arrays small). The training part is spread over
``num_clients`` clients by one of the partitioners of
:mod:`fedjax_lite.data.partition`.

``test_split="examples"``: all 1797 examples are partitioned over the clients, then each
client holds out ``round(test_fraction * n_k)`` of its own examples (keeping at least one
for training: :func:`~fedjax_lite.data.population.split_examples`), so test client k is
training client k's own distribution -- what personalized models (Ditto) are evaluated
on, and the usual held-out data of personalization benchmarks under label skew.
"""

from __future__ import annotations

import numpy as np

from fedjax_lite.data.partition import Seed, equal_sizes, partition
from fedjax_lite.data.population import Population, from_ragged, split_examples

NUM_CLASSES = 10
TEST_CLIENT_SIZE = 64


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(x float32[1797, 8, 8] in [0, 1], y int32[1797] in 0..9)."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float64) / 16.0).astype(np.float32)
    return x, np.asarray(bunch.target, dtype=np.int32)


def stratified_split(y: np.ndarray, test_fraction: float,
                     seed: Seed) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): every class contributes
    ``round(test_fraction * its count)`` random examples to the test part (both sorted)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        test.append(rng.choice(members, int(round(test_fraction * len(members))),
                               replace=False))
    test = np.sort(np.concatenate(test)).astype(np.int64)
    train = np.setdiff1d(np.arange(len(y)), test).astype(np.int64)
    if len(test) == 0:
        raise ValueError(f"test_fraction={test_fraction} leaves no test examples")
    return train, test


def federated_digits(*, num_clients: int, partition_kind: str = "iid",
                     test_fraction: float = 0.2, seed: int = 0, alpha: float = 0.5,
                     shards_per_client: int = 2, sigma: float = 1.0,
                     test_client_size: int = TEST_CLIENT_SIZE, test_split: str = "pooled"
                     ) -> tuple[Population, Population]:
    """(train, test) populations of the digits (see the module docstring).

    ``partition_kind`` and ``alpha`` / ``shards_per_client`` / ``sigma`` choose the
    partition of the training part; ``seed`` seeds the split (stream ``[seed, 0]``)
    and the partition (``[seed, 1]``) independently. Raises ValueError for an
    impossible request (e.g. more clients than training examples).
    """
    x, y = load_digits_arrays()
    if test_split == "pooled":
        train_idx, test_idx = stratified_split(y, test_fraction, [seed, 0])
        part_of = "sklearn_digits training part"
    elif test_split == "examples":       # every example is partitioned, then split
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
        train_idx, part_of = np.arange(len(y)), "sklearn_digits"
    else:
        raise ValueError(f"test_split must be 'pooled' or 'examples', got {test_split!r}")
    try:
        parts = partition(y[train_idx], num_clients, partition_kind, seed=[seed, 1],
                          alpha=alpha, shards_per_client=shards_per_client, sigma=sigma)
    except ValueError as e:
        raise ValueError(f"{part_of}: {e}") from None
    train = from_ragged([x[train_idx[p]] for p in parts], [y[train_idx[p]] for p in parts],
                        num_classes=NUM_CLASSES, source="sklearn_digits")
    if test_split == "examples":
        return split_examples(train, test_fraction, np.random.default_rng([seed, 3]))
    order = np.random.default_rng([seed, 2]).permutation(test_idx)
    pieces = -(-len(order) // test_client_size)
    test_parts = np.split(order, np.cumsum(equal_sizes(len(order), pieces))[:-1])
    test = from_ragged([x[p] for p in test_parts], [y[p] for p in test_parts],
                       num_classes=NUM_CLASSES, source="sklearn_digits (test)")
    return train, test
