"""FedRecon: Federated Reconstruction of private user parameters, nothing stored.

Singhal, Sidahmed, Garrett, Wu, Rush and Prakash, "Federated Reconstruction: Partially
Local Federated Learning", NeurIPS 2021 (arXiv:2102.03448), Algorithm 1, for the biased MF
model (:mod:`fedjax_lite.models.mf`): global g = (Q, b_i, mu), local l_u = (p_u, b_u).

    for each round t:
        S_t <- cohort                                                   (core.round)
        for each user u in S_t, in parallel:                            (vmap)
            (D_s, D_q) <- split u's ratings: a random support_fraction of them (a fresh
                          permutation from u's round key) is the support set D_s, the rest
                          the query set D_q                  (:func:`support_query_split`)
            l_u <- ReconstructionInit() = (p_u, b_u) = (0, 0)
            l_u <- recon_steps epochs of ReconOpt on f_u(l, g_t; D_s), g_t FROZEN  (R)
            g_u <- local_epochs of ClientOpt on f_u(l_u, g; D_q), l_u FIXED, g from g_t
                   (only the rows of Q, b_i of u's items, and mu, move)        (U)
            send  Delta_u = g_u - g_t: row deltas aligned with u's query items, Delta mu
                  n_u = |D_q|                                   (weight, ``examples``)
            forget l_u                                          (nothing is kept)
        Delta = per-item weighted mean of the Delta_u (``raters``: over the users whose
                query set holds the item; ``all``: over all reporting users), or the DP one
        g_{t+1} = ServerOpt(g_t, -Delta)

Reconstruction starts every round from the same fixed, data-independent point: Algorithm 1
keeps no local state between rounds (l_u comes from a fresh initialization, not from a
previous round; the authors' TFF implementation, ``tff.learning.reconstruction``, builds
the local variables anew from their initializers in every client update). Here p_u = 0,
b_u = 0, where the model predicts mu + b_i: a user with nothing to reconstruct from is
served the population's prediction. (Zero is no saddle here, as it would be with both
factors at zero: Q is not, and the gradient in p_u -- the error-weighted sum of the item
factors -- moves p_u at the first step.)

The support and query sets are disjoint -- the TFF library's ``split_dataset=True``
(even / odd batches there, a random ``support_fraction`` here; its default instead reuses
all the data for both stages). A user with n >= 2 ratings has at least one in each set. A
user with ONE rating has an empty support set: the rating is its query set, trained on
(and, in evaluation, predicted) with (p_u, b_u) at the init, as a cold-start user. A user
with no rating sends nothing (weight 0).

Privacy: the server never holds a user-indexed array: the state is (params, opt_state,
agg_state, round), and (p_u, b_u) exist only inside one client's update and are dropped
at its end, never sent, never persisted between rounds. What the server receives depends
on the user's data only through its own sparse update -- row deltas of its query items,
Delta mu, which items those are, and with ``examples`` weighting |D_q| -- the same message
as FCF's; support-only slots carry zero deltas and are masked out (not counted as raters).
Two rounds of the same user from the same globals and key send identical updates.

Evaluation (the paper's): reconstruct (p_u, b_u) on a support part of a user's ratings with
g frozen, predict the rest -- how users never seen in training are served
(:func:`evaluate_reconstruction`); training users are reconstructed from their training
ratings and scored on their test ratings (:func:`evaluate_train_test`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms.fedavg import (ServerState, check_weighting, cohort_train_loss,
                                           server_update)
from fedjax_lite.core.aggregators import Aggregator
from fedjax_lite.core.faults import Faults, apply_faults
from fedjax_lite.core.local import local_train_chunk, row_step
from fedjax_lite.core.micro import check_micro_cohort
from fedjax_lite.core.round import (Cohort, EngineOptions, FederatedAlgorithm, client_keys,
                                    make_cohort, map_cohort)
from fedjax_lite.core.shuffle import epoch_orders_lanes
from fedjax_lite.core.sparse import SparseUpdate, sparse_mean
from fedjax_lite.models.mf import (MatrixFactorization, gather_rows, rating_errors,
                                   rating_summary)


class Split(NamedTuple):
    support: jax.Array     # int32[K, N]: slot ids, the first n_support are the support set
    n_support: jax.Array   # int32[K]
    query: jax.Array       # int32[K, N]: slot ids, the first n_query are the query set
    n_query: jax.Array     # int32[K]
    is_query: jax.Array    # bool[K, N]: slot j is in the query set


def support_query_split(keys: jax.Array, n: jax.Array, num_slots: int,
                        support_fraction: float) -> Split:
    """Splits each user's n real slots by a random permutation (from its key; independent
    of the padded length): n_support = round(support_fraction * n) clipped to [1, n - 1]
    for n >= 2, 0 for n <= 1 (a single rating is a query rating)."""
    perm = epoch_orders_lanes(keys, n, num_slots, 1)[0].T                   # [K, N]
    n_s = jnp.floor(support_fraction * n + 0.5).astype(jnp.int32)
    n_s = jnp.where(n >= 2, jnp.clip(n_s, 1, n - 1), 0)
    pos = jnp.arange(num_slots)[None, :]
    query = jnp.take_along_axis(perm, (pos + n_s[:, None]) % num_slots, axis=1)
    rows = jnp.arange(perm.shape[0])[:, None]
    is_query = jnp.zeros(perm.shape, bool).at[rows, perm].set(
        (pos >= n_s[:, None]) & (pos < n[:, None]))
    return Split(perm, n_s, query, n - n_s, is_query)


def reconstruct(model: MatrixFactorization, tx: optax.GradientTransformation, rows: dict,
                mu: jax.Array, slots: jax.Array, ratings: jax.Array, n: jax.Array,
                keys: jax.Array, *, steps: int, batch_size: int, unroll: int = 4):
    """Algorithm 1's R for K users: (p_u, b_u) from the init (zeros) by ``steps`` epochs of
    ``tx`` on each user's ratings in slots ``slots[:, :n]`` (int32[K, N] slot ids into
    its ``ratings`` [K, N] and ``rows`` {'item' [K, N, k], 'item_bias' [K, N]}), with the
    rows and ``mu`` FROZEN: they enter the loss as constants, so the optimizer only sees
    the private parameters. Returns ({'user' [K, k], 'user_bias' [K]}, LocalStats)."""
    K, N = slots.shape

    def loss(private, s, r, m, rows_u, mu_u):
        return model.local_loss({**private, **rows_u, "mu": mu_u}, s, r, m)

    init = {"user": jnp.zeros((model.dim,), rows["item"].dtype),
            "user_bias": jnp.zeros((), rows["item"].dtype)}
    orders = epoch_orders_lanes(keys, n, N, steps)
    y = jnp.take_along_axis(ratings, slots, axis=1)
    return local_train_chunk(loss, tx, init, slots, y, n, orders, local_epochs=steps,
                             batch_size=batch_size, unroll=unroll,
                             extra=(rows, jnp.broadcast_to(mu, (K,))))


def fedrecon(model: MatrixFactorization, *, client_optimizer: optax.GradientTransformation,
             server_optimizer: optax.GradientTransformation, local_epochs: int,
             batch_size: int, recon_steps: int = 1, support_fraction: float = 0.5,
             recon_optimizer: optax.GradientTransformation | None = None,
             weighting: str = "uniform", item_aggregation: str = "raters",
             aggregator: Aggregator | None = None, faults: Faults = Faults(),
             engine: EngineOptions = EngineOptions(), row_sgd_lr: float | None = None
             ) -> FederatedAlgorithm:
    """Builds FedRecon; ``init(params) -> ServerState`` (no client state of any size).

    ``recon_steps``: epochs of ``recon_optimizer`` (default ``client_optimizer``) on the
    support set; ``local_epochs``: epochs of ``client_optimizer`` on the query set.
    ``weighting``: ``uniform`` or ``examples`` (n_u = |D_q|, Algorithm 1). ``aggregator``:
    a sparse aggregator (``sparse_mean`` with ``item_aggregation`` by default, or the
    sparse DP mechanism). ``faults``: dropout only, as for FCF. ``row_sgd_lr``: as for
    FCF (the global update's sparse SGD step).
    """
    check_weighting(weighting)
    check_micro_cohort(engine, algorithm="fedrecon")
    if not 0 < support_fraction < 1:
        raise ValueError(f"fedrecon: support_fraction must be in (0, 1), got "
                         f"{support_fraction!r}")
    if recon_steps < 1:
        raise ValueError(f"fedrecon: recon_steps must be >= 1, got {recon_steps!r}")
    if faults.attack is not None or faults.compressor is not None or faults.error_feedback:
        raise ValueError("fedrecon: only dropout faults apply to sparse item updates")
    recon_tx = recon_optimizer or client_optimizer
    aggregator = aggregator or sparse_mean(model.num_items, item_aggregation)

    def init(params) -> ServerState:
        return ServerState(params, server_optimizer.init(params), aggregator.init(params),
                           jnp.zeros((), jnp.int32))

    def client_update(params, items, ratings, n, keys):
        """Users of a chunk (leading axis K): split, reconstruct, update the globals."""
        K, N = items.shape
        split_keys, recon_keys, train_keys = jnp.moveaxis(
            jax.vmap(lambda k: jax.random.split(k, 3))(keys), 1, 0)
        sp = support_query_split(split_keys, n, N, support_fraction)
        rows = gather_rows(params, items)                               # [K, N, k], [K, N]
        private, recon_stats = reconstruct(                                         # (R)
            model, recon_tx, rows, params["mu"], sp.support, ratings, sp.n_support,
            recon_keys, steps=recon_steps, batch_size=batch_size, unroll=engine.unroll)

        def global_loss(g, s, r, m, private_u):                                     # (U)
            return model.local_loss({**private_u, **g}, s, r, m)

        g0 = {**rows, "mu": jnp.broadcast_to(params["mu"], (K,))}
        y_q = jnp.take_along_axis(ratings, sp.query, axis=1)
        orders = epoch_orders_lanes(train_keys, sp.n_query, N, local_epochs)
        g, stats = local_train_chunk(global_loss, client_optimizer, g0, sp.query, y_q,
                                     sp.n_query, orders, local_epochs=local_epochs,
                                     batch_size=batch_size, unroll=engine.unroll,
                                     extra=(private,), per_client_params=True,
                                     **row_step(row_sgd_lr))
        update = SparseUpdate(rows={name: g[name] - rows[name] for name in rows},
                              index=items, mask=sp.is_query,
                              dense={"mu": g["mu"] - params["mu"]})
        return update, sp.n_query, stats, recon_stats       # private dropped here

    def apply(state: ServerState, cohort: Cohort, key: jax.Array):
        agg_key, train_key = jax.random.split(key)
        keys = client_keys(train_key, cohort.index)
        update, n_query, stats, recon_stats = map_cohort(
            lambda x, y, n, k: client_update(state.params, x, y, n, k), cohort, (keys,),
            engine)
        base = n_query.astype(jnp.float32) if weighting == "examples" else 1.0
        weights = jnp.where(cohort.mask & (n_query > 0), base, 0.0)
        _, weights, fault_metrics = apply_faults(faults, update.dense, weights,
                                                 cohort.index, agg_key)
        delta, agg_state, agg_metrics = aggregator.apply(update, weights, state.agg_state,
                                                         agg_key)
        params, opt_state = server_update(server_optimizer, state.params, state.opt_state,
                                          delta, weights, always=aggregator.private)
        metrics = {"train_loss": cohort_train_loss(stats),
                   "recon_loss": cohort_train_loss(recon_stats),
                   **fault_metrics, **agg_metrics}
        return ServerState(params, opt_state, agg_state, state.round + 1), metrics

    return FederatedAlgorithm(init, apply)


def evaluate_reconstruction(model: MatrixFactorization, *, recon_steps: int,
                            recon_optimizer: optax.GradientTransformation, batch_size: int,
                            support_fraction: float, key: jax.Array,
                            engine: EngineOptions = EngineOptions()):
    """``evaluate(state, data) -> {eval_loss (MSE), eval_rmse, eval_mae}``: every user of
    ``data`` ({x, y, n}; e.g. users never seen in training) is split as in training
    (:func:`support_query_split`, from ``key`` and the user's row), reconstructed on its
    support part with the global parameters frozen, and scored on its query part
    (predictions clipped to ``model.scale``)."""
    def chunk(params, items, ratings, n, keys):
        split_keys, recon_keys = jnp.moveaxis(
            jax.vmap(lambda k: jax.random.split(k, 2))(keys), 1, 0)
        sp = support_query_split(split_keys, n, items.shape[1], support_fraction)
        rows = gather_rows(params, items)
        private, _ = reconstruct(model, recon_optimizer, rows, params["mu"], sp.support,
                                  ratings, sp.n_support, recon_keys, steps=recon_steps,
                                  batch_size=batch_size, unroll=engine.unroll)
        return rating_errors(model, params, private, items, ratings, sp.is_query)

    def evaluate(state, data: dict) -> dict:
        users = jnp.arange(data["n"].shape[0], dtype=jnp.int32)
        out = map_cohort(lambda x, y, n, k: chunk(state.params, x, y, n, k),
                         make_cohort(data, users), (client_keys(key, users),), engine)
        return rating_summary(*out)

    return evaluate


def reconstruct_users(model: MatrixFactorization, *, recon_steps: int,
                      recon_optimizer: optax.GradientTransformation, batch_size: int,
                      key: jax.Array, engine: EngineOptions = EngineOptions()):
    """``factors(params, train) -> {'user' [U, k], 'user_bias' [U]}``: every user of
    ``train`` ({x, y, n}) reconstructs (p_u, b_u) from ALL its training ratings (the
    support set) with the global parameters frozen. A user without training ratings keeps
    the init (zeros)."""
    def chunk(params, items, ratings, n, keys):
        K, N = items.shape
        slots = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (K, N))
        private, _ = reconstruct(model, recon_optimizer, gather_rows(params, items),
                                  params["mu"], slots, ratings, n, keys, steps=recon_steps,
                                  batch_size=batch_size, unroll=engine.unroll)
        return private

    def factors(params, train: dict) -> dict:
        users = jnp.arange(train["n"].shape[0], dtype=jnp.int32)
        return map_cohort(lambda x, y, n, k: chunk(params, x, y, n, k),
                          make_cohort(train, users), (client_keys(key, users),), engine)

    return factors


def evaluate_train_test(model: MatrixFactorization, *, recon_steps: int,
                        recon_optimizer: optax.GradientTransformation, batch_size: int,
                        support_fraction: float | None = None, key: jax.Array,
                        engine: EngineOptions = EngineOptions()):
    """``evaluate(state, train, test) -> {eval_loss, eval_rmse, eval_mae}`` for training
    users (row u of ``train`` and ``test`` = the same user): (p_u, b_u) are reconstructed
    from ALL of u's training ratings (:func:`reconstruct_users`; ``support_fraction`` is
    unused, kept for a signature like :func:`evaluate_reconstruction`'s), then u's test
    ratings are predicted."""
    del support_fraction
    factors = reconstruct_users(model, recon_steps=recon_steps,
                                recon_optimizer=recon_optimizer, batch_size=batch_size,
                                key=key, engine=engine)

    def evaluate(state, train: dict, test: dict) -> dict:
        U = train["n"].shape[0]
        if test["n"].shape[0] != U:                                # static: trace time
            raise ValueError(f"evaluate_train_test: train has {U} users, test has "
                             f"{test['n'].shape[0]}; row u must be the same user in both")
        mask = jnp.arange(test["x"].shape[1])[None, :] < test["n"][:, None]
        return rating_summary(*rating_errors(model, state.params,
                                             factors(state.params, train), test["x"],
                                             test["y"], mask))

    return evaluate


__all__ = ["Split", "evaluate_reconstruction", "evaluate_train_test", "fedrecon",
           "reconstruct", "reconstruct_users", "support_query_split"]
