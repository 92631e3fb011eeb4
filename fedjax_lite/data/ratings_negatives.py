"""Sampled negatives for ranking evaluation and implicit-feedback training (NumPy only).

A user's NEGATIVES are items the user rated in neither of the given parts (e.g. neither
train nor test): the unobserved items, treated as not relevant.

* :func:`sample_negatives` -- the leave-one-out protocol of He, Liao, Zhang, Nie, Hu and
  Chua, "Neural Collaborative Filtering", WWW 2017, Sec. 4.1: every held-out item of a user
  is ranked against ``num`` (99) items drawn uniformly from the items the user never
  rated. (Sampled metrics can rank models differently from full ranking -- Krichene and
  Rendle, "On Sampled Metrics for Item Recommendation", KDD 2020 -- so the evaluation also
  reports full ranking, :mod:`fedjax_lite.models.ranking`.)
* :func:`implicit_training` -- the implicit-feedback training set of the same paper
  (Sec. 3.1.1, "negative instances uniformly sampled from unobserved interactions", ratio
  4 there): each rating becomes a positive (label 1) and ``ratio`` unobserved items per
  positive become negatives (label 0), for a binary cross-entropy objective
  (``MatrixFactorization(objective="bce")``).

Sampling is exact -- a uniformly random subset of the user's unrated items, without
replacement -- and vectorized over chunks of users: a boolean [chunk, I] mask of the items
already rated or drawn, and rounds of rejection sampling (draw uniformly over all items,
keep the first occurrence of each unmasked item in draw order: sequential sampling without
replacement). Users for whom rejection would be slow (few unrated items left relative to
what they still need) get the rest by sorting random keys over their remaining items.
Deterministic in ``seed`` (for a fixed :data:`CHUNK_CELLS`).
"""

from __future__ import annotations

import numpy as np

from fedjax_lite.data.ratings import Ratings

CHUNK_CELLS = 1 << 25    # users per chunk = CHUNK_CELLS // num_items (32 MiB bool masks)
_ROUNDS = 4              # rejection rounds before the exact fallback


def _chunks(num_users: int, num_items: int):
    step = max(1, CHUNK_CELLS // max(num_items, 1))
    for lo in range(0, num_users, step):
        yield lo, min(lo + step, num_users)


def _rated_mask(parts: tuple, lo: int, hi: int, num_items: int) -> np.ndarray:
    """bool[hi - lo, I]: True where users lo..hi-1 rated the item in any of ``parts``."""
    mask = np.zeros((hi - lo, num_items), bool)
    for part in parts:
        real = np.arange(part.item.shape[1])[None, :] < part.n[lo:hi, None]
        rows = np.broadcast_to(np.arange(hi - lo)[:, None], real.shape)
        mask[rows[real], part.item[lo:hi][real]] = True
    return mask


def _first_occurrence(row: np.ndarray, cand: np.ndarray, num_items: int) -> np.ndarray:
    """bool[R]: True at the first occurrence (in array order) of each (row, cand) pair."""
    key = row.astype(np.int64) * num_items + cand
    order = np.argsort(key, kind="stable")
    sk = key[order]
    first = np.ones(len(key), bool)
    first[1:] = sk[1:] != sk[:-1]
    out = np.empty(len(key), bool)
    out[order] = first
    return out


def _place(out, filled, mask, row, value, take):
    """Appends ``value[take]`` (grouped by ``row``, in order) after each row's filled
    positions and marks the items in ``mask``."""
    row, value = row[take], value[take]
    starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    lengths = np.diff(np.r_[starts, len(row)])
    pos = filled[row] + np.arange(len(row)) - np.repeat(starts, lengths)
    out[row, pos] = value
    mask[row, value] = True
    filled += np.bincount(row, minlength=len(filled))


def _fill_distinct(mask: np.ndarray, counts: np.ndarray, rng: np.random.Generator
                   ) -> np.ndarray:
    """int32[C, max(counts)]: row c holds ``counts[c]`` distinct items, a uniformly random
    subset of the items unmasked in ``mask[c]`` (padding 0); marks them in ``mask``.
    Requires counts <= the unmasked items per row.

    Rounds of rejection sampling, ragged (row c draws about what it needs, scaled by its
    acceptance rate); a row whose expected draws exceed I / 4 (few items left), and any
    row still short after the last round, gets the rest by sorting random keys."""
    C, I = mask.shape
    out = np.zeros((C, int(counts.max(initial=0))), np.int32)
    filled = np.zeros(C, np.int64)
    avail = I - mask.sum(1)
    for rnd in range(_ROUNDS + 1):
        need = counts - filled
        draws = need * I / np.maximum(avail - filled, 1)       # expected draws to finish
        slow = (draws > I / 4) if rnd < _ROUNDS else np.ones(C, bool)
        exact = np.flatnonzero(slow & (need > 0))
        if len(exact):
            keys = rng.random((len(exact), I))
            keys[mask[exact]] = np.inf
            width = int(need[exact].max())
            pick = np.argsort(keys, axis=1)[:, :width].astype(np.int32)
            take = np.arange(width)[None, :] < need[exact][:, None]
            _place(out, filled, mask, np.repeat(exact, width), pick.ravel(), take.ravel())
        rows = np.flatnonzero(~slow & (need > 0))
        if not len(rows):
            break
        m = np.ceil(1.25 * draws[rows]).astype(np.int64) + 8
        row = np.repeat(rows, m)
        cand = rng.integers(0, I, len(row), dtype=np.int32)
        ok = ~mask[row, cand] & _first_occurrence(row, cand, I)
        cs = np.cumsum(ok)
        ends = np.cumsum(m)
        before = np.r_[0, cs[ends[:-1] - 1]]                   # accepted in earlier rows
        rank = cs - np.repeat(before, m)                       # 1-based within the row
        _place(out, filled, mask, row, cand, ok & (rank <= np.repeat(need[rows], m)))
    return out


def sample_negatives(train: Ratings, test: Ratings, num: int, seed: int) -> np.ndarray:
    """int32[U, num]: for each user u, ``num`` distinct items drawn uniformly without
    replacement from the items u rated in neither ``train`` nor ``test`` (He et al. 2017's
    99 negatives per held-out item). Row u of both is the same user.

    Raises ValueError naming the user (its source id) when it has fewer than ``num``
    unrated items."""
    if num < 0:
        raise ValueError(f"sample_negatives: num must be >= 0, got {num}")
    if test.num_users != train.num_users or test.num_items != train.num_items:
        raise ValueError(f"sample_negatives: train has {train.num_users} users x "
                         f"{train.num_items} items, test {test.num_users} x "
                         f"{test.num_items}")
    I, U = train.num_items, train.num_users
    rng = np.random.default_rng(seed)
    out = np.zeros((U, num), np.int32)
    for lo, hi in _chunks(U, I):
        mask = _rated_mask((train, test), lo, hi, I)
        avail = I - mask.sum(1)
        if (avail < num).any():
            u = lo + int(np.argmax(avail < num))
            raise ValueError(f"sample_negatives: user {train.user_ids[u]} has only "
                             f"{avail[u - lo]} unrated items of {I}, fewer than num={num}")
        out[lo:hi] = _fill_distinct(mask, np.full(hi - lo, num), rng)
    return out


def implicit_training(train: Ratings, ratio: int, seed: int,
                      exclude: Ratings | None = None) -> Ratings:
    """Implicit-feedback training data (He et al. 2017, Sec. 3.1.1): every training rating
    of a user becomes a positive (rating 1.0), plus ``ratio`` negatives per positive
    (rating 0.0): distinct items drawn uniformly from those the user rated in neither
    ``train`` nor ``exclude`` (pass the test split, so that no test item is ever trained
    as a negative), capped by how many such items exist.

    Returns Ratings with the same users and item index, scale (0, 1), no timestamps,
    n = positives + negatives; each user's slots are shuffled (from ``seed``) so that
    minibatches mix the two labels."""
    if ratio < 0:
        raise ValueError(f"implicit_training: ratio must be >= 0, got {ratio}")
    parts = (train,) if exclude is None else (train, exclude)
    if exclude is not None and (exclude.num_users != train.num_users
                                or exclude.num_items != train.num_items):
        raise ValueError(f"implicit_training: train has {train.num_users} users x "
                         f"{train.num_items} items, exclude {exclude.num_users} x "
                         f"{exclude.num_items}")
    I, U, N = train.num_items, train.num_users, train.item.shape[1]
    n = train.n.astype(np.int64)
    width = int((n + np.minimum(ratio * n, I - n)).max(initial=0))
    item = np.zeros((U, width), np.int32)
    label = np.zeros((U, width), np.float32)
    total = np.zeros(U, np.int32)
    rng = np.random.default_rng(seed)
    for lo, hi in _chunks(U, I):
        mask = _rated_mask(parts, lo, hi, I)
        counts = np.minimum(ratio * n[lo:hi], I - mask.sum(1))
        neg = _fill_distinct(mask, counts, rng)
        rows = np.concatenate([train.item[lo:hi], neg], axis=1)   # positives in [0, N)
        real = np.concatenate([np.arange(N)[None, :] < n[lo:hi, None],
                               np.arange(neg.shape[1])[None, :] < counts[:, None]], axis=1)
        total[lo:hi] = n[lo:hi] + counts
        w = min(width, real.shape[1])
        keys = np.where(real, rng.random(real.shape), np.inf)   # shuffle the real slots,
        order = np.argsort(keys, axis=1)[:, :w]                 # padding last
        keep = np.arange(w)[None, :] < total[lo:hi, None]
        item[lo:hi, :w] = np.where(keep, np.take_along_axis(rows, order, 1), 0)
        label[lo:hi, :w] = keep & (order < N)
    width = int(total.max(initial=0))
    return Ratings(item[:, :width], label[:, :width], total, train.user_ids, I, (0.0, 1.0))


__all__ = ["implicit_training", "sample_negatives"]
