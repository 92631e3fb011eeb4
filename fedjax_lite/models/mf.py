"""Biased matrix factorization for rating prediction.

Koren, Bell and Volinsky, "Matrix Factorization Techniques for Recommender Systems",
IEEE Computer 2009, eq. (4)-(5):

    r_hat(u, i) = mu + b_u + b_i + p_u . q_i
    min  sum_{(u,i) observed} (r_ui - r_hat(u, i))^2 + lambda (|p_u|^2 + |q_i|^2 + b_u^2 + b_i^2)

Split for federated recommendation: the GLOBAL parameters are the item factors Q [I, k],
the item biases b_i [I] and mu; the PRIVATE parameters of user u are p_u [k] and b_u,
which live only in that user's client state. A client's local model holds its private
parameters and the rows of Q and b_i of the items it rated, aligned with its rating slots
(``rows``): it never holds the whole table.

Objectives (``objective``): "mse", Koren's squared error on explicit ratings; "bce", the
implicit-feedback objective of He, Liao, Zhang, Nie, Hu and Chua, "Neural Collaborative
Filtering", WWW 2017, eq. (7): the slots' "ratings" are labels y in {0, 1} (observed items
and sampled unobserved ones, :func:`fedjax_lite.data.ratings_negatives.implicit_training`)
and r_hat(u, i) is a logit,

    min  mean_{(u,i) in slots} BCE(y_ui, sigmoid(r_hat(u, i))) + lambda (same l2 as above)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

OBJECTIVES = ("mse", "bce")


class MatrixFactorization(NamedTuple):
    num_items: int
    dim: int
    l2: float = 0.02            # lambda
    init_scale: float = 0.1     # std of the initial factors
    scale: tuple[float, float] = (1.0, 5.0)   # rating scale (predictions are clipped)
    objective: str = "mse"      # "mse" (explicit ratings) or "bce" (implicit 0/1 labels)

    def check(self) -> None:
        """ValueError for an unknown ``objective``."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"MatrixFactorization: objective must be one of "
                             f"{OBJECTIVES}, got {self.objective!r}")

    def init_global(self, key: jax.Array) -> dict:
        """Q ~ N(0, init_scale^2), b_i = 0, mu = the middle of the rating scale (a
        data-independent start: the mean rating itself is client data)."""
        self.check()
        return {"item": self.init_scale * jax.random.normal(key, (self.num_items, self.dim)),
                "item_bias": jnp.zeros((self.num_items,)),
                "mu": jnp.asarray(0.5 * (self.scale[0] + self.scale[1]), jnp.float32)}

    def init_private(self, key: jax.Array, num_users: int) -> dict:
        """p_u ~ N(0, init_scale^2), b_u = 0 for every user (drawn from a key, never from
        data)."""
        return {"user": self.init_scale * jax.random.normal(key, (num_users, self.dim)),
                "user_bias": jnp.zeros((num_users,))}

    def predict(self, private: dict, rows: dict, mu) -> jax.Array:
        """Unclipped r_hat for one user's slots: private {'user': [k], 'user_bias': []},
        rows {'item': [N, k], 'item_bias': [N]} -> [N]."""
        return mu + private["user_bias"] + rows["item_bias"] + rows["item"] @ private["user"]

    def clip(self, r: jax.Array) -> jax.Array:
        return jnp.clip(r, self.scale[0], self.scale[1])

    def local_loss(self, local: dict, slots: jax.Array, ratings: jax.Array,
                   mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One client's minibatch objective (Koren's, per rating, averaged over the real
        ratings of the batch) and its data loss: the mean squared error ("mse"), or the
        mean binary cross-entropy of the logit r_hat against the 0/1 label in ``ratings``
        ("bce"). ``local`` = the client's model {'user', 'user_bias', 'item' [N, k],
        'item_bias' [N], 'mu'}; ``slots`` int[B] index its rating slots."""
        self.check()                                          # static: at trace time
        rows = {"item": local["item"][slots], "item_bias": local["item_bias"][slots]}
        pred = self.predict(local, rows, local["mu"])
        m = mask.astype(pred.dtype)
        count = jnp.maximum(jnp.sum(m), 1.0)
        if self.objective == "bce":                           # stable log-sigmoid form
            per_slot = optax.sigmoid_binary_cross_entropy(pred, ratings)
        else:
            err = pred - ratings
            per_slot = err * err
        data = jnp.sum(m * per_slot) / count
        reg = (jnp.sum(m * (jnp.sum(rows["item"] ** 2, -1) + rows["item_bias"] ** 2)) / count
               + jnp.sum(local["user"] ** 2) + local["user_bias"] ** 2)
        return data + self.l2 * reg, data


def gather_rows(params: dict, items: jax.Array) -> dict:
    """The global tables' rows for item ids ``items`` (any leading shape)."""
    return {"item": jnp.take(params["item"], items, axis=0, mode="clip"),
            "item_bias": jnp.take(params["item_bias"], items, axis=0, mode="clip")}


def predict_users(model: MatrixFactorization, params: dict, private: dict,
                  items: jax.Array) -> jax.Array:
    """[U, N]: the unclipped r_hat of each user (private leaves [U, ...]) for its items
    ``items`` [U, N] (the logit under the implicit objective)."""
    rows = gather_rows(params, items)
    return jax.vmap(model.predict, in_axes=(0, 0, None))(private, rows, params["mu"])


def rating_errors(model: MatrixFactorization, params: dict, private: dict,
                  items: jax.Array, ratings: jax.Array, mask: jax.Array):
    """Per-user sums over real slots of the clipped prediction's squared and absolute
    errors, and the counts (each float[U]): private leaves [U, ...], items/ratings/mask
    [U, N]."""
    pred = predict_users(model, params, private, items)
    err = jnp.where(mask, model.clip(pred) - ratings, 0.0)
    return (jnp.sum(err * err, 1), jnp.sum(jnp.abs(err), 1),
            jnp.sum(mask.astype(jnp.float32), 1))


def rating_summary(se: jax.Array, ae: jax.Array, count: jax.Array) -> dict:
    """{eval_loss (MSE), eval_rmse, eval_mae} over all rated slots from per-user sums."""
    c = jnp.maximum(jnp.sum(count), 1.0)
    mse = jnp.sum(se) / c
    return {"eval_loss": mse, "eval_rmse": jnp.sqrt(mse), "eval_mae": jnp.sum(ae) / c}


__all__ = ["OBJECTIVES", "MatrixFactorization", "gather_rows", "predict_users",
           "rating_errors",
           "rating_summary"]
