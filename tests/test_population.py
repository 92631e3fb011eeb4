"""Tests for fedjax_lite.data (population stacking, validation, splits, synthetic, npz).

Host-side NumPy only: nothing here compiles anything, so these are fast.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedjax_lite.data import (Population, check_cohort_size, fedprox_synthetic, from_flat,
                              from_ragged, load_npz, sample_cohort, split_examples,
                              synthetic_logistic)


def _ragged(sizes, d=3, seed=0, num_classes=3):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, d)).astype(np.float32) for n in sizes]
    ys = [rng.integers(0, num_classes, size=n).astype(np.int32) for n in sizes]
    return xs, ys


# --------------------------------------------------------------------------- from_ragged


def test_from_ragged_round_trip_and_mask():
    sizes = [3, 1, 5, 2]
    xs, ys = _ragged(sizes)
    pop = from_ragged(xs, ys, client_ids=[10, 20, 30, 40], num_classes=3)

    assert isinstance(pop, Population)
    assert pop.num_clients == 4
    assert pop.max_examples == 5
    assert pop.feature_shape == (3,)
    assert pop.num_examples == sum(sizes)
    assert pop.x.dtype == np.float32 and pop.y.dtype == np.int32
    assert pop.n.dtype == np.int32 and pop.client_ids.dtype == np.int64
    np.testing.assert_array_equal(pop.n, sizes)
    np.testing.assert_array_equal(pop.client_ids, [10, 20, 30, 40])

    expected_mask = np.array([[j < n for j in range(5)] for n in sizes])
    assert pop.mask.dtype == bool
    np.testing.assert_array_equal(pop.mask, expected_mask)

    for k, n in enumerate(sizes):
        np.testing.assert_array_equal(pop.x[k, :n], xs[k])
        np.testing.assert_array_equal(pop.y[k, :n], ys[k])
        # padding is zero
        assert not pop.x[k, n:].any() and not pop.y[k, n:].any()

    arrays = pop.arrays()
    assert set(arrays) == {"x", "y", "n"}
    np.testing.assert_array_equal(arrays["x"], pop.x)

    sub = pop.gather(np.array([2, 0]))
    np.testing.assert_array_equal(sub.client_ids, [30, 10])
    np.testing.assert_array_equal(sub.n, [5, 3])
    np.testing.assert_array_equal(sub.x, pop.x[[2, 0]])


def test_from_ragged_default_ids_and_multidim_features():
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(n, 2, 2)).astype(np.float32) for n in (2, 4)]
    ys = [np.zeros(2, np.int64), np.ones(4, np.int64)]
    pop = from_ragged(xs, ys)
    np.testing.assert_array_equal(pop.client_ids, [0, 1])
    assert pop.x.shape == (2, 4, 2, 2) and pop.feature_shape == (2, 2)
    np.testing.assert_array_equal(pop.x[0, :2], xs[0])


def test_from_ragged_float_labels_that_are_integers_are_accepted():
    pop = from_ragged([np.zeros((2, 1))], [np.array([0.0, 1.0])], num_classes=2)
    np.testing.assert_array_equal(pop.y, [[0, 1]])
    assert pop.y.dtype == np.int32


def test_from_ragged_allow_empty():
    xs = [np.ones((2, 3), np.float32), np.zeros((0, 3), np.float32)]
    ys = [np.array([0, 1]), np.zeros(0, np.int32)]
    pop = from_ragged(xs, ys, allow_empty=True)
    np.testing.assert_array_equal(pop.n, [2, 0])
    np.testing.assert_array_equal(pop.mask, [[True, True], [False, False]])


# Validation: every message names the offending client's id (here 37, at position 2 so the
# test would notice an error naming the position instead of the id).

IDS = [5, 11, 37]


def _bad(cases_index, x_bad, y_bad):
    xs, ys = _ragged([2, 3, 4])
    xs[cases_index] = x_bad
    ys[cases_index] = y_bad
    return xs, ys


@pytest.mark.parametrize("what,x_bad,y_bad,kwargs,pattern", [
    ("nan feature",
     np.array([[0.0, 1.0, 2.0], [np.nan, 0.0, 0.0]]), np.array([0, 1]), {},
     r"client 37: non-finite feature .* example 1"),
    ("inf feature",
     np.array([[np.inf, 1.0, 2.0]]), np.array([0]), {},
     r"client 37: non-finite feature .* example 0"),
    ("-inf feature",
     np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [0.0, -np.inf, 0.0]]), np.array([0, 1, 1]),
     {}, r"client 37: non-finite feature .* example 2"),
    ("label too large",
     np.zeros((3, 3)), np.array([0, 3, 1]), {"num_classes": 3},
     r"client 37: label 3 of example 1 is out of range"),
    ("negative label",
     np.zeros((3, 3)), np.array([0, 1, -1]), {"num_classes": 3},
     r"client 37: label -1 of example 2 is out of range"),
    ("negative label, no num_classes",
     np.zeros((2, 3)), np.array([-2, 0]), {},
     r"client 37: label -2 of example 0 is out of range"),
    ("empty client",
     np.zeros((0, 3)), np.zeros(0, np.int32), {},
     r"client 37 has no examples"),
    ("mismatched lengths",
     np.zeros((3, 3)), np.array([0, 1]), {},
     r"client 37: features \(3, 3\) and labels \(2,\) do not match"),
    ("2-D labels",
     np.zeros((2, 3)), np.zeros((2, 1), np.int32), {},
     r"client 37: features .* and labels .* do not match"),
    ("feature shape differs",
     np.zeros((2, 4)), np.array([0, 1]), {},
     r"client 37: feature shape \(4,\) differs"),
    ("non-integer labels",
     np.zeros((2, 3)), np.array([0.5, 1.0]), {},
     r"client 37: labels must be integers"),
    ("non-numeric features",
     np.array([["a", "b", "c"]]), np.array([0]), {},
     r"client 37: features must be numeric"),
])
def test_from_ragged_validation_names_client_id(what, x_bad, y_bad, kwargs, pattern):
    xs, ys = _bad(2, x_bad, y_bad)
    with pytest.raises(ValueError, match=pattern):
        from_ragged(xs, ys, client_ids=IDS, source="mydata.npz", **kwargs)
    # and names the source
    with pytest.raises(ValueError, match=r"^mydata\.npz: "):
        from_ragged(xs, ys, client_ids=IDS, source="mydata.npz", **kwargs)


def test_from_ragged_structural_errors():
    xs, ys = _ragged([2, 3])
    with pytest.raises(ValueError, match="2 feature arrays but 1 label arrays"):
        from_ragged(xs, ys[:1])
    with pytest.raises(ValueError, match="no clients"):
        from_ragged([], [])
    with pytest.raises(ValueError, match="3 client ids for 2 clients"):
        from_ragged(xs, ys, client_ids=[1, 2, 3])


# --------------------------------------------------------------------------- from_flat


def test_from_flat_groups_by_client_id_preserving_order():
    rng = np.random.default_rng(3)
    client = np.array([7, 2, 7, 9, 2, 7, 9, 2, 2])
    x = rng.normal(size=(len(client), 2)).astype(np.float32)
    y = rng.integers(0, 4, size=len(client))
    pop = from_flat(x, y, client, num_classes=4)

    np.testing.assert_array_equal(pop.client_ids, [2, 7, 9])  # sorted unique ids
    for k, cid in enumerate(pop.client_ids):
        rows = np.flatnonzero(client == cid)  # original order within a client
        n = len(rows)
        assert pop.n[k] == n
        np.testing.assert_array_equal(pop.x[k, :n], x[rows])
        np.testing.assert_array_equal(pop.y[k, :n], y[rows])
    assert pop.max_examples == 4


def test_from_flat_errors():
    x = np.zeros((4, 2))
    y = np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="mismatched lengths"):
        from_flat(x, y[:3], np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="'client' must be a 1-D integer array"):
        from_flat(x, y, np.zeros(4, np.float32))
    bad_y = np.array([0, 1, 5, 0])
    with pytest.raises(ValueError, match=r"client 12: label 5 .*out of range"):
        from_flat(x, bad_y, np.array([3, 3, 12, 12]), num_classes=2)


# --------------------------------------------------------------------------- properties


@st.composite
def ragged_clients(draw):
    k = draw(st.integers(1, 5))
    d = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(1, 8), min_size=k, max_size=k))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    xs = []
    for j, n in enumerate(sizes):
        x = rng.normal(size=(n, d)).astype(np.float32)
        # make every example identifiable: column 0 = a global unique id
        x[:, 0] = 1000 * j + np.arange(n)
        xs.append(x)
    ys = [rng.integers(0, 5, size=n).astype(np.int32) for n in sizes]
    ids = draw(st.lists(st.integers(0, 10**6), min_size=k, max_size=k, unique=True))
    return xs, ys, ids


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ragged_clients())
def test_property_ragged_padded_unpadded_round_trip(data):
    xs, ys, ids = data
    pop = from_ragged(xs, ys, client_ids=ids, num_classes=5)
    assert pop.max_examples == max(len(y) for y in ys)
    for k in range(len(xs)):
        n = int(pop.n[k])
        assert n == len(ys[k])
        np.testing.assert_array_equal(pop.x[k][pop.mask[k]], xs[k])  # exact, bitwise
        np.testing.assert_array_equal(pop.y[k][pop.mask[k]], ys[k])
        assert pop.client_ids[k] == ids[k]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ragged_clients(), st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 2**31 - 1))
def test_property_split_examples_partitions_each_client(data, frac, seed):
    xs, ys, ids = data
    pop = from_ragged(xs, ys, client_ids=ids)
    train, test = split_examples(pop, frac, np.random.default_rng(seed))
    np.testing.assert_array_equal(train.client_ids, ids)
    np.testing.assert_array_equal(test.client_ids, ids)
    for k in range(len(xs)):
        n = len(ys[k])
        n_tr, n_te = int(train.n[k]), int(test.n[k])
        assert n_tr + n_te == n
        assert n_tr >= 1
        assert n_te == min(int(round(frac * n)), n - 1)
        rows = np.concatenate([train.x[k, :n_tr], test.x[k, :n_te]])
        labels = np.concatenate([train.y[k, :n_tr], test.y[k, :n_te]])
        # the union is exactly the client's examples, each once (column 0 = unique id)
        order = np.argsort(rows[:, 0])
        np.testing.assert_array_equal(rows[order], xs[k])
        np.testing.assert_array_equal(labels[order], ys[k])


def test_split_examples_rejects_fraction_out_of_range():
    pop = from_ragged([np.arange(8, dtype=np.float32).reshape(4, 2)], [np.array([0, 1, 0, 1])])
    for bad in (-0.5, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"test_fraction={bad} must be in \[0, 1\)"):
            split_examples(pop, bad, np.random.default_rng(0))


def test_duplicate_client_ids_rejected():
    xs, ys = _ragged([2, 3])
    with pytest.raises(ValueError, match="client id 3 appears more than once"):
        from_ragged(xs, ys, client_ids=[3, 3])


def test_split_examples_is_deterministic_for_a_seed():
    xs, ys = _ragged([5, 6, 7])
    pop = from_ragged(xs, ys)
    a = split_examples(pop, 0.3, np.random.default_rng(4))
    b = split_examples(pop, 0.3, np.random.default_rng(4))
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p.x, q.x)
        np.testing.assert_array_equal(p.n, q.n)


# --------------------------------------------------------------------------- cohorts


def test_check_cohort_size():
    pop = from_ragged(*_ragged([1, 2, 3]))
    check_cohort_size(pop, 3)
    check_cohort_size(pop, 1)
    with pytest.raises(ValueError, match=r"clients_per_round=4 is larger than the "
                                         r"population \(3 clients\)"):
        check_cohort_size(pop, 4)


def test_check_cohort_size_rejects_non_positive():
    pop = from_ragged(*_ragged([1, 2, 3]))
    with pytest.raises(ValueError, match="clients_per_round=0 must be at least 1"):
        check_cohort_size(pop, 0)


def test_host_sample_cohort():
    rng = np.random.default_rng(0)
    idx = sample_cohort(rng, 10, 4)
    assert len(idx) == 4 and len(set(idx.tolist())) == 4
    assert idx.min() >= 0 and idx.max() < 10
    with pytest.raises(ValueError, match="cohort size 11 exceeds the population"):
        sample_cohort(rng, 10, 11)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_logistic_shapes_labels_and_determinism():
    a = synthetic_logistic(num_clients=6, num_features=4, mean_examples=10, seed=3)
    b = synthetic_logistic(num_clients=6, num_features=4, mean_examples=10, seed=3)
    c = synthetic_logistic(num_clients=6, num_features=4, mean_examples=10, seed=4)
    assert a.num_clients == 6 and a.feature_shape == (4,)
    assert (a.n >= 4).all()
    assert set(np.unique(a.y[a.mask])) <= {0, 1}
    assert np.isfinite(a.x).all()
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.n, c.n) or not np.array_equal(a.x, c.x)


def test_synthetic_logistic_without_noise_follows_one_shared_boundary():
    pop = synthetic_logistic(num_clients=4, num_features=3, mean_examples=30,
                             label_noise=0.0, seed=0)
    # every client's labels are 1[x . w* > 0] for the same unit w* (the seed's first draw)
    x = pop.x[pop.mask].astype(np.float64)
    y = pop.y[pop.mask]
    rng = np.random.default_rng(0)
    w_star = rng.normal(size=3)
    w_star /= np.linalg.norm(w_star)
    np.testing.assert_array_equal(y, (x @ w_star > 0).astype(int))


def test_fedprox_synthetic_shapes_and_sizes():
    pop = fedprox_synthetic(alpha=0.5, beta=0.5, num_clients=3, num_features=5,
                            num_classes=4, seed=1)
    assert pop.num_clients == 3 and pop.feature_shape == (5,)
    assert (pop.n >= 50).all()
    labels = pop.y[pop.mask]
    assert labels.min() >= 0 and labels.max() < 4
    iid = fedprox_synthetic(alpha=0.0, beta=0.0, iid=True, num_clients=2, num_features=5,
                            num_classes=4, seed=1)
    assert iid.num_clients == 2 and (iid.n >= 50).all()
    again = fedprox_synthetic(alpha=0.5, beta=0.5, num_clients=3, num_features=5,
                              num_classes=4, seed=1)
    np.testing.assert_array_equal(pop.x, again.x)


# --------------------------------------------------------------------------- npz


def test_load_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    client = np.array([4, 1, 4, 1, 1])
    x = rng.normal(size=(5, 3)).astype(np.float32)
    y = np.array([0, 1, 1, 0, 1])
    path = tmp_path / "train.npz"
    np.savez(path, x=x, y=y, client=client)
    pop = load_npz(str(path), num_classes=2)
    np.testing.assert_array_equal(pop.client_ids, [1, 4])
    np.testing.assert_array_equal(pop.n, [3, 2])
    np.testing.assert_array_equal(pop.x[0, :3], x[client == 1])
    np.testing.assert_array_equal(pop.y[1, :2], y[client == 4])


def test_load_npz_without_client_is_one_client(tmp_path):
    path = tmp_path / "test.npz"
    np.savez(path, x=np.zeros((3, 2), np.float32), y=np.array([0, 1, 0]))
    pop = load_npz(str(path), require_client=False)
    assert pop.num_clients == 1 and pop.n[0] == 3
    with pytest.raises(ValueError, match=r"test\.npz: missing array\(s\) \['client'\]"):
        load_npz(str(path))


def test_load_npz_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        load_npz(str(missing))

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file")
    with pytest.raises(ValueError, match=r"garbage\.npz: not a readable \.npz"):
        load_npz(str(garbage))

    flat = tmp_path / "flat.npz"
    np.savez(flat, x=np.zeros(3), y=np.zeros(3, np.int32), client=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"flat\.npz: 'x' must have shape \(N, d\)"):
        load_npz(str(flat))

    bad_label = tmp_path / "bad_label.npz"
    np.savez(bad_label, x=np.zeros((3, 2)), y=np.array([0, 1, 7]),
             client=np.array([0, 0, 42]))
    with pytest.raises(ValueError, match=r"bad_label\.npz: client 42: label 7"):
        load_npz(str(bad_label), num_classes=2)

    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.array([[0.0], [np.nan]]), y=np.array([0, 1]),
             client=np.array([8, 9]))
    with pytest.raises(ValueError, match=r"nan\.npz: client 9: non-finite"):
        load_npz(str(nan))

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([object()], dtype=object), y=np.zeros(1, np.int32),
             client=np.zeros(1, np.int32))
    with pytest.raises(ValueError, match=r"pickled\.npz"):
        load_npz(str(pickled))


def test_split_clients_decides_each_client_by_its_own_id():
    """Holding out whole clients: disjoint, covering, about the right fraction, and a
    client's side does not depend on the other clients (adding or removing clients moves
    nobody) -- what a user-level DP run needs."""
    from fedjax_lite.data import split_clients
    xs = [np.full((k % 3 + 1, 2), k, np.float32) for k in range(400)]
    ys = [np.zeros(k % 3 + 1, np.int64) for k in range(400)]
    pop = from_ragged(xs, ys)
    train, test = split_clients(pop, 0.25, seed=3)
    ids_tr, ids_te = set(train.client_ids.tolist()), set(test.client_ids.tolist())
    assert not ids_tr & ids_te and ids_tr | ids_te == set(range(400))
    assert 0.18 < len(ids_te) / 400 < 0.32
    smaller = pop.gather(np.arange(0, 400, 2))          # half the clients gone
    _, test2 = split_clients(smaller, 0.25, seed=3)
    assert set(test2.client_ids.tolist()) == {i for i in ids_te if i % 2 == 0}
    assert set(split_clients(pop, 0.25, seed=4)[1].client_ids.tolist()) != ids_te
