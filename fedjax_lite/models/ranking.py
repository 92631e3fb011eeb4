"""Top-k ranking metrics for the matrix-factorization recommender: HR@10 and NDCG@10.

Protocol of He, Liao, Zhang, Nie, Hu and Chua, "Neural Collaborative Filtering", WWW 2017,
Sec. 4.1: each held-out item of a user is ranked against 99 items the user never rated
(sampled once, :func:`fedjax_lite.data.ratings_negatives.sample_negatives`); the hit
ratio says whether it lands in the top 10, NDCG@10 = 1 / log2(rank + 2) for a 0-based
rank < 10 (one relevant item per list, so the ideal DCG is 1), else 0. Several held-out
items of one user are ranked one at a time against the same 99 negatives (leave-one-out
is the case of one).

Sampled metrics can order models differently from the exact ones (Krichene and Rendle,
"On Sampled Metrics for Item Recommendation", KDD 2020), so the same metrics are also
computed by FULL ranking: each held-out item against every item the user did not rate in
training, other than its held-out items (``eval_hr10_full``, ``eval_ndcg10_full``).

Ranks are PESSIMISTIC: a competitor scoring exactly as high as the held-out item counts
as ranked above it. Otherwise a degenerate model that scores every item alike (e.g. all
factors zero) would put every held-out item first and score HR = NDCG = 1; counting ties
against the positive gives it the worst rank instead. For the same reason a NaN score
(a diverged model) ranks a held-out item last and a NaN competitor above it.

Scores are the unclipped r_hat(u, i) = mu + b_u + b_i + p_u . q_i (the logit under the
"bce" objective): a monotone clip would only create ties.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lite.models.mf import MatrixFactorization


def scores_all(model: MatrixFactorization, params: dict, private: dict) -> jax.Array:
    """[K, I]: the unclipped score of K users (private leaves [K, ...]) for every item."""
    table = {"item": params["item"], "item_bias": params["item_bias"]}
    return jax.vmap(model.predict, in_axes=(0, None, None))(private, table, params["mu"])


SORT_FROM = 128   # positives per user from which one sort beats a pass per positive


def _count_at_least(comp: jax.Array, valid: jax.Array, pos: jax.Array,
                    method: str | None = None) -> jax.Array:
    """int32[K, T]: per positive pos[k, t], the number of valid competitors comp[k, c]
    (valid [K, C]) scoring >= it; NaN competitors count as +inf, NaN positives as -inf.
    No [K, T, C] tensor: ``method`` "compare" makes one pass over the competitors per
    positive (O(T C)), "sort" sorts them once and binary-searches (O(C log C + T log C));
    by default "compare" below :data:`SORT_FROM` positives per user (T is static)."""
    method = method or ("compare" if pos.shape[1] < SORT_FROM else "sort")
    comp = jnp.where(jnp.isnan(comp), jnp.inf, comp)
    pos = jnp.where(jnp.isnan(pos), -jnp.inf, pos)
    if method == "compare":
        count = lambda p: jnp.sum(valid & (comp >= p[:, None]), axis=1, dtype=jnp.int32)
        return jax.lax.map(count, pos.T).T
    comp = jnp.sort(jnp.where(valid, comp, -jnp.inf), axis=1)
    below = jax.vmap(lambda s, p: jnp.searchsorted(s, p, side="left"))(comp, pos)
    # invalid competitors sit at -inf: below the positive unless the positive is -inf too
    n_valid = jnp.sum(valid, axis=1, dtype=jnp.int32)[:, None]
    return jnp.minimum(comp.shape[1] - below.astype(jnp.int32), n_valid)


def sampled_ranks(pos_scores: jax.Array, neg_scores: jax.Array) -> jax.Array:
    """int32[K, T]: 0-based rank of each positive (pos_scores [K, T]) among the user's
    sampled negatives (neg_scores [K, M]) = the number of negatives scoring >= it (ties
    against the positive: pessimistic, see the module docstring)."""
    return _count_at_least(neg_scores, jnp.ones(neg_scores.shape, bool), pos_scores)


def full_ranks(scores: jax.Array, pos_items: jax.Array, pos_mask: jax.Array,
               train_items: jax.Array, train_mask: jax.Array) -> jax.Array:
    """int32[K, T]: 0-based rank of each held-out item pos_items[k, t] (real where
    ``pos_mask``) among its candidates: the items user k did not rate in training
    (``train_items``/``train_mask`` [K, N]) and that are not among its other held-out
    items; = the number of candidates scoring >= it (pessimistic). ``scores`` [K, I]."""
    K, I = scores.shape
    rows = jnp.arange(K)[:, None]
    rated = jnp.zeros((K, I), bool)
    rated = rated.at[rows, jnp.where(train_mask, train_items, I)].set(True, mode="drop")
    rated = rated.at[rows, jnp.where(pos_mask, pos_items, I)].set(True, mode="drop")
    pos = jnp.take_along_axis(scores, pos_items, axis=1)
    return _count_at_least(scores, ~rated, pos)


def hit_ndcg(ranks: jax.Array, mask: jax.Array, k: int = 10):
    """Per-user sums over real positives (``mask`` [K, T]) of the hit (rank < k) and of
    NDCG@k = 1 / log2(rank + 2) for a hit, else 0 (one relevant item per ranked list, so
    the ideal DCG is 1; He et al. 2017), and the counts: (float32[K],) * 3."""
    hit = mask & (ranks < k)
    ndcg = jnp.where(hit, 1.0 / jnp.log2(ranks.astype(jnp.float32) + 2.0), 0.0)
    return (jnp.sum(hit, axis=1, dtype=jnp.float32), jnp.sum(ndcg, axis=1),
            jnp.sum(mask, axis=1, dtype=jnp.float32))


def ranking_errors(model: MatrixFactorization, params: dict, private: dict,
                   train_items: jax.Array, train_n: jax.Array, test_items: jax.Array,
                   test_n: jax.Array, negatives: jax.Array, k: int = 10):
    """Per-user sums for a chunk of K users (private leaves [K, ...], train_items [K, N],
    test_items [K, T], negatives [K, M], counts int[K]): (hr, ndcg, hr_full, ndcg_full,
    count), each float32[K] -- sampled (against ``negatives``) and full ranking of every
    held-out item, cutoff ``k``. Reduce with :func:`ranking_summary`."""
    scores = scores_all(model, params, private)                           # [K, I]
    test_mask = jnp.arange(test_items.shape[1])[None, :] < test_n[:, None]
    train_mask = jnp.arange(train_items.shape[1])[None, :] < train_n[:, None]
    pos = jnp.take_along_axis(scores, test_items, axis=1)
    neg = jnp.take_along_axis(scores, negatives, axis=1)
    hr, ndcg, count = hit_ndcg(sampled_ranks(pos, neg), test_mask, k)
    hr_full, ndcg_full, _ = hit_ndcg(
        full_ranks(scores, test_items, test_mask, train_items, train_mask), test_mask, k)
    return hr, ndcg, hr_full, ndcg_full, count


def ranking_summary(hr: jax.Array, ndcg: jax.Array, hr_full: jax.Array,
                    ndcg_full: jax.Array, count: jax.Array) -> dict:
    """{eval_hr10, eval_ndcg10, eval_hr10_full, eval_ndcg10_full}: means over all held-out
    items (0 when there are none) from :func:`ranking_errors`' per-user sums."""
    c = jnp.maximum(jnp.sum(count), 1.0)
    return {"eval_hr10": jnp.sum(hr) / c, "eval_ndcg10": jnp.sum(ndcg) / c,
            "eval_hr10_full": jnp.sum(hr_full) / c,
            "eval_ndcg10_full": jnp.sum(ndcg_full) / c}


__all__ = ["full_ranks", "hit_ndcg", "ranking_errors", "ranking_summary", "sampled_ranks",
           "scores_all"]
