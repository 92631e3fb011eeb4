"""Explicit ratings as federated data: one user is one client.

NumPy only (never imports JAX). Ratings arrive as flat ``(user, item, rating[,
timestamp])`` arrays keyed by the source's ids (:class:`FlatRatings`, from a loader or a
generator); a split (``ratings_split.split_ratings``) turns them into per-user padded rows
(:class:`Ratings`) that the engine consumes like a cohort:

    item    int32  [U, N]   dense item index 0..num_items-1 (0 in padding)
    rating  float32[U, N]   ratings on the source's scale (0 in padding)
    n       int32  [U]      real ratings per user

Row u of ``train`` and of ``test`` in a :class:`RatingsSplit` is the same user, and every
part shares one dense item index (``item_ids`` maps it back to the source's ids). Within a
row, ratings are in chronological order when timestamps are known (ties: source order),
else in source order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FlatRatings:
    """Ratings as flat arrays, one entry per rating, users and items by their source ids.

    Attributes:
      user: int64[R] source user ids (non-negative).
      item: int64[R] source item ids (non-negative).
      rating: float32[R] ratings on ``scale``.
      scale: (min, max) rating of the source.
      timestamp: int64[R] seconds since the epoch, or None.
      source: what to call the data in error messages (a file name).
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    scale: tuple[float, float]
    timestamp: np.ndarray | None = None
    source: str = "ratings"

    @property
    def num_ratings(self) -> int:
        return int(len(self.rating))

    def select(self, rows: np.ndarray) -> "FlatRatings":
        """The ratings at ``rows`` (indices or a boolean mask), same scale and source."""
        ts = None if self.timestamp is None else self.timestamp[rows]
        return FlatRatings(self.user[rows], self.item[rows], self.rating[rows], self.scale,
                           ts, self.source)


@dataclass(frozen=True)
class Ratings:
    """One split (train, test or held-out) of a ratings dataset, one padded row per user.

    Attributes:
      item: int32[U, N] dense item index, user u's real ratings in ``item[u, :n[u]]``.
      rating: float32[U, N] ratings on ``scale`` (0 in padding).
      n: int32[U] real ratings per user (0 allowed in test splits).
      user_ids: int64[U] the users' source ids.
      num_items: size of the dense item index (shared by train, test and held-out).
      scale: (min, max) rating.
      timestamp: int64[U, N] rating times (0 in padding), when the source has them.
    """

    item: np.ndarray
    rating: np.ndarray
    n: np.ndarray
    user_ids: np.ndarray
    num_items: int
    scale: tuple[float, float]
    timestamp: np.ndarray | None = None

    def __post_init__(self):
        u, w = self.item.shape
        if self.rating.shape != (u, w) or self.n.shape != (u,) or self.user_ids.shape != (u,):
            raise ValueError(f"Ratings: inconsistent shapes item {self.item.shape}, rating "
                             f"{self.rating.shape}, n {self.n.shape}, user_ids "
                             f"{self.user_ids.shape}")
        if self.timestamp is not None and self.timestamp.shape != (u, w):
            raise ValueError(f"Ratings: timestamp shape {self.timestamp.shape} != {(u, w)}")

    @property
    def num_users(self) -> int:
        return int(self.item.shape[0])

    @property
    def num_ratings(self) -> int:
        return int(self.n.sum())

    # the engine's names (each user is one client, each rating one example)
    num_clients = num_users
    num_examples = num_ratings

    @property
    def mask(self) -> np.ndarray:
        """bool[U, N]: True for real ratings."""
        return np.arange(self.item.shape[1])[None, :] < self.n[:, None]

    def arrays(self) -> dict[str, np.ndarray]:
        """What the engine consumes: ``{'x': item, 'y': rating, 'n': n}``."""
        return {"x": self.item, "y": self.rating, "n": self.n}

    def gather(self, rows: np.ndarray) -> "Ratings":
        """The users at ``rows`` (array indexing, no loop over users)."""
        rows = np.asarray(rows)
        ts = None if self.timestamp is None else self.timestamp[rows]
        return Ratings(self.item[rows], self.rating[rows], self.n[rows], self.user_ids[rows],
                       self.num_items, self.scale, ts)

    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row int64[R], item int64[R], rating float32[R]) of the real ratings, row-major."""
        mask = self.mask
        rows = np.broadcast_to(np.arange(self.num_users)[:, None], mask.shape)[mask]
        return rows.astype(np.int64), self.item[mask].astype(np.int64), self.rating[mask]


@dataclass(frozen=True)
class RatingsSplit:
    """Train and test ratings of the same users, on one dense item index.

    Attributes:
      train: every user with at least one training rating, one row each.
      test: row u holds the test ratings of ``train``'s user u (n may be 0).
      item_ids: int64[num_items] source id of each dense item index.
      unseen_test_items: test ratings dropped because their item has no train rating.
      heldout: users absent from train entirely (all their ratings on known items), or None.
      unseen_test_users: test ratings dropped because their user has no train rating
        (only predefined splits such as ml-100k's u1 can produce them).
      unseen_heldout_items: held-out ratings dropped because their item has no train rating.
      capped_ratings: ratings dropped by ``max_user_ratings`` before splitting.
    """

    train: Ratings
    test: Ratings
    item_ids: np.ndarray
    unseen_test_items: int
    heldout: Ratings | None = None
    unseen_test_users: int = 0
    unseen_heldout_items: int = 0
    capped_ratings: int = 0

    @property
    def num_users(self) -> int:
        return self.train.num_users

    @property
    def num_items(self) -> int:
        return self.train.num_items

    @property
    def scale(self) -> tuple[float, float]:
        return self.train.scale


# --------------------------------------------------------------------------- validation


def check_flat(flat: FlatRatings) -> None:
    """Validates shapes, dtypes, ids and the rating scale; ValueError naming the source."""
    src = flat.source
    arrays = {"user": flat.user, "item": flat.item, "rating": flat.rating}
    if flat.timestamp is not None:
        arrays["timestamp"] = flat.timestamp
    lengths = {k: np.shape(v) for k, v in arrays.items()}
    if any(len(s) != 1 for s in lengths.values()) or len({s[0] for s in lengths.values()}) > 1:
        raise ValueError(f"{src}: expected 1-D arrays of one length, got shapes {lengths}")
    for k in ("user", "item") + (("timestamp",) if flat.timestamp is not None else ()):
        if not np.issubdtype(np.asarray(arrays[k]).dtype, np.integer):
            raise ValueError(f"{src}: '{k}' must be integers, got {np.asarray(arrays[k]).dtype}")
    for k in ("user", "item"):
        if len(arrays[k]) and arrays[k].min() < 0:
            r = int(np.argmax(arrays[k] < 0))
            raise ValueError(f"{src}: row {r}: negative {k} id {arrays[k][r]}")
    lo, hi = flat.scale
    if not lo < hi:
        raise ValueError(f"{src}: scale {flat.scale} must be (min, max) with min < max")
    r = np.asarray(flat.rating)
    bad = ~np.isfinite(r) | (r < lo) | (r > hi)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{src}: row {i}: user {flat.user[i]} item {flat.item[i]}: rating "
                         f"{r[i]} outside the scale [{lo}, {hi}]")


def find_duplicate(user: np.ndarray, item: np.ndarray) -> tuple[int, int] | None:
    """Rows (a, b), a < b, holding the same (user, item) pair (the smallest such pair, its
    first two occurrences), or None when every pair is unique."""
    if len(user) < 2:
        return None
    span = int(item.max()) + 1
    if int(user.max()) < (2 ** 62) // span:  # one int64 key: a single stable sort
        order = np.argsort(user.astype(np.int64) * span + item, kind="stable")
    else:
        order = np.lexsort((item, user))  # stable: equal pairs stay in row order
    same = (user[order[1:]] == user[order[:-1]]) & (item[order[1:]] == item[order[:-1]])
    if not same.any():
        return None
    k = int(np.argmax(same))
    return int(order[k]), int(order[k + 1])
