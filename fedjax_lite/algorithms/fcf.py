"""FCF: Federated Collaborative Filtering with private user factors and sparse item updates.

Ammad-ud-din et al., "Federated Collaborative Filtering for Privacy-Preserving
Personalized Recommendation System", arXiv:1901.09888, 2019: every user's ratings and
user factor stay on the user's device; the server holds the item factors and aggregates
the users' item-factor updates. Here with the biased MF model
(:mod:`fedjax_lite.models.mf`), local SGD (any optax client optimizer) instead of the
paper's ALS step for p_u, and any optax server optimizer:

    for each round t:
        S_t <- cohort                                                 (core.round)
        for each user u in S_t, in parallel:                          (vmap)
            rows_u <- Q_t[I_u], b_t[I_u]          the rows of the items u rated
            (p_u, b_u, rows_u, mu_u) <- ClientOpt epochs on u's ratings, starting from
                                         u's PRIVATE (p_u, b_u) and the global rows
            send  Delta rows_u = rows_u - Q_t[I_u] (aligned with I_u), Delta mu_u
            keep  (p_u, b_u) in u's client state                      (never sent)
        Delta Q[i] = sum_{u rated i} w_u Delta rows_u[i] / sum_{u rated i} w_u   (sparse
                     per-item mean, ``item_aggregation: raters``; or / sum_u w_u: ``all``)
        (Q, b, mu)_{t+1} = ServerOpt((Q, b, mu)_t, -Delta)

Private state: a population-sized client state (``FcfState.private``: p_u [U, k], b_u [U])
gathered for the cohort and scattered back inside the compiled round -- the simulator's
stand-in for the users' devices. It never enters ``params``, the server optimizer's state,
the aggregator's input or its state; it is checkpointed with the run (so ``--resume`` is
exact). A user who drops out keeps its old private parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms.fedavg import (check_weighting, client_weights,
                                           cohort_train_loss, server_update)
from fedjax_lite.core import client_state
from fedjax_lite.core.aggregators import Aggregator
from fedjax_lite.core.faults import Faults, apply_faults
from fedjax_lite.core.local import local_train_chunk, row_step
from fedjax_lite.core.micro import check_micro_cohort, micro_uplink_aggregate
from fedjax_lite.core.round import (Cohort, EngineOptions, FederatedAlgorithm, client_keys,
                                    local_training_chunk, map_cohort)
from fedjax_lite.core.sparse import SparseUpdate, sparse_mean
from fedjax_lite.models.mf import (MatrixFactorization, gather_rows, rating_errors,
                                   rating_summary)


class FcfState(NamedTuple):
    params: Any        # GLOBAL: {'item': [I, k], 'item_bias': [I], 'mu': []}
    opt_state: Any     # server optimizer state (global-shaped)
    agg_state: Any
    round: jax.Array
    private: Any       # CLIENT side: {'user': [U, k], 'user_bias': [U]}, one row per user


def fcf(model: MatrixFactorization, *, num_users: int, init_key: jax.Array,
        client_optimizer: optax.GradientTransformation,
        server_optimizer: optax.GradientTransformation, local_epochs: int, batch_size: int,
        weighting: str = "uniform", item_aggregation: str = "raters",
        aggregator: Aggregator | None = None, faults: Faults = Faults(),
        engine: EngineOptions = EngineOptions(), row_sgd_lr: float | None = None
        ) -> FederatedAlgorithm:
    """Builds FCF for a population of ``num_users`` (population rows = users).

    ``aggregator``: a sparse aggregator (:func:`fedjax_lite.core.sparse.sparse_mean` by
    default, with ``item_aggregation``; or the sparse DP mechanism). ``faults``: dropout
    only (updates are sparse: attacks and compression are not defined on them).
    ``init_key``: draws the users' initial private factors (never data).
    ``row_sgd_lr``: the learning rate when ``client_optimizer`` is plain SGD: local steps
    then move only the batch's item rows (:func:`~fedjax_lite.core.local.local_train_chunk`'s
    sparse step; the same arithmetic up to float rounding, O(batch) instead of O(rated
    items) per step).
    """
    check_weighting(weighting)
    if faults.attack is not None or faults.compressor is not None or faults.error_feedback:
        raise ValueError("fcf: only dropout faults apply to sparse item updates")
    aggregator = aggregator or sparse_mean(model.num_items, item_aggregation)
    check_micro_cohort(engine, aggregator, faults, algorithm="fcf")

    def init(params) -> FcfState:
        return FcfState(params, server_optimizer.init(params), aggregator.init(params),
                        jnp.zeros((), jnp.int32), model.init_private(init_key, num_users))

    def client_update(params, items, ratings, n, orders, private):
        """Users of a chunk (leading axis K): local epochs from their private parameters
        and their items' global rows; returns (sparse update, new private, stats)."""
        K, N = items.shape
        rows = gather_rows(params, items)                               # [K, N, k], [K, N]
        local0 = {**private, **rows, "mu": jnp.broadcast_to(params["mu"], (K,))}
        slots = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (K, N))
        local, stats = local_train_chunk(model.local_loss, client_optimizer, local0, slots,
                                         ratings, n, orders, local_epochs=local_epochs,
                                         batch_size=batch_size, unroll=engine.unroll,
                                         per_client_params=True, **row_step(row_sgd_lr))
        update = SparseUpdate(
            rows={name: local[name] - rows[name] for name in rows},
            index=items, mask=jnp.arange(N)[None, :] < n[:, None],
            dense={"mu": local["mu"] - params["mu"]})
        return update, {"user": local["user"], "user_bias": local["user_bias"]}, stats

    def apply(state: FcfState, cohort: Cohort, key: jax.Array):
        if cohort.num_clients != num_users:      # static: at trace time
            raise ValueError(f"fcf: num_users={num_users} but the population has "
                             f"{cohort.num_clients} rows")
        agg_key, train_key = jax.random.split(key)
        keys = client_keys(train_key, cohort.index)
        private = client_state.gather(state.private, cohort)
        chunk_fn = local_training_chunk(lambda *a: client_update(state.params, *a),
                                        local_epochs=local_epochs)
        if engine.micro_cohort is not None:
            # micro-cohorts: only [micro_cohort, N, k] of row updates exist at a time,
            # summed into the [I, k] tables as they come (the aggregator's Reduction)
            def split_outputs(*a):
                update, new_private, stats = chunk_fn(*a)
                return update, (new_private, stats)
            delta, weights, agg_state, (new_private, stats), fault_metrics = (
                micro_uplink_aggregate(split_outputs, cohort, (keys, private),
                                       client_weights(cohort, weighting), state.agg_state,
                                       agg_key, aggregator=aggregator, faults=faults,
                                       options=engine))
            agg_metrics = {}
        else:
            update, new_private, stats = map_cohort(chunk_fn, cohort, (keys, private),
                                                    engine)
            _, weights, fault_metrics = apply_faults(faults, update.dense,
                                                     client_weights(cohort, weighting),
                                                     cohort.index, agg_key)
            delta, agg_state, agg_metrics = aggregator.apply(update, weights,
                                                             state.agg_state, agg_key)
        params, opt_state = server_update(server_optimizer, state.params, state.opt_state,
                                          delta, weights, always=aggregator.private)
        private = client_state.scatter(state.private, cohort, new_private, keep=weights <= 0)
        metrics = {"train_loss": cohort_train_loss(stats), **fault_metrics, **agg_metrics}
        return FcfState(params, opt_state, agg_state, state.round + 1, private), metrics

    return FederatedAlgorithm(init, apply)


def evaluate_ratings(model: MatrixFactorization):
    """``evaluate(state, test) -> {eval_loss (MSE), eval_rmse, eval_mae}`` on held-out
    ratings of the training users (test row u = population row u), predictions clipped
    to the rating scale."""
    def evaluate(state, test: dict) -> dict:
        items, ratings, n = test["x"], test["y"], test["n"]
        mask = jnp.arange(items.shape[1])[None, :] < n[:, None]
        return rating_summary(*rating_errors(model, state.params, state.private, items,
                                             ratings, mask))
    return evaluate


__all__ = ["FcfState", "evaluate_ratings", "fcf"]
