"""Tests for fedjax_lite.data.partition (host side, NumPy only).

Property tests check what every partitioner guarantees (each example exactly once, no
empty client, reproducible seeds); the statistical checks of the label and size
distributions use fixed seeds, so they are deterministic, with tolerances derived from
the distributions they test.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedjax_lite.data import partition as P
from fedjax_lite.experiment import config_schema


def _check_cover(parts, n):
    """Every index in range(n) exactly once, no empty client, int64 arrays."""
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    assert all(len(p) > 0 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@st.composite
def problems(draw):
    n = draw(st.integers(1, 200))
    num_classes = draw(st.integers(1, 7))
    y = np.array(draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)))
    kind = draw(st.sampled_from(P.PARTITIONS))
    spc = draw(st.integers(1, 4))
    max_clients = n // spc if kind == "shards" else n
    if max_clients < 1:
        spc, max_clients = 1, n
    k = draw(st.integers(1, max_clients))
    params = dict(alpha=draw(st.sampled_from([0.01, 0.3, 1.0, 100.0])),
                  shards_per_client=spc, sigma=draw(st.sampled_from([0.0, 0.5, 2.0])))
    return y, k, kind, params, draw(st.integers(0, 2 ** 32))


@settings(max_examples=150, deadline=None)
@given(problems())
def test_every_example_exactly_once_no_empty_client_reproducible(problem):
    y, k, kind, params, seed = problem
    parts = P.partition(y, k, kind, seed=seed, **params)
    assert len(parts) == k
    _check_cover(parts, len(y))
    again = P.partition(y, k, kind, seed=np.random.default_rng(seed), **params)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), k=st.integers(1, 60), seed=st.integers(0, 1000))
def test_iid_sizes_differ_by_at_most_one(n, k, seed):
    if k > n:
        with pytest.raises(ValueError, match=f"cannot split {n} examples over {k} clients"):
            P.iid(np.zeros(n, int), k, seed=seed)
        return
    sizes = np.array([len(p) for p in P.iid(np.zeros(n, int), k, seed=seed)])
    assert sizes.sum() == n and sizes.max() - sizes.min() <= 1


def test_seeds_change_the_partition():
    y = np.repeat(np.arange(5), 40)
    for kind in P.PARTITIONS:
        a = P.partition(y, 10, kind, seed=1)
        b = P.partition(y, 10, kind, seed=2)
        assert any(not np.array_equal(p, q) for p, q in zip(a, b)), kind


# ------------------------------------------------------------------------------ shards

@settings(max_examples=80, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=6), k=st.integers(1, 12),
       spc=st.integers(1, 3), seed=st.integers(0, 1000))
def test_shards_label_bound(counts, k, spc, seed):
    y = np.repeat(np.arange(len(counts)), counts)
    S = k * spc
    if S > len(y):
        with pytest.raises(ValueError, match="more than the|cannot split"):
            P.shards(y, k, shards_per_client=spc, seed=seed)
        return
    parts = P.shards(y, k, shards_per_client=spc, seed=seed)
    _check_cover(parts, len(y))
    # every client holds shards_per_client shards of floor(N/S) or ceil(N/S) examples
    lo, hi = len(y) // S, -(-len(y) // S)
    assert all(spc * lo <= len(p) <= spc * hi for p in parts)
    # a shard is a contiguous run of the sorted labels: at most S + C - 1 (shard, label)
    # pairs, hence distinct labels summed over clients
    distinct = [len(np.unique(y[p])) for p in parts]
    assert sum(distinct) <= S + len(counts) - 1


def test_shards_mcmahan_setting_at_most_shards_per_client_labels():
    # class counts are multiples of the shard size (600 / (20 * 2) = 15 = 60 / 4), as in
    # McMahan et al.'s MNIST split: no shard straddles two labels
    y = np.repeat(np.arange(10), 60)
    for seed in range(5):
        parts = P.shards(y, 20, shards_per_client=2, seed=seed)
        _check_cover(parts, 600)
        assert all(len(p) == 30 for p in parts)
        labels = [np.unique(y[p]) for p in parts]
        assert all(len(l) <= 2 for l in labels)
        # each label present on a client comes in whole shards of 15
        for p, l in zip(parts, labels):
            assert all(np.sum(y[p] == c) % 15 == 0 for c in l)


# --------------------------------------------------------------------------- dirichlet

def _proportions(parts, y, classes):
    return np.array([[np.mean(y[p] == c) for c in classes] for p in parts])


def test_dirichlet_large_alpha_is_iid_chi_square():
    """alpha -> infinity: q_k = p, so client k draws its n_k examples uniformly from what
    is left; Pearson's statistic summed over clients is then about chi-square with
    K (C - 1) degrees of freedom (drawing without replacement only lowers it). Fixed
    seeds, so this is deterministic; the bound is the 99.9% quantile."""
    rng = np.random.default_rng(0)
    y = rng.choice(5, size=4000, p=[0.4, 0.25, 0.15, 0.12, 0.08])
    prior = np.bincount(y) / len(y)

    def pearson(parts):
        return sum(np.sum((np.bincount(y[p], minlength=5) - len(p) * prior) ** 2
                          / (len(p) * prior)) for p in parts)

    bound = stats.chi2.ppf(0.999, 40 * 4)
    for seed in range(3):
        parts = P.dirichlet(y, 40, alpha=1e6, seed=seed)
        _check_cover(parts, len(y))
        assert pearson(parts) < bound
        # the same statistic for a strongly skewed alpha is far beyond it
        assert pearson(P.dirichlet(y, 40, alpha=0.1, seed=seed)) > 10 * bound


def test_dirichlet_variance_matches_hsu_et_al():
    """Var of a client's class-j proportion under q ~ Dir(alpha p), counts ~ Mult(n, q):
    p_j (1 - p_j) [1 / (alpha + 1) + alpha / ((alpha + 1) n)]. The normalized mean
    square deviation over K = 400 clients x C = 4 classes has a relative standard error
    of about 5%; fixed seeds, tolerance 20%. (Every example is assigned, so the last
    clients draw from a depleted pool; the measured value stays within a few percent.)"""
    y = np.repeat(np.arange(4), 10_000)
    prior = np.full(4, 0.25)
    for alpha in (0.3, 1.0, 10.0):
        parts = P.dirichlet(y, 400, alpha=alpha, seed=7)
        props = _proportions(parts, y, range(4))
        measured = np.mean((props - prior) ** 2 / (prior * (1 - prior)))
        theory = 1 / (alpha + 1) + alpha / ((alpha + 1) * 100)
        assert measured == pytest.approx(theory, rel=0.2), (alpha, measured, theory)


def test_dirichlet_skew_decreases_with_alpha():
    y = np.repeat(np.arange(10), 100)
    prior = np.full(10, 0.1)
    tv = []
    for alpha in (0.01, 0.1, 1.0, 10.0, 1000.0):
        props = _proportions(P.dirichlet(y, 20, alpha=alpha, seed=0), y, range(10))
        tv.append(np.mean(0.5 * np.abs(props - prior).sum(axis=1)))
    assert all(a > b for a, b in zip(tv, tv[1:])), tv
    # alpha = 1000: about the total variation of a multinomial sample of 50 (~0.17)
    assert tv[0] > 0.7 and tv[-1] < 0.3, tv


def test_dirichlet_tiny_alpha_never_empty_and_uses_the_prior():
    # unbalanced classes, alpha so small that q_k is (numerically) one-hot
    y = np.array([0] * 95 + [1] * 4 + [2])
    for seed in range(20):
        parts = P.dirichlet(y, 30, alpha=1e-4, seed=seed)
        _check_cover(parts, 100)
        assert sorted(len(p) for p in parts) == sorted(P.equal_sizes(100, 30))


# ------------------------------------------------------------------------ quantity skew

def test_quantity_skew_sizes_are_lognormal_and_labels_iid():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, size=400_000)
    parts = P.quantity_skew(y, 500, sigma=1.0, seed=5)
    _check_cover(parts, len(y))
    sizes = np.array([len(p) for p in parts])
    # log sizes = log w + const (rounding moves sizes of ~800 by < 0.2%): std ~ sigma;
    # the sample std of 500 normals has a relative standard error of ~3%
    assert np.std(np.log(sizes)) == pytest.approx(1.0, rel=0.12)
    # labels: a uniform shuffle, so Pearson's statistic is chi-square (K (C - 1) dof)
    prior = np.bincount(y) / len(y)
    chi2 = sum(np.sum((np.bincount(y[p], minlength=4) - len(p) * prior) ** 2
                      / (len(p) * prior)) for p in parts)
    assert chi2 < stats.chi2.ppf(0.999, 500 * 3)


def test_quantity_skew_sigma_zero_is_equal_sizes():
    parts = P.quantity_skew(np.zeros(103, int), 10, sigma=0.0, seed=0)
    assert sorted(len(p) for p in parts) == sorted(P.equal_sizes(103, 10))


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("call, match", [
    (lambda y: P.iid(y, 11, seed=0), r"cannot split 10 examples over 11 clients"),
    (lambda y: P.dirichlet(y, 11, alpha=1.0, seed=0), r"dirichlet partition: cannot split"),
    (lambda y: P.quantity_skew(y, 11, sigma=1.0, seed=0), r"cannot split 10 examples"),
    (lambda y: P.shards(y, 4, shards_per_client=3, seed=0),
     r"4 clients x 3 shards = 12 shards, more than the 10 examples"),
    (lambda y: P.shards(y, 2, shards_per_client=0, seed=0), r"shards_per_client=0"),
    (lambda y: P.dirichlet(y, 2, alpha=0.0, seed=0), r"alpha=0.0 must be a number > 0"),
    (lambda y: P.dirichlet(y, 2, alpha=float("nan"), seed=0), r"alpha=nan"),
    (lambda y: P.quantity_skew(y, 2, sigma=-1.0, seed=0), r"sigma=-1.0 must be"),
    (lambda y: P.iid(y, 0, seed=0), r"num_clients=0 must be a positive integer"),
    (lambda y: P.iid(y.astype(float), 2, seed=0), r"labels must be integers"),
    (lambda y: P.iid(y.reshape(2, 5), 2, seed=0), r"labels must be a 1-D array"),
    (lambda y: P.partition(y, 2, "bogus", seed=0), r"unknown partition kind 'bogus'"),
])
def test_impossible_requests_are_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(np.arange(10) % 3)


def test_config_lists_the_same_partitions():
    assert config_schema.PARTITIONS == P.PARTITIONS
