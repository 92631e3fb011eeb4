"""Tests for fedjax_lite.data.ratings (the per-user padded layout) and
fedjax_lite.data.ratings_split (splits, re-indexing, padding).

The invariants are checked against an independent reference written with Python sets and
dicts over (user, item) pairs in the source ids.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedjax_lite.data import ratings_split as split_module
from fedjax_lite.data.ratings import FlatRatings, Ratings, RatingsSplit, find_duplicate
from fedjax_lite.data.ratings_split import ratings_from_train_test, split_ratings


def _flat(num_users=6, num_items=15, density=0.6, seed=0, timestamps=True,
          user_offset=100, item_offset=1000):
    """Random unique (user, item) pairs with sparse source ids, ratings 1..5."""
    rng = np.random.default_rng(seed)
    pairs = [(u, i) for u in range(num_users) for i in range(num_items)
             if rng.random() < density]
    rng.shuffle(pairs)
    u = np.array([p[0] for p in pairs], np.int64) * 7 + user_offset
    i = np.array([p[1] for p in pairs], np.int64) * 3 + item_offset
    r = rng.integers(1, 6, len(pairs)).astype(np.float32)
    t = rng.integers(0, 10 ** 6, len(pairs)) if timestamps else None
    return FlatRatings(u, i, r, (1.0, 5.0), t, "test-data")


def _triples(part: Ratings, item_ids: np.ndarray) -> dict:
    """{(source user, source item): (rating, timestamp or None)} of a split part."""
    out = {}
    for row in range(part.num_users):
        for j in range(part.n[row]):
            key = (int(part.user_ids[row]), int(item_ids[part.item[row, j]]))
            assert key not in out
            ts = None if part.timestamp is None else int(part.timestamp[row, j])
            out[key] = (float(part.rating[row, j]), ts)
    return out


def _check_split(flat: FlatRatings, split: RatingsSplit, kind: str, fraction: float):
    """Independent reference for every invariant of split_ratings."""
    src = {(int(u), int(i)): (float(r), None if flat.timestamp is None else int(t))
           for u, i, r, t in zip(flat.user, flat.item, flat.rating,
                                 flat.timestamp if flat.timestamp is not None
                                 else [None] * flat.num_ratings)}
    train = _triples(split.train, split.item_ids)
    test = _triples(split.test, split.item_ids)
    held = {} if split.heldout is None else _triples(split.heldout, split.item_ids)
    # Disjoint, and everything is accounted for.
    assert not set(train) & set(test) and not set(held) & (set(train) | set(test))
    assert len(train) + len(test) + len(held) + split.unseen_test_items + \
        split.unseen_heldout_items + split.capped_ratings == len(src)
    for part in (train, test, held):  # ratings and timestamps travel with their pair
        for key, value in part.items():
            assert src[key] == value
    # Re-indexing: rows are the train users in increasing id, items the train items.
    train_users = sorted({u for u, _ in train})
    assert split.train.user_ids.tolist() == train_users
    assert split.test.user_ids.tolist() == train_users
    assert split.item_ids.tolist() == sorted({i for _, i in train})
    assert split.train.num_items == split.test.num_items == len(split.item_ids)
    assert (split.train.n >= 1).all()
    held_users = set() if split.heldout is None else set(split.heldout.user_ids.tolist())
    assert not held_users & set(train_users)
    gone = {u for u, _ in src} - set(train_users)  # held out (some with only unseen items)
    assert held_users <= gone
    assert sum(1 for u, _ in src if u in gone) == len(held) + split.unseen_heldout_items
    # Per user: how many test ratings and which ones.
    by_user = {}
    for (u, i), (r, t) in src.items():
        by_user.setdefault(u, []).append((t, i))
    dropped = 0
    for u, rated in by_user.items():
        if u in gone or split.capped_ratings:
            continue
        n_u = len(rated)
        in_test = {i for (uu, i) in test if uu == u}
        unseen = {i for _, i in rated if (u, i) not in train and (u, i) not in test}
        dropped += len(unseen)
        expected = (1 if n_u >= 2 else 0) if kind == "leave_one_out" else \
            min(int(np.floor(fraction * n_u + 0.5)), n_u - 1)
        assert len(in_test) + len(unseen) == expected
        if kind in ("temporal", "leave_one_out") and expected:
            train_times = [t for t, i in rated if (u, i) in train]
            test_times = [t for t, i in rated if i in in_test or i in unseen]
            assert min(test_times) >= max(train_times)
        for i in unseen:  # dropped only because the item has no training rating
            assert i not in split.item_ids
    if not split.capped_ratings:
        assert dropped == split.unseen_test_items


# --------------------------------------------------------------------------- Ratings


def test_ratings_layout_mask_arrays_gather():
    split = split_ratings(_flat(), "random", test_fraction=0.25, seed=3)
    tr = split.train
    assert tr.item.dtype == np.int32 and tr.rating.dtype == np.float32
    assert tr.n.dtype == np.int32 and tr.user_ids.dtype == np.int64
    assert tr.timestamp.dtype == np.int64 and tr.item.shape == tr.timestamp.shape
    assert tr.item.shape == (tr.num_users, tr.n.max())
    assert tr.num_ratings == tr.n.sum() == tr.mask.sum()
    assert (tr.item[~tr.mask] == 0).all() and (tr.rating[~tr.mask] == 0).all()
    arrays = tr.arrays()
    assert set(arrays) == {"x", "y", "n"} and arrays["x"] is tr.item
    sub = tr.gather(np.array([2, 0]))
    np.testing.assert_array_equal(sub.user_ids, tr.user_ids[[2, 0]])
    np.testing.assert_array_equal(sub.item, tr.item[[2, 0]])
    assert sub.num_items == tr.num_items and sub.scale == tr.scale == (1.0, 5.0)
    rows, items, ratings = tr.flat()
    assert len(rows) == tr.num_ratings
    np.testing.assert_array_equal(ratings, tr.rating[tr.mask])
    assert split.num_users == tr.num_users and split.num_items == tr.num_items
    with pytest.raises(ValueError, match="inconsistent shapes"):
        Ratings(tr.item, tr.rating[:, :1], tr.n, tr.user_ids, 3, (1.0, 5.0))


def test_rows_are_chronological():
    split = split_ratings(_flat(seed=1), "random", seed=0)
    for part in (split.train, split.test):
        for u in range(part.num_users):
            t = part.timestamp[u, :part.n[u]]
            assert (np.diff(t) >= 0).all()


# --------------------------------------------------------------------------- splits


@pytest.mark.parametrize("kind", ["random", "temporal", "leave_one_out"])
def test_split_invariants(kind):
    flat = _flat(num_users=12, num_items=30, density=0.4, seed=5)
    split = split_ratings(flat, kind, test_fraction=0.3, seed=1)
    _check_split(flat, split, kind, 0.3)
    assert split.heldout is None and split.test.num_ratings > 0


def test_random_split_depends_on_seed_only():
    flat = _flat(num_users=10, num_items=40, seed=2)
    a = split_ratings(flat, "random", seed=4)
    b = split_ratings(flat, "random", seed=4)
    c = split_ratings(flat, "random", seed=5)
    np.testing.assert_array_equal(a.test.item, b.test.item)
    assert not np.array_equal(a.test.item, c.test.item)


def test_leave_one_out_takes_the_latest_and_breaks_ties_by_source_order():
    u = np.array([1, 1, 1, 2, 2, 2, 3])
    i = np.array([10, 11, 12, 10, 11, 12, 11])
    t = np.array([5, 9, 1, 7, 7, 3, 4])  # user 2: items 10 and 11 tie at t=7
    flat = FlatRatings(u, i, np.full(7, 3.0, np.float32), (1.0, 5.0), t)
    split = split_ratings(flat, "leave_one_out")
    assert split.train.user_ids.tolist() == [1, 2, 3]
    test_items = split.item_ids[split.test.item[:, 0]]
    assert split.test.n.tolist() == [1, 1, 0]  # user 3 has a single rating: no test
    assert test_items[:2].tolist() == [11, 11]  # user 1: t=9; user 2: the later of the tie
    assert split.unseen_test_items == 0


def test_temporal_split_takes_each_users_latest_fraction():
    u = np.repeat([5, 8], 10)
    i = np.r_[np.arange(10), np.arange(10)]
    t = np.r_[1000 - 10 * np.arange(10), 10 * np.arange(10)]  # latest: 0,1,2 and 7,8,9
    flat = FlatRatings(u, i, np.ones(20, np.float32), (1.0, 5.0), t)
    split = split_ratings(flat, "temporal", test_fraction=0.3)
    assert split.test.n.tolist() == [3, 3] and split.unseen_test_items == 0
    test_items = split.item_ids[split.test.item]
    assert sorted(test_items[0]) == [0, 1, 2] and sorted(test_items[1]) == [7, 8, 9]
    _check_split(flat, split, "temporal", 0.3)


def test_unseen_test_items_are_dropped_and_counted():
    # Items 90 and 91 are each rated once, as their user's latest rating.
    u = np.array([1, 1, 1, 2, 2, 2, 3, 3])
    i = np.array([10, 11, 90, 10, 11, 91, 10, 11])
    t = np.array([1, 2, 3, 1, 2, 3, 1, 2])
    flat = FlatRatings(u, i, np.full(8, 4.0, np.float32), (1.0, 5.0), t)
    split = split_ratings(flat, "leave_one_out")
    assert split.unseen_test_items == 2
    assert split.item_ids.tolist() == [10, 11]
    assert split.test.n.tolist() == [0, 0, 1]
    _check_split(flat, split, "leave_one_out", 0.0)


def test_heldout_users_are_whole_users_chosen_by_id():
    flat = _flat(num_users=40, num_items=20, seed=7)
    split = split_ratings(flat, "random", test_fraction=0.2, seed=3, heldout_users=0.3)
    assert split.heldout is not None and 0 < split.heldout.num_users < 40
    _check_split(flat, split, "random", 0.2)
    assert split.heldout.num_items == split.num_items
    # The choice of a user depends only on (seed, its id): dropping other users keeps it.
    keep = np.isin(flat.user, split.heldout.user_ids[:3]) | np.isin(
        flat.user, split.train.user_ids[:5])
    sub = split_ratings(flat.select(keep), "random", seed=3, heldout_users=0.3)
    assert sub.heldout.user_ids.tolist() == split.heldout.user_ids[:3].tolist()


def test_max_user_ratings_caps_each_user():
    flat = _flat(num_users=5, num_items=40, density=0.8, seed=1)
    split = split_ratings(flat, "random", test_fraction=0.25, max_user_ratings=8)
    assert ((split.train.n + split.test.n) <= 8).all()
    per_user = np.bincount(np.unique(flat.user, return_inverse=True)[1])
    assert split.capped_ratings == int(np.maximum(per_user - 8, 0).sum())
    _check_split(flat, split, "random", 0.25)


def test_padding_guard_names_the_fix(monkeypatch):
    monkeypatch.setattr(split_module, "MAX_PADDED_CELLS", 10)
    with pytest.raises(ValueError, match="max_user_ratings"):
        split_ratings(_flat(), "random")


@given(st.integers(1, 8), st.integers(1, 12), st.floats(0.1, 1.0), st.integers(0, 50),
       st.sampled_from(["random", "temporal", "leave_one_out"]),
       st.floats(0.0, 0.9), st.sampled_from([0.0, 0.3]))
def test_property_split_invariants(num_users, num_items, density, seed, kind, fraction,
                                   heldout):
    flat = _flat(num_users, num_items, density, seed)
    if flat.num_ratings == 0:
        return
    flat = FlatRatings(flat.user, flat.item, flat.rating, flat.scale,
                       flat.timestamp // 10 ** 5, flat.source)  # many timestamp ties
    split = split_ratings(flat, kind, test_fraction=fraction, seed=seed,
                          heldout_users=heldout)
    _check_split(flat, split, kind, fraction)


# --------------------------------------------------------------------------- predefined


def test_train_test_files_are_reindexed_from_train():
    train = FlatRatings(np.array([1, 1, 2, 4]), np.array([7, 8, 7, 9]),
                        np.array([5, 4, 3, 2], np.float32), (1.0, 5.0),
                        np.array([1, 2, 3, 4]), "u1.base")
    test = FlatRatings(np.array([1, 2, 2, 3, 4]), np.array([9, 8, 6, 7, 7]),
                       np.array([1, 2, 3, 4, 5], np.float32), (1.0, 5.0),
                       np.array([5, 6, 7, 8, 9]), "u1.test")
    split = ratings_from_train_test(train, test)
    assert split.train.user_ids.tolist() == [1, 2, 4]
    assert split.item_ids.tolist() == [7, 8, 9]
    assert split.unseen_test_items == 1  # (2, 6): item 6 has no training rating
    assert split.unseen_test_users == 1  # (3, 7): user 3 has no training rating
    assert _triples(split.test, split.item_ids) == {(1, 9): (1.0, 5), (2, 8): (2.0, 6),
                                                    (4, 7): (5.0, 9)}
    held = ratings_from_train_test(train, test, heldout_users=0.5, seed=1)
    if held.heldout is not None:
        assert not set(held.heldout.user_ids) & set(held.train.user_ids)
    overlap = FlatRatings(np.array([2]), np.array([7]), np.array([1.0], np.float32),
                          (1.0, 5.0), None, "u1.test")
    with pytest.raises(ValueError, match="in both u1.base .* and u1.test"):
        ratings_from_train_test(train, overlap)


# --------------------------------------------------------------------------- errors


def test_find_duplicate():
    assert find_duplicate(np.array([1, 2, 3]), np.array([1, 1, 1])) is None
    assert find_duplicate(np.array([5, 1, 5, 5]), np.array([2, 2, 3, 2])) == (0, 3)


@pytest.mark.parametrize("change, message", [
    (dict(item=np.array([1, 2, 1, 4])), "user 0 rated item 1 twice \\(rows 0 and 2\\)"),
    (dict(rating=np.array([1, 2, 6, 4], np.float32)), "row 2: user 0 item 3: rating 6.0 "
     "outside the scale \\[1.0, 5.0\\]"),
    (dict(rating=np.array([1, np.nan, 3, 4], np.float32)), "row 1: .* rating nan"),
    (dict(user=np.array([0, -1, 0, 1])), "row 1: negative user id -1"),
    (dict(user=np.array([0, 0, 1])), "expected 1-D arrays of one length"),
    (dict(item=np.array([1.0, 2.0, 3.0, 4.0])), "'item' must be integers"),
    (dict(scale=(5.0, 1.0)), "scale \\(5.0, 1.0\\) must be \\(min, max\\) with min < max"),
])
def test_flat_validation_errors(change, message):
    base = dict(user=np.array([0, 0, 0, 1]), item=np.array([1, 2, 3, 4]),
                rating=np.array([1, 2, 3, 4], np.float32), scale=(1.0, 5.0),
                timestamp=np.arange(4), source="mine.csv")
    base.update(change)
    with pytest.raises(ValueError, match="mine.csv: " + message):
        split_ratings(FlatRatings(**base), "random")


def test_split_argument_errors():
    flat = _flat()
    with pytest.raises(ValueError, match="unknown split 'chrono'.*random, temporal, "
                                         "leave_one_out"):
        split_ratings(flat, "chrono")
    with pytest.raises(ValueError, match="test_fraction=1.0 must be in \\[0, 1\\)"):
        split_ratings(flat, "random", test_fraction=1.0)
    with pytest.raises(ValueError, match="heldout_users=-0.1"):
        split_ratings(flat, "random", heldout_users=-0.1)
    with pytest.raises(ValueError, match="max_user_ratings=0"):
        split_ratings(flat, "random", max_user_ratings=0)
    no_time = _flat(timestamps=False)
    with pytest.raises(ValueError, match="a temporal split needs timestamps"):
        split_ratings(no_time, "temporal")
    split = split_ratings(no_time, "random")  # random needs none
    assert split.train.timestamp is None
