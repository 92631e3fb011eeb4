"""The two references every federated recommender is judged against, on the same model,
data, optimizer and round loop as :mod:`~fedjax_lite.algorithms.fcf`:

``centralized`` -- the upper reference: all users' ratings pooled on one server, which
trains the whole biased MF model (item AND user parameters) by minibatch descent on the
per-rating objective of Koren et al. 2009, eq. (5) (the recipe of Funk's SVD and of
Surprise's ``SVD``):

    each round = local_epochs epochs; each epoch walks a fresh random order of all R
    pooled ratings in minibatches b of batch_size (the last partial):
        theta <- ClientOpt(theta, grad_theta mean_{(u,i,r) in b}
                     [(r_hat(u,i) - r)^2 + l2 (|p_u|^2 + |q_i|^2 + b_u^2 + b_i^2)])

The cohort drawn by the round is ignored (every rating is used every epoch); nothing is
federated, so it takes no server optimizer or aggregator. The user table lives in
``private`` as in FCF, so the same evaluation applies.

``local_only`` -- the lower reference: every user trains the whole model alone on its own
ratings, nothing is ever sent or shared. Each user starts from the same data-independent
init (Q_0, b_i = 0, mu_0 = the middle of the scale) and keeps its own copy of everything
(p_u, b_u, its own mu_u and its own rows of Q and b_i for the items it rated) in a
population-sized client state; a round trains the cohort's users for local_epochs
epochs with the client optimizer, exactly as FCF's local step. An item a user never rated
keeps (Q_0[i], 0) for that user, so on held-out items local_only predicts
mu_u + b_u + p_u . Q_0[i]: the user's own average, which is all a user alone can know.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fedjax_lite.algorithms.fedavg import cohort_train_loss
from fedjax_lite.core import client_state
from fedjax_lite.core.local import local_train_chunk, row_step
from fedjax_lite.core.round import (Cohort, EngineOptions, FederatedAlgorithm, client_keys,
                                    local_training_chunk, map_cohort)
from fedjax_lite.models.mf import MatrixFactorization, gather_rows


class CentralState(NamedTuple):
    params: Any        # {'item': [I, k], 'item_bias': [I], 'mu': []}
    opt_state: Any     # the optimizer's state over {'global': params, 'private': private}
    round: jax.Array
    private: Any       # {'user': [U, k], 'user_bias': [U]} (on the server: centralized)


class LocalOnlyState(NamedTuple):
    params: Any        # the shared INIT (Q_0, b_i = 0, mu_0); never updated
    round: jax.Array
    private: Any       # per user: 'user' [U, k], 'user_bias' [U], 'mu' [U],
    #                    'item' [U, N, k], 'item_bias' [U, N] (rows of its rated items)


def pooled_order(key: jax.Array, n: jax.Array, num_slots: int, num_ratings: int
                 ) -> jax.Array:
    """A uniformly random order of the ``num_ratings`` real ratings of a padded [U, N]
    population (``n`` real per row), as flat indices u * N + j. ``num_ratings`` must
    equal ``sum(n)`` (static: it sets the number of steps)."""
    valid = (jnp.arange(num_slots)[None, :] < n[:, None]).reshape(-1)
    flat = jnp.nonzero(valid, size=num_ratings, fill_value=0)[0]
    return flat[jax.random.permutation(key, num_ratings)]


def central_loss(model: MatrixFactorization, theta: dict, users, items, ratings, mask):
    """Koren's per-rating objective averaged over a minibatch's real entries, and its data
    loss (MSE; binary cross-entropy for the implicit objective). ``theta`` = {'global':
    params, 'private': the user table}."""
    g, p = theta["global"], theta["private"]
    q, bi = g["item"][items], g["item_bias"][items]
    pu, bu = p["user"][users], p["user_bias"][users]
    score = g["mu"] + bu + bi + jnp.sum(pu * q, -1)
    if model.objective == "bce":       # implicit feedback: label 0/1, score = logit
        data = jax.nn.softplus(score) - ratings * score
    else:
        data = (score - ratings) ** 2
    m = mask.astype(score.dtype)
    count = jnp.maximum(jnp.sum(m), 1.0)
    reg = jnp.sum(pu * pu, -1) + jnp.sum(q * q, -1) + bu * bu + bi * bi
    loss = jnp.sum(m * data) / count
    return loss + model.l2 * jnp.sum(m * reg) / count, loss


def centralized(model: MatrixFactorization, *, num_users: int, num_ratings: int,
                init_key: jax.Array, optimizer: optax.GradientTransformation,
                epochs_per_round: int, batch_size: int) -> FederatedAlgorithm:
    """Pooled-data minibatch training of the whole MF model (see the module docstring).
    ``num_ratings``: the training ratings in the population (static)."""
    if num_ratings < 1:
        raise ValueError("centralized: the population holds no ratings")
    B = min(batch_size, num_ratings)
    S = -(-num_ratings // B)
    grad_fn = jax.value_and_grad(lambda t, *b: central_loss(model, t, *b), has_aux=True)

    def init(params) -> CentralState:
        private = model.init_private(init_key, num_users)
        return CentralState(params, optimizer.init({"global": params, "private": private}),
                            jnp.zeros((), jnp.int32), private)

    def epoch(carry, key, population):
        theta, opt_state, loss_sum = carry
        U, N = population["x"].shape
        order = pooled_order(key, population["n"], N, num_ratings)
        order = jnp.concatenate([order, jnp.zeros(S * B - num_ratings, order.dtype)])
        real = (jnp.arange(S * B) < num_ratings).reshape(S, B)
        items = population["x"].reshape(-1)
        ratings = population["y"].reshape(-1)

        def step(c, inputs):
            th, st, acc = c
            idx, m = inputs
            (_, mse), grads = grad_fn(th, idx // N, items[idx], ratings[idx], m)
            updates, st = optimizer.update(grads, st, th)
            return (optax.apply_updates(th, updates), st,
                    acc + mse * jnp.sum(m.astype(jnp.float32))), None

        carry, _ = lax.scan(step, (theta, opt_state, loss_sum), (order.reshape(S, B), real))
        return carry

    def apply(state: CentralState, cohort: Cohort, key: jax.Array):
        population = cohort.population
        if population["n"].shape[0] != num_users:             # static: at trace time
            raise ValueError(f"centralized: num_users={num_users} but the population has "
                             f"{population['n'].shape[0]} rows")
        theta = {"global": state.params, "private": state.private}
        carry = (theta, state.opt_state, jnp.zeros((), jnp.float32))
        for e in range(epochs_per_round):
            carry = epoch(carry, jax.random.fold_in(key, e), population)
        theta, opt_state, loss_sum = carry
        metrics = {"train_loss": loss_sum / (epochs_per_round * num_ratings)}
        return CentralState(theta["global"], opt_state, state.round + 1,
                            theta["private"]), metrics

    return FederatedAlgorithm(init, apply)


def local_only(model: MatrixFactorization, *, num_users: int, num_slots: int,
               init_key: jax.Array, client_optimizer: optax.GradientTransformation,
               local_epochs: int, batch_size: int,
               engine: EngineOptions = EngineOptions(), row_sgd_lr: float | None = None
               ) -> FederatedAlgorithm:
    """Every user alone (see the module docstring). ``num_slots``: N, the population's
    padded ratings per user (static: the private item rows are [U, N, k])."""

    def init(params) -> LocalOnlyState:
        private = model.init_private(init_key, num_users)
        private["mu"] = jnp.broadcast_to(params["mu"], (num_users,))
        private["item"] = jnp.zeros((num_users, num_slots, model.dim), jnp.float32)
        private["item_bias"] = jnp.zeros((num_users, num_slots), jnp.float32)
        private["started"] = jnp.zeros((num_users,), bool)
        return LocalOnlyState(params, jnp.zeros((), jnp.int32), private)

    def train_chunk(params, items, ratings, n, orders, own):
        # a user's first round starts its item rows from the shared init Q_0
        rows = gather_rows(params, items)
        start = own["started"][:, None]
        local0 = {"user": own["user"], "user_bias": own["user_bias"], "mu": own["mu"],
                  "item": jnp.where(start[..., None], own["item"], rows["item"]),
                  "item_bias": jnp.where(start, own["item_bias"], rows["item_bias"])}
        K, N = items.shape
        slots = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (K, N))
        local, stats = local_train_chunk(model.local_loss, client_optimizer, local0, slots,
                                         ratings, n, orders, local_epochs=local_epochs,
                                         batch_size=batch_size, unroll=engine.unroll,
                                         per_client_params=True, **row_step(row_sgd_lr))
        return {**local, "started": own["started"] | (n > 0)}, stats

    def apply(state: LocalOnlyState, cohort: Cohort, key: jax.Array):
        if cohort.population["x"].shape != (num_users, num_slots):   # static
            raise ValueError(f"local_only: built for {num_users} users x {num_slots} "
                             f"slots, the population is {cohort.population['x'].shape}")
        keys = client_keys(key, cohort.index)
        own = client_state.gather(state.private, cohort)
        chunk_fn = local_training_chunk(lambda *a: train_chunk(state.params, *a),
                                        local_epochs=local_epochs)
        new_own, stats = map_cohort(chunk_fn, cohort, (keys, own), engine)
        private = client_state.scatter(state.private, cohort, new_own)
        return (LocalOnlyState(state.params, state.round + 1, private),
                {"train_loss": cohort_train_loss(stats)})

    return FederatedAlgorithm(init, apply)


def local_only_factors(state: LocalOnlyState) -> dict:
    """Each user's model for items it never rated, in FCF's form: {'user', 'user_bias'}
    with the user's own mu folded into the bias (the global tables are the init)."""
    p = state.private
    return {"user": p["user"], "user_bias": p["user_bias"] + p["mu"] - state.params["mu"]}


__all__ = ["CentralState", "LocalOnlyState", "central_loss", "centralized", "local_only",
           "local_only_factors", "pooled_order"]
