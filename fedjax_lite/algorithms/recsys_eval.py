"""Evaluation of a recommender on held-out ratings: one code path for every method.

Every method provides each user's factors for prediction, ``factors(state, train) ->
{'user' [U, k], 'user_bias' [U]}`` (FCF and ``centralized``: the stored ones; FedRecon:
reconstructed from the user's training ratings; ``local_only``: the user's own, its mu
folded into the bias), and then the same metrics are computed from (global params,
factors):

  rating prediction  eval_loss (MSE), eval_rmse, eval_mae over held-out ratings,
                     predictions clipped to the rating scale (explicit objective);
  ranking            eval_hr10, eval_ndcg10 (each held-out item among the user's 99
                     sampled negatives, He et al., WWW 2017) and eval_hr10_full,
                     eval_ndcg10_full (among ALL items the user did not rate; Krichene and
                     Rendle, KDD 2020): :mod:`fedjax_lite.models.ranking`.
  implicit objective eval_loss = binary cross-entropy of the held-out items (label 1)
                     and the sampled negatives (label 0); ranking metrics as above.

Besides the metrics, ``evaluate`` returns per-user sums (``per_user``) from which the
per-user distribution (which users federation helps, compared with ``local_only``) is
computed by the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_lite.models.mf import (MatrixFactorization, predict_users, rating_errors,
                                   rating_summary)

# users per chunk of the full ranking (a [chunk, num_items] score table at a time)
RANKING_CHUNK = 256


def stored_factors(state) -> dict:
    """FCF / centralized: the users' private factors held in the state."""
    return {"user": state.private["user"], "user_bias": state.private["user_bias"]}


def _chunked(fn, arrays: tuple, chunk: int):
    """``fn`` over leading-axis chunks of ``arrays`` (padded with copies of row 0; the
    padding's outputs are dropped); outputs keep the leading axis U."""
    U = arrays[0].shape[0]
    chunk = min(chunk, U)
    num = -(-U // chunk)
    pad = num * chunk - U
    padded = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, 0)])
                          .reshape((num, chunk) + a.shape[1:]), arrays)
    out = lax.map(lambda xs: fn(*xs), padded)
    return jax.tree.map(lambda o: o.reshape((num * chunk,) + o.shape[2:])[:U], out)


def evaluate_recommender(model: MatrixFactorization, factors, *, ranking: bool = False,
                         chunk: int = RANKING_CHUNK):
    """``evaluate(state, train, test, rated, negatives) -> (metrics, per_user)``.

    train: the population the method trained on ({x, y, n}: what ``factors`` reads);
    test: held-out ratings, row u = train's user u; rated: {x, n} the items each user
    rated in training (excluded from the full ranking; for the implicit objective the
    positives only); negatives: int32[U, 99] sampled items (ranking runs; else None).
    per_user: {'se', 'ae', 'count'} (explicit) and {'hits', 'ndcg', 'ranked'} (ranking),
    each float[U].
    """
    implicit = model.objective == "bce"
    if implicit and not ranking:
        raise ValueError("evaluate_recommender: the implicit objective is evaluated by "
                         "ranking (eval.ranking: true)")

    def evaluate(state, train: dict, test: dict, rated: dict, negatives=None):
        if test["n"].shape[0] != train["n"].shape[0]:            # static: trace time
            raise ValueError(f"evaluate: train has {train['n'].shape[0]} users, test has "
                             f"{test['n'].shape[0]}; row u must be the same user in both")
        params = state.params
        private = factors(state, train)
        mask = jnp.arange(test["x"].shape[1])[None, :] < test["n"][:, None]
        metrics, per_user = {}, {}
        if not implicit:
            se, ae, count = rating_errors(model, params, private, test["x"], test["y"], mask)
            metrics = rating_summary(se, ae, count)
            per_user = {"se": se, "ae": ae, "count": count}
        if ranking:
            from fedjax_lite.models import ranking as rk

            def one(p_user, p_bias, r_items, r_n, t_items, t_n, negs):
                priv = {"user": p_user, "user_bias": p_bias}
                return rk.ranking_errors(model, params, priv, r_items, r_n, t_items, t_n,
                                         negs, k=10)

            sums = _chunked(one, (private["user"], private["user_bias"], rated["x"],
                                  rated["n"], test["x"], test["n"], negatives), chunk)
            metrics.update(rk.ranking_summary(*sums))
            per_user.update(hits=sums[0], ndcg=sums[1], ranked=sums[4])
            if implicit:
                metrics["eval_loss"] = _heldout_bce(model, params, private, test["x"],
                                                    mask, negatives)
        return metrics, per_user

    return evaluate


def _heldout_bce(model, params, private, items, mask, negatives) -> jax.Array:
    """Mean binary cross-entropy of the held-out items (label 1) and the sampled
    negatives (label 0), with log-sigmoid for stability."""
    pos = -jax.nn.log_sigmoid(predict_users(model, params, private, items))
    neg = -jax.nn.log_sigmoid(-predict_users(model, params, private, negatives))
    has = jnp.any(mask, 1, keepdims=True)
    total = jnp.sum(jnp.where(mask, pos, 0.0)) + jnp.sum(jnp.where(has, neg, 0.0))
    count = jnp.sum(mask) + jnp.sum(has) * negatives.shape[1]
    return total / jnp.maximum(count, 1)


__all__ = ["RANKING_CHUNK", "evaluate_recommender", "stored_factors"]
