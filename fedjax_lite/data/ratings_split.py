"""Splitting ratings per user, re-indexing users and items, padding (NumPy only).

Re-indexing is defined by the TRAIN part: train users become rows 0..U-1 in increasing
source id, train items become 0..I-1 in increasing source id (``item_ids``). A test rating
whose item never occurs in train cannot be scored by a model trained on train: it is dropped
and counted (``unseen_test_items``).

Splits (per user, :func:`split_ratings`):
  random         a seeded ``round(test_fraction * n_u)`` of each user's ratings;
  temporal       each user's latest ``round(test_fraction * n_u)`` by timestamp;
  leave_one_out  each user's latest rating (He et al., "Neural Collaborative Filtering",
                 WWW 2017, section 4.1);
in all three a user keeps at least one training rating (a user with a single rating has no
test rating); among equal timestamps the later row of the source counts as later.
``heldout_users`` additionally removes whole users, each chosen by a hash of (seed, user
id) so the choice of one user never depends on the others; their ratings go to ``heldout``
(for evaluation by reconstruction, e.g. Federated Reconstruction). Predefined splits (ml-100k's
``u1.base`` / ``u1.test``) go through :func:`ratings_from_train_test`.

Everything is vectorized (sorts and scatters, no loop over users or ratings).
"""

from __future__ import annotations

import numpy as np

from fedjax_lite.data.population import _splitmix64
from fedjax_lite.data.ratings import (FlatRatings, Ratings, RatingsSplit, check_flat,
                                      find_duplicate)

SPLIT_KINDS = ("random", "temporal", "leave_one_out")

# Dense padding costs num_users x max(n) cells (16 bytes each with timestamps); above this
# many cells a split refuses and suggests ``max_user_ratings`` instead of exhausting memory.
MAX_PADDED_CELLS = 400_000_000


# --------------------------------------------------------------------------- indexing


def _dense_index(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique ids, index of each id in them); a table lookup when ids are small."""
    if len(ids) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    top = int(ids.max())
    if top < 4 * len(ids) + (1 << 20):
        present = np.zeros(top + 1, bool)
        present[ids] = True
        dense = np.cumsum(present) - 1
        return np.flatnonzero(present).astype(np.int64), dense[ids]
    uniq, inv = np.unique(ids, return_inverse=True)
    return uniq.astype(np.int64, copy=False), inv.astype(np.int64, copy=False)


def _lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Index of each of ``ids`` in ``sorted_ids``, -1 where absent."""
    if len(sorted_ids) == 0:
        return np.full(len(ids), -1, np.int64)
    pos = np.searchsorted(sorted_ids, ids).clip(0, len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1).astype(np.int64)


def _positions(group: np.ndarray, key: np.ndarray | None = None) -> np.ndarray:
    """pos[r]: the rank of entry r within its group, ordered by the integer ``key``
    (ascending; ties, or no key, in entry order)."""
    if len(group) == 0:
        return np.zeros(0, np.int64)
    if key is None:
        order = np.argsort(group, kind="stable")
    else:
        key = key.astype(np.int64, copy=False) - key.min()
        span = int(key.max()) + 1
        if int(group.max()) < (2 ** 62) // span:  # one int64 key: a single stable sort
            order = np.argsort(group * span + key, kind="stable")
        else:
            order = np.lexsort((key, group))
    g = group[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    pos = np.empty(len(g), np.int64)
    pos[order] = np.arange(len(g)) - run_start
    return pos


def _stack(row: np.ndarray, item: np.ndarray, rating: np.ndarray,
           timestamp: np.ndarray | None, user_ids: np.ndarray, num_items: int,
           scale: tuple[float, float], what: str, keep_timestamps: bool = True) -> Ratings:
    """Pads flat ratings (dense ``row`` per user) into a :class:`Ratings`, chronological
    within a row when timestamps are known."""
    num_rows = len(user_ids)
    n = np.bincount(row, minlength=num_rows).astype(np.int32)
    width = max(int(n.max()) if num_rows else 0, 1)
    if num_rows * width > MAX_PADDED_CELLS:
        raise ValueError(
            f"{what}: padding {num_rows} users to the largest user's {width} ratings needs "
            f"{num_rows * width:,} cells (~{num_rows * width * 16 / 2**30:.1f} GiB); pass "
            "max_user_ratings to cap each user's ratings")
    flat_pos = row * width + (_positions(row, timestamp) if timestamp is not None
                              else _positions(row))
    items = np.zeros(num_rows * width, np.int32)
    ratings = np.zeros(num_rows * width, np.float32)
    items[flat_pos] = item
    ratings[flat_pos] = rating
    items, ratings = items.reshape(num_rows, width), ratings.reshape(num_rows, width)
    ts = None
    if timestamp is not None and keep_timestamps:
        ts = np.zeros(num_rows * width, np.int64)
        ts[flat_pos] = timestamp
        ts = ts.reshape(num_rows, width)
    return Ratings(items, ratings, n, user_ids.astype(np.int64), int(num_items),
                   (float(scale[0]), float(scale[1])), ts)


def _heldout_users(user_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """bool per user: held out iff a hash of (seed, id) is below ``fraction``; at least one
    user stays."""
    if fraction <= 0 or len(user_ids) == 0:
        return np.zeros(len(user_ids), bool)
    h = _splitmix64(_splitmix64(np.full(user_ids.shape, seed, np.uint64) + np.uint64(0x5EED))
                    ^ user_ids.astype(np.uint64))
    held = (h >> np.uint64(11)).astype(np.float64) / 2.0 ** 53 < fraction
    if held.all():
        held[np.argmax(h)] = False
    return held


def _assemble(train: FlatRatings, test: FlatRatings, heldout: FlatRatings | None,
              capped: int = 0, keep_timestamps: bool = True) -> RatingsSplit:
    """Re-indexes users and items from ``train``, drops unseen test users/items (counted)
    and pads every part."""
    src, scale = train.source, train.scale
    if train.num_ratings == 0:
        raise ValueError(f"{src}: no training ratings left after splitting")
    user_ids, tr_row = _dense_index(train.user)
    item_ids, tr_item = _dense_index(train.item)
    tr = _stack(tr_row, tr_item, train.rating, train.timestamp, user_ids, len(item_ids),
                scale, f"{src} (train)", keep_timestamps)
    te_row, te_item = _lookup(user_ids, test.user), _lookup(item_ids, test.item)
    no_user = te_row < 0
    no_item = (te_item < 0) & ~no_user
    keep = ~(no_user | no_item)
    te = _stack(te_row[keep], te_item[keep], test.rating[keep],
                None if test.timestamp is None else test.timestamp[keep], user_ids,
                len(item_ids), scale, f"{src} (test)", keep_timestamps)
    held, unseen_held = None, 0
    if heldout is not None and heldout.num_ratings:
        h_item = _lookup(item_ids, heldout.item)
        ok = h_item >= 0
        unseen_held = int((~ok).sum())
        h_ids, h_row = _dense_index(heldout.user[ok])
        held = None if not ok.any() else _stack(h_row, h_item[ok], heldout.rating[ok],
                      None if heldout.timestamp is None else heldout.timestamp[ok], h_ids,
                      len(item_ids), scale, f"{src} (held-out users)", keep_timestamps)
    return RatingsSplit(tr, te, item_ids, int(no_item.sum()), held,
                        unseen_test_users=int(no_user.sum()),
                        unseen_heldout_items=unseen_held, capped_ratings=int(capped))


# --------------------------------------------------------------------------- splits


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{name}={value} must be in [0, 1)")


def _check_no_duplicates(flat: FlatRatings) -> None:
    dup = find_duplicate(flat.user, flat.item)
    if dup is not None:
        a, b = dup
        raise ValueError(f"{flat.source}: user {flat.user[a]} rated item {flat.item[a]} "
                         f"twice (rows {a} and {b}); each (user, item) pair must be unique")


def split_ratings(flat: FlatRatings, kind: str = "random", *, test_fraction: float = 0.2,
                  seed: int = 0, heldout_users: float = 0.0,
                  max_user_ratings: int | None = None, check_duplicates: bool = True,
                  keep_timestamps: bool = True) -> RatingsSplit:
    """Splits each user's ratings into train and test (see the module docstring).

    Args:
      flat: all ratings.
      kind: 'random' | 'temporal' | 'leave_one_out' (the last two need timestamps).
      test_fraction: per-user test share for 'random' and 'temporal'.
      seed: drives the random split, the cap and the held-out users.
      heldout_users: expected fraction of whole users moved to ``heldout``.
      max_user_ratings: if given, a user with more ratings keeps a seeded uniform subset of
        this many (dropped ones counted in ``capped_ratings``), to bound the padding.
      check_duplicates: refuse repeated (user, item) pairs (loaders check them first, with
        line numbers, and pass False).
      keep_timestamps: keep timestamps in the returned :class:`Ratings` (False halves their
        memory; the split itself still uses them).

    Returns:
      A :class:`RatingsSplit` whose users are every non-held-out user.
    """
    check_flat(flat)
    if kind not in SPLIT_KINDS:
        raise ValueError(f"{flat.source}: unknown split {kind!r}; expected one of "
                         f"{', '.join(SPLIT_KINDS)}")
    _check_fraction("test_fraction", test_fraction)
    _check_fraction("heldout_users", heldout_users)
    if kind != "random" and flat.timestamp is None:
        raise ValueError(f"{flat.source}: a {kind} split needs timestamps, and these ratings "
                         "have none")
    if max_user_ratings is not None and max_user_ratings < 1:
        raise ValueError(f"max_user_ratings={max_user_ratings} must be at least 1")
    if flat.num_ratings == 0:
        raise ValueError(f"{flat.source}: no ratings")
    if check_duplicates:
        _check_no_duplicates(flat)
    rng = np.random.default_rng([seed, 0x5B17])
    user_ids, row = _dense_index(flat.user)
    capped = 0
    if max_user_ratings is not None:
        keep = _positions(row, rng.integers(0, 2 ** 31, flat.num_ratings)) < max_user_ratings
        capped = int((~keep).sum())
        if capped:
            flat = flat.select(keep)
            row = row[keep]
    counts = np.bincount(row, minlength=len(user_ids))
    if kind == "random":
        pos = _positions(row, rng.integers(0, 2 ** 31, flat.num_ratings))
    else:  # latest first; among equal timestamps the later row counts as later
        pos = counts[row] - 1 - _positions(row, flat.timestamp)
    if kind == "leave_one_out":
        n_test = (counts >= 2).astype(np.int64)
    else:
        n_test = np.minimum(np.floor(test_fraction * counts + 0.5).astype(np.int64),
                            counts - 1)
    is_test = pos < n_test[row]
    held = _heldout_users(user_ids, heldout_users, seed)[row]
    return _assemble(flat.select(~is_test & ~held), flat.select(is_test & ~held),
                     flat.select(held) if held.any() else None, capped, keep_timestamps)


def ratings_from_train_test(train: FlatRatings, test: FlatRatings, *,
                            heldout_users: float = 0.0, seed: int = 0,
                            check_duplicates: bool = True) -> RatingsSplit:
    """A predefined split (e.g. ml-100k's ``u1.base`` / ``u1.test``) as a
    :class:`RatingsSplit`; ``heldout_users`` moves whole users (both parts) to ``heldout``.
    A (user, item) pair in both parts is refused: it would leak test ratings."""
    check_flat(train)
    check_flat(test)
    _check_fraction("heldout_users", heldout_users)
    if tuple(train.scale) != tuple(test.scale):
        raise ValueError(f"{train.source} has scale {train.scale} but {test.source} has "
                         f"{test.scale}")
    if check_duplicates:
        _check_no_duplicates(train)
        _check_no_duplicates(test)
        both = FlatRatings(np.r_[train.user, test.user], np.r_[train.item, test.item],
                           np.r_[train.rating, test.rating], train.scale)
        dup = find_duplicate(both.user, both.item)
        if dup is not None:
            a, b = dup
            raise ValueError(f"user {both.user[a]} rated item {both.item[a]} in both "
                             f"{train.source} (row {a}) and {test.source} (row "
                             f"{b - train.num_ratings}): train and test must be disjoint")
    if heldout_users > 0:
        all_ids = np.unique(np.r_[train.user, test.user])
        held_ids = all_ids[_heldout_users(all_ids, heldout_users, seed)]
        h_tr, h_te = np.isin(train.user, held_ids), np.isin(test.user, held_ids)
        if h_tr.any() or h_te.any():
            heldout = FlatRatings(
                np.r_[train.user[h_tr], test.user[h_te]],
                np.r_[train.item[h_tr], test.item[h_te]],
                np.r_[train.rating[h_tr], test.rating[h_te]], train.scale,
                None if train.timestamp is None or test.timestamp is None else
                np.r_[train.timestamp[h_tr], test.timestamp[h_te]], train.source)
            return _assemble(train.select(~h_tr), test.select(~h_te), heldout)
    return _assemble(train, test, None)
