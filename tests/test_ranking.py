"""Ranking evaluation (models.ranking: HR@10 / NDCG@10, sampled and full) against a float64
NumPy reference that sorts every ranked list explicitly; sampled negatives and implicit
training data (data.ratings_negatives); the "bce" objective of models.mf."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.data.ratings import Ratings
from fedjax_lite.data.ratings_negatives import implicit_training, sample_negatives
from fedjax_lite.models import ranking
from fedjax_lite.models.mf import MatrixFactorization
from fedjax_lite.models.ranking import (full_ranks, hit_ndcg, ranking_errors,
                                        ranking_summary, sampled_ranks)

U, I, K_DIM, M = 7, 30, 3, 8          # users, items, factors, sampled negatives


# ----------------------------------------------------------------------------- data
def _ratings(items: list[list[int]], width: int, num_items: int = I) -> Ratings:
    """Ratings with the given items per user (padding 0), user ids 100 + u."""
    item = np.zeros((len(items), width), np.int32)
    for u, row in enumerate(items):
        item[u, :len(row)] = row
    n = np.array([len(r) for r in items], np.int32)
    rating = np.where(np.arange(width)[None, :] < n[:, None], 4.0, 0.0).astype(np.float32)
    return Ratings(item, rating, n, 100 + np.arange(len(items)), num_items, (1.0, 5.0))


def _split(seed=0, users=U, num_items=I):
    """3..10 training items and 1..4 test items per user (disjoint, unsorted)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for _ in range(users):
        a, b = rng.integers(3, 11), rng.integers(1, 5)
        perm = rng.permutation(num_items)
        train.append(list(perm[:a])), test.append(list(perm[a:a + b]))
    return _ratings(train, 12, num_items), _ratings(test, 5, num_items)


def _rated(r: Ratings, u: int) -> set:
    return set(r.item[u, :r.n[u]].tolist())


# ----------------------------------------------------------------------------- reference
def _np_rank(pos: float, competitors: np.ndarray) -> int:
    """0-based position of the positive in the list sorted by descending score, ties
    placing the positive after the competitors (pessimistic)."""
    scores = np.r_[competitors, pos]
    is_pos = np.r_[np.zeros(len(competitors)), 1.0]
    order = np.lexsort((is_pos, -scores))
    return int(np.flatnonzero(order == len(competitors))[0])


def np_ranking(params, private, train, test, negatives, k=10):
    """Float64 loops: (sampled ranks, full ranks) per test slot, and the four metrics."""
    q = np.asarray(params["item"], np.float64)
    bi = np.asarray(params["item_bias"], np.float64)
    mu = float(params["mu"])
    p = np.asarray(private["user"], np.float64)
    bu = np.asarray(private["user_bias"], np.float64)
    ranks_s = np.full(test.item.shape, -1)
    ranks_f = np.full(test.item.shape, -1)
    sums = np.zeros(4)
    for u in range(test.num_users):
        s = np.array([mu + bu[u] + bi[i] + q[i] @ p[u] for i in range(I)])
        held = _rated(test, u)
        for t in range(test.n[u]):
            pos = test.item[u, t]
            # candidates: unrated in train, not held out (the positive itself included)
            cands = [i for i in range(I) if i not in _rated(train, u) and i not in held]
            ranks_s[u, t] = _np_rank(s[pos], s[negatives[u]])
            ranks_f[u, t] = _np_rank(s[pos], s[cands])
            for j, r in enumerate((ranks_s[u, t], ranks_f[u, t])):
                if r < k:
                    sums[2 * j] += 1.0
                    sums[2 * j + 1] += 1.0 / math.log2(r + 2)
    c = max(test.num_ratings, 1)
    metrics = dict(zip(["eval_hr10", "eval_ndcg10", "eval_hr10_full", "eval_ndcg10_full"],
                       sums / c))
    return ranks_s, ranks_f, metrics


def _model_and_params(seed=1):
    model = MatrixFactorization(num_items=I, dim=K_DIM, init_scale=1.0)
    kg, kp, kb = jax.random.split(jax.random.key(seed), 3)
    params = model.init_global(kg)
    params["item_bias"] = 0.5 * jax.random.normal(kb, (I,))
    private = model.init_private(kp, U)
    private["user_bias"] = jnp.linspace(-1.0, 1.0, U)
    return model, params, private


def _run(model, params, private, train, test, negatives, k=10):
    """Compiled ranking_errors (traced afresh: a new partial each call) and its summary."""
    fn = jax.jit(functools.partial(ranking_errors, model, k=k))
    sums = fn(params, private, train.item, train.n, test.item, test.n,
              jnp.asarray(negatives))
    return sums, {name: float(v) for name, v in ranking_summary(*sums).items()}


# ----------------------------------------------------------------------------- ranking
@pytest.mark.parametrize("k,sort_from", [(10, ranking.SORT_FROM), (3, 0)])
def test_ranking_matches_a_float64_reference_with_ties(k, sort_from, monkeypatch):
    monkeypatch.setattr(ranking, "SORT_FROM", sort_from)     # both ways of counting
    train, test = _split()
    negatives = sample_negatives(train, test, M, seed=0)
    model, params, private = _model_and_params()
    # an exact tie: user 0's first negative gets the same item parameters as its first
    # held-out item, so the two score identically (in float32 and in float64)
    pos, tie = int(test.item[0, 0]), int(negatives[0, 0])
    params = {**params, "item": params["item"].at[tie].set(params["item"][pos]),
              "item_bias": params["item_bias"].at[tie].set(params["item_bias"][pos])}
    ranks_s, ranks_f, want = np_ranking(params, private, train, test, negatives, k)
    real = test.mask
    scores = jax.vmap(model.predict, in_axes=(0, None, None))(
        private, {"item": params["item"], "item_bias": params["item_bias"]}, params["mu"])
    got_s = sampled_ranks(jnp.take_along_axis(scores, test.item, 1),
                          jnp.take_along_axis(scores, jnp.asarray(negatives), 1))
    got_f = full_ranks(scores, test.item, real, train.item, train.mask)
    np.testing.assert_array_equal(np.asarray(got_s)[real], ranks_s[real])
    np.testing.assert_array_equal(np.asarray(got_f)[real], ranks_f[real])
    assert ranks_s[0, 0] >= 1 and ranks_f[0, 0] >= 1          # the tie counted against
    sums, got = _run(model, params, private, train, test, negatives, k)
    np.testing.assert_array_equal(np.asarray(sums[4]), test.n)
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), name
    assert 0 < got["eval_hr10_full"] < got["eval_hr10"] <= 1      # full ranking is harder


def test_perfect_model_scores_one_and_ndcg_at_rank_two():
    """A one-hot MF (Q = identity, p_u = the indicator of u's held-out items) scores every
    held-out item 1 and everything else 0: rank 0 in both protocols, HR = NDCG = 1."""
    train, test = _split()
    negatives = sample_negatives(train, test, M, seed=3)
    model = MatrixFactorization(num_items=I, dim=I)
    params = {"item": jnp.eye(I), "item_bias": jnp.zeros(I), "mu": jnp.zeros(())}
    p = np.zeros((U, I), np.float32)
    for u in range(U):
        p[u, list(_rated(test, u))] = 1.0
    private = {"user": jnp.asarray(p), "user_bias": jnp.zeros(U)}
    _, got = _run(model, params, private, train, test, negatives)
    assert got == {"eval_hr10": 1.0, "eval_ndcg10": 1.0, "eval_hr10_full": 1.0,
                   "eval_ndcg10_full": 1.0}
    # rank 2 (two negatives above, one below): NDCG = 1 / log2(4) = 0.5
    ranks = sampled_ranks(jnp.array([[3.0]]), jnp.array([[5.0, 4.0, 1.0]]))
    assert int(ranks[0, 0]) == 2
    hr, ndcg, count = hit_ndcg(ranks, jnp.array([[True]]))
    assert (float(hr[0]), float(ndcg[0]), float(count[0])) == (1.0, 0.5, 1.0)
    assert float(hit_ndcg(ranks, jnp.array([[True]]), k=2)[1][0]) == 0.0


def test_ties_and_nans_rank_pessimistically():
    neg = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, jnp.nan, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    pos = jnp.array([[1.0], [1.0], [jnp.nan]])
    np.testing.assert_array_equal(np.asarray(sampled_ranks(pos, neg))[:, 0], [4, 1, 4])
    # full ranking: a constant model puts each positive behind all its candidates
    pos_items, pos_mask = jnp.array([[1, 4], [0, 0]]), jnp.array([[True, True],
                                                                  [True, False]])
    train_items, train_mask = jnp.array([[2, 0], [5, 0]]), jnp.array([[True, False],
                                                                      [True, False]])
    ranks = full_ranks(jnp.zeros((2, 6)), pos_items, pos_mask, train_items, train_mask)
    np.testing.assert_array_equal(np.asarray(ranks), [[3, 3], [4, 4]])


def test_compare_and_sort_counts_agree():
    """Both ways of counting competitors >= a positive, with ties, NaNs, -inf and
    invalid competitors, equal a direct NumPy count."""
    rng = np.random.default_rng(0)
    comp = rng.integers(0, 6, (5, 40)).astype(np.float32)       # many ties
    comp[0, 3] = comp[2, 7] = np.nan
    comp[1, 0] = -np.inf
    valid = rng.random((5, 40)) < 0.7
    pos = rng.integers(-1, 7, (5, 9)).astype(np.float32)
    pos[3, 2], pos[4, 0] = np.nan, -np.inf
    c = np.where(np.isnan(comp), np.inf, comp)
    p = np.where(np.isnan(pos), -np.inf, pos)
    want = np.sum(valid[:, None, :] & (c[:, None, :] >= p[:, :, None]), -1)
    for method in ("compare", "sort"):
        got = ranking._count_at_least(*map(jnp.asarray, (comp, valid, pos)), method)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=method)


def test_summary_is_zero_without_held_out_items():
    z = jnp.zeros(3)
    assert all(float(v) == 0.0 for v in ranking_summary(z, z, z, z, z).values())


# ----------------------------------------------------------------------------- negatives
@pytest.mark.parametrize("users,num_items,num", [(U, I, M), (50, 1000, 99)])
def test_sample_negatives_are_unrated_distinct_and_deterministic(users, num_items, num):
    """Few items (sorted random keys) and many (rejection sampling)."""
    train, test = _split(0, users, num_items)
    neg = sample_negatives(train, test, num, seed=0)
    assert neg.shape == (users, num) and neg.dtype == np.int32
    for u in range(users):
        assert len(set(neg[u].tolist())) == num
        assert not set(neg[u].tolist()) & (_rated(train, u) | _rated(test, u))
        assert neg[u].min() >= 0 and neg[u].max() < num_items
    np.testing.assert_array_equal(neg, sample_negatives(train, test, num, seed=0))
    assert not np.array_equal(neg, sample_negatives(train, test, num, seed=1))


def test_sample_negatives_edge_cases():
    train, test = _split()
    assert sample_negatives(train, test, 0, seed=0).shape == (U, 0)
    # a user with exactly `num` unrated items gets all of them (the exact path)
    full = _ratings([list(range(2, I)), [0]], I)
    none = _ratings([[], []], 1)
    np.testing.assert_array_equal(np.sort(sample_negatives(full, none, 2, 0)[0]), [0, 1])
    with pytest.raises(ValueError, match="user 100 has only 2 unrated items"):
        sample_negatives(full, none, 3, seed=0)


@pytest.mark.parametrize("num", [2, 6])          # rejection sampling, sorted random keys
def test_sample_negatives_is_uniform(num):
    """Every unrated item is drawn equally often (20000 users rating the same 12 of 30
    items: 18 unrated; > 4.5 standard deviations of slack)."""
    users = 20000
    train = _ratings([list(range(0, 20, 2))] * users, 10)
    test = _ratings([[1, 3]] * users, 2)
    neg = sample_negatives(train, test, num, seed=0)
    freq = np.bincount(neg.ravel(), minlength=I)
    unrated = np.setdiff1d(np.arange(I), list(range(0, 20, 2)) + [1, 3])
    assert freq[np.setdiff1d(np.arange(I), unrated)].sum() == 0
    expect = users * num / len(unrated)
    assert np.all(np.abs(freq[unrated] - expect) < 0.1 * expect), freq[unrated]


def test_implicit_training_positives_negatives_and_cap():
    train, test = _split()
    wide, wide_test = _split(1, 20, 1000)                            # rejection sampling
    big = _ratings([list(range(I - 2))], I - 2)                      # 28 rated, 2 unrated
    for tr, ex, ratio in ((train, test, 2), (train, None, 3), (big, None, 4),
                          (wide, wide_test, 4)):
        imp = implicit_training(tr, ratio, seed=0, exclude=ex)
        assert imp.scale == (0.0, 1.0) and imp.timestamp is None
        np.testing.assert_array_equal(imp.user_ids, tr.user_ids)
        assert imp.num_items == tr.num_items
        assert imp.item.shape[1] == imp.n.max()
        for u in range(tr.num_users):
            items = imp.item[u, :imp.n[u]]
            labels = imp.rating[u, :imp.n[u]]
            assert set(labels.tolist()) <= {0.0, 1.0}
            assert sorted(items[labels == 1].tolist()) == sorted(_rated(tr, u))
            negs = items[labels == 0].tolist()
            rated = _rated(tr, u) | (set() if ex is None else _rated(ex, u))
            assert len(set(negs)) == len(negs) and not set(negs) & rated
            assert len(negs) == min(ratio * tr.n[u], tr.num_items - len(rated))
            assert not imp.item[u, imp.n[u]:].any() and not imp.rating[u, imp.n[u]:].any()
    imp = implicit_training(train, 2, seed=0, exclude=test)
    assert any(imp.rating[u, 0] == 0.0 for u in range(U))           # shuffled slots
    again = implicit_training(train, 2, seed=0, exclude=test)
    np.testing.assert_array_equal(imp.item, again.item)


# ----------------------------------------------------------------------------- bce
def test_bce_local_loss_matches_float64_numpy():
    rng = np.random.default_rng(0)
    N, k, l2 = 9, 4, 0.05
    local = {"user": rng.normal(size=k), "user_bias": rng.normal(),
             "item": rng.normal(size=(N, k)) * 2, "item_bias": rng.normal(size=N),
             "mu": 0.3}
    slots = np.array([4, 0, 7, 2, 8, 1])
    labels = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    mask = np.array([True, True, True, True, True, False])
    model = MatrixFactorization(num_items=50, dim=k, l2=l2, objective="bce")
    obj, data = model.local_loss(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), local),
                                 jnp.asarray(slots), jnp.asarray(labels, jnp.float32),
                                 jnp.asarray(mask))
    z = (local["mu"] + local["user_bias"] + local["item_bias"][slots]
         + local["item"][slots] @ local["user"])
    bce = np.logaddexp(0.0, z) - labels * z                # -y log s(z) - (1-y) log(1-s(z))
    want_data = bce[mask].mean()
    rows = np.sum(local["item"][slots] ** 2, 1) + local["item_bias"][slots] ** 2
    reg = rows[mask].mean() + np.sum(local["user"] ** 2) + local["user_bias"] ** 2
    assert float(data) == pytest.approx(want_data, rel=1e-5)
    assert float(obj) == pytest.approx(want_data + l2 * reg, rel=1e-5)
    with pytest.raises(ValueError, match="'hinge'"):
        model._replace(objective="hinge").local_loss(local, slots, labels, mask)


def test_bce_sgd_ranks_held_out_positives_first():
    """4 groups of 10 items; each of 40 users likes its group's items: 5 trained as
    positives (with 2 sampled negatives each), 2 held out. A few hundred full-batch SGD
    steps on the summed "bce" local_loss put held-out items first among the candidates."""
    rng = np.random.default_rng(0)
    n_users, n_items, groups = 40, 40, 4
    liked = [rng.permutation(np.arange(10)) + 10 * (u % groups) for u in range(n_users)]
    train = _ratings([list(x[:5]) for x in liked], 5, n_items)
    test = _ratings([list(x[5:7]) for x in liked], 2, n_items)
    imp = implicit_training(train, 2, seed=0, exclude=test)
    model = MatrixFactorization(num_items=n_items, dim=8, l2=1e-2, init_scale=0.1,
                                scale=(0.0, 1.0), objective="bce")
    params = model.init_global(jax.random.key(0))
    private = model.init_private(jax.random.key(1), n_users)
    items, labels, mask = map(jnp.asarray, (imp.item, imp.rating, imp.mask))
    slots = jnp.arange(items.shape[1])

    def loss(state):
        g, priv = state
        def one(p, it, y, m):
            local = {**p, "item": g["item"][it], "item_bias": g["item_bias"][it],
                     "mu": g["mu"]}
            return model.local_loss(local, slots, y, m)[0]
        return jnp.sum(jax.vmap(one)(priv, items, labels, mask))

    tx = optax.sgd(0.3)
    def step(carry, _):
        state, opt = carry
        updates, opt = tx.update(jax.grad(loss)(state), opt)
        return (optax.apply_updates(state, updates), opt), None

    negatives = sample_negatives(train, test, 20, seed=0)
    _, before = _run(model, params, private, train, test, negatives)
    state = (params, private)
    (state, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=300))(
        (state, tx.init(state)))
    _, after = _run(model, *state, train, test, negatives)
    # every trained positive above every trained negative of its user
    g, priv = state
    logits = (g["mu"] + priv["user_bias"][:, None] + g["item_bias"][items]
              + jnp.einsum("uk,unk->un", priv["user"], g["item"][items]))
    lo_pos = jnp.min(jnp.where(mask & (labels == 1), logits, jnp.inf), 1)
    hi_neg = jnp.max(jnp.where(mask & (labels == 0), logits, -jnp.inf), 1)
    assert bool(jnp.all(lo_pos > hi_neg)), (lo_pos, hi_neg)
    # held-out items: among the top 10 of 33 candidates, 3 of them equally liked
    assert after["eval_hr10_full"] > 0.85 and after["eval_ndcg10_full"] > 0.5, after
    assert before["eval_hr10_full"] < 0.5 and before["eval_ndcg10_full"] < 0.3, before
