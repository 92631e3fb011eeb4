"""Federated Averaging with server and client optimizers.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017, Algorithm 1 (FederatedAveraging), in the generalized form of
Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 1 (FedOpt):

    for each round t:
        S_t <- random cohort of m clients                      (core.round)
        for each client k in S_t, in parallel:                  (vmap, not a loop)
            x_k <- ClientOpt local epochs on f_k starting at x_t
            Delta_k = x_k - x_t
        Delta_t = sum_k p_k Delta_k / sum_k p_k,  p_k = n_k    (aggregator; eq. "weighted
                                                                 average" of Alg. 1)
        x_{t+1} = ServerOpt(x_t, -Delta_t)                      (server optimizer on the
                                                                 pseudo-gradient -Delta_t)

With ServerOpt = SGD(learning rate 1) this is exactly McMahan et al.'s
``x_{t+1} = sum_k (n_k / n) x_k``. FedAvgM, FedAdam, FedYogi and FedAdagrad are this
function with another optax server optimizer.

Between the clients and the aggregator, :func:`fedjax_lite.core.faults.uplink` applies
the fault model (dropout, attacks, compression); :func:`cohort_delta` runs training,
uplink and aggregation, all at once or (``engine.micro_cohort``) a micro-cohort at a
time. With ``Faults(error_feedback=True)``
the state is :class:`ServerStateEF`, which adds every client's error-feedback residual;
otherwise it is :class:`ServerState` (the FedAvg family, FedProx, FedSGD and FedNova
share both).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.core.aggregators import Aggregator, mean
from fedjax_lite.core.faults import (Faults, check_faults, init_residuals, residuals_of,
                                     uplink)
from fedjax_lite.core.local import local_train_chunk
from fedjax_lite.core.micro import check_micro_cohort, micro_uplink_aggregate
from fedjax_lite.core.round import (Cohort, EngineOptions, FederatedAlgorithm, client_keys,
                                    local_training_chunk, map_cohort)
from fedjax_lite.models.base import Model, masked_mean_loss


class ServerState(NamedTuple):
    params: Any
    opt_state: Any
    agg_state: Any
    round: jax.Array


class ServerStateEF(NamedTuple):
    """:class:`ServerState` plus the error-feedback residuals e_i of every population
    client (params-shaped leaves, leading axis K; :mod:`fedjax_lite.core.faults`)."""
    params: Any
    opt_state: Any
    agg_state: Any
    round: jax.Array
    residuals: Any


def next_state(state, params, opt_state, agg_state, residuals, **extra):
    """The state after a round, of the same type as ``state`` (``residuals`` is None
    for states without that field; ``extra``: further fields, e.g. SCAFFOLD's)."""
    new = state._replace(params=params, opt_state=opt_state, agg_state=agg_state,
                         round=state.round + 1, **extra)
    return new if residuals is None else new._replace(residuals=residuals)


def server_update(tx: optax.GradientTransformation, params, opt_state, delta,
                  weights: jax.Array, always: bool = False):
    """x_{t+1} = ServerOpt(x_t, pseudo-gradient = -Delta_t).

    A round in which no client reported (all ``weights`` 0) keeps the model AND the
    server optimizer state: a zero pseudo-gradient would still move FedAdam/FedAvgM --
    unless ``always`` (a DP aggregate, ``Aggregator.private``: its noise is released every
    round, so an empty cohort stays indistinguishable from a non-empty one).
    """
    pseudo_grad = jax.tree.map(jnp.negative, delta)
    updates, new_opt_state = tx.update(pseudo_grad, opt_state, params)
    reported = True if always else jnp.sum(weights) > 0
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(reported, a, b), new, old)
    return keep(optax.apply_updates(params, updates), params), keep(new_opt_state, opt_state)


def check_weighting(weighting: str) -> None:
    if weighting not in ("examples", "uniform"):
        raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")


def client_weights(cohort: Cohort, weighting: str) -> jax.Array:
    """p_k: ``examples`` (n_k, McMahan et al.) or ``uniform`` (1); 0 for padding slots."""
    check_weighting(weighting)
    return (cohort.n.astype(jnp.float32) if weighting == "examples"
            else cohort.mask.astype(jnp.float32))


def server_state_init(server_optimizer: optax.GradientTransformation,
                      aggregator: Aggregator, faults: Faults = Faults()):
    """``init(params) -> ServerState`` (``ServerStateEF`` with error feedback) shared by
    the FedAvg family. Validates ``faults``."""
    check_faults(faults)

    def init(params):
        fields = (params, server_optimizer.init(params), aggregator.init(params),
                  jnp.zeros((), jnp.int32))
        residuals = init_residuals(faults, params)
        return ServerState(*fields) if residuals is None else ServerStateEF(*fields,
                                                                            residuals)
    return init


def data_loss(model: Model):
    """The plain local objective: mean loss over the batch's real examples (reported as
    is)."""
    def loss_fn(p, xb, yb, mb):
        loss = masked_mean_loss(model, p, xb, yb, mb)
        return loss, loss
    return loss_fn


def local_delta(loss_fn, client_optimizer: optax.GradientTransformation, *,
                local_epochs: int, batch_size: int, unroll: int):
    """FedAvg's client for a chunk: ``client_update(x_t, x, y, n, orders)`` runs
    ClientOpt for the local epochs on ``loss_fn`` from x_t and returns (Delta_k = x_k -
    x_t, stats)."""
    def client_update(server_params, x, y, n, orders):
        params, stats = local_train_chunk(loss_fn, client_optimizer, server_params, x, y, n,
                                          orders, local_epochs=local_epochs,
                                          batch_size=batch_size, unroll=unroll)
        return jax.tree.map(lambda p, s: p - s, params, server_params), stats
    return client_update


def cohort_train_loss(stats) -> jax.Array:
    """Mean data loss over every real example processed in the cohort's local steps."""
    return jnp.sum(stats.loss_sum) / jnp.maximum(jnp.sum(stats.examples), 1.0)


def cohort_delta(chunk_fn, cohort: Cohort, per_client: tuple, weights: jax.Array, state,
                 key: jax.Array, *, aggregator: Aggregator, faults: Faults,
                 engine: EngineOptions):
    """The clients' updates (``chunk_fn`` -> (Delta_k, stats), run by ``map_cohort``),
    the uplink's faults and the aggregate Delta_t, with ``key`` the aggregation key.
    With ``engine.micro_cohort`` the same, a micro-cohort at a time with a running sum
    (:mod:`fedjax_lite.core.micro`: never the [C, params] stack; equal to float
    tolerance). Returns (Delta_t, weights after faults, agg_state, residuals or None,
    stats [C], metrics)."""
    if engine.micro_cohort is not None:
        delta, weights, agg_state, stats, metrics = micro_uplink_aggregate(
            chunk_fn, cohort, per_client, weights, state.agg_state, key,
            aggregator=aggregator, faults=faults, options=engine)
        return delta, weights, agg_state, None, stats, metrics
    deltas, stats = map_cohort(chunk_fn, cohort, per_client, engine)
    deltas, weights, residuals, fault_metrics = uplink(faults, deltas, weights, cohort, key,
                                                       residuals_of(state))
    delta, agg_state, agg_metrics = aggregator.apply(deltas, weights, state.agg_state, key)
    return delta, weights, agg_state, residuals, stats, {**fault_metrics, **agg_metrics}


def fedavg_round(state, cohort: Cohort, key: jax.Array, client_update, *,
                 server_optimizer: optax.GradientTransformation, local_epochs: int,
                 weighting: str, aggregator: Aggregator, faults: Faults,
                 engine: EngineOptions):
    """FedAvg's round on ``state`` (any state with FedAvg's fields; the others are kept):
    ``client_update(x_t, x, y, n, orders)`` -> (Delta_k, stats) for a chunk, run from
    the train half of ``key``, then uplink, aggregation and the server step. Returns
    (state, metrics, the clients' weights after faults: 0 for those that did not
    report)."""
    agg_key, train_key = jax.random.split(key)
    keys = client_keys(train_key, cohort.index)
    chunk_fn = local_training_chunk(lambda *a: client_update(state.params, *a),
                                    local_epochs=local_epochs)
    delta, weights, agg_state, residuals, stats, round_metrics = cohort_delta(
        chunk_fn, cohort, (keys,), client_weights(cohort, weighting), state, agg_key,
        aggregator=aggregator, faults=faults, engine=engine)
    params, opt_state = server_update(server_optimizer, state.params, state.opt_state,
                                      delta, weights, always=aggregator.private)
    metrics = {"train_loss": cohort_train_loss(stats), **round_metrics}
    return next_state(state, params, opt_state, agg_state, residuals), metrics, weights


def fedavg(model: Model, *, client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation, local_epochs: int,
           batch_size: int, weighting: str = "examples", aggregator: Aggregator | None = None,
           faults: Faults = Faults(),
           engine: EngineOptions = EngineOptions()) -> FederatedAlgorithm:
    """Builds FedAvg. ``weighting``: ``examples`` (p_k = n_k, the paper's) or ``uniform``."""
    aggregator = aggregator or mean()
    check_weighting(weighting)
    check_micro_cohort(engine, aggregator, faults, algorithm="fedavg")
    init = server_state_init(server_optimizer, aggregator, faults)
    # clients k of a chunk: x_k <- ClientOpt epochs from x_t; Delta_k = x_k - x_t
    client_update = local_delta(data_loss(model), client_optimizer,
                                local_epochs=local_epochs, batch_size=batch_size,
                                unroll=engine.unroll)

    def apply(state: ServerState, cohort: Cohort, key: jax.Array):
        return fedavg_round(state, cohort, key, client_update,
                            server_optimizer=server_optimizer, local_epochs=local_epochs,
                            weighting=weighting, aggregator=aggregator, faults=faults,
                            engine=engine)[:2]

    return FederatedAlgorithm(init, apply)
