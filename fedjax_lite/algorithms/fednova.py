"""FedNova: federated normalized averaging.

Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", NeurIPS 2020, Sec. 4 (FedNova), for local SGD without momentum (the
paper's a_k = [1, ..., 1], so ||a_k||_1 = tau_k):

    for each round t:
        S_t <- random cohort of m clients                               (core.round)
        for each client k in S_t, in parallel:                           (vmap)
            x_k <- tau_k local SGD steps on F_k from x_t                 (1)
                   (tau_k = E * ceil(n_k / B): clients of different sizes take different
                   numbers of steps -- the "objective inconsistency" FedAvg suffers from)
            d_k = (x_t - x_k) / tau_k          normalized update        (2)
        tau_eff = sum_k p_k tau_k,   p_k = n_k / sum_j n_j               (3)
        x_{t+1} = x_t - tau_eff * sum_k p_k d_k                          (4)

Here (4) is the server optimizer's step on the pseudo-gradient tau_eff * sum_k p_k d_k
(``server_update`` with delta = -tau_eff * aggregate(d)), so ServerOpt = SGD(1) is the
paper's rule and any optax server optimizer or aggregator can be used. When all tau_k are
equal, tau_eff * d_k = x_k - x_t and FedNova is FedAvg. ``tau_eff`` is taken over the
clients that reported (weights after faults), so dropouts do not shrink the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms.fedavg import (ServerState, check_weighting, client_weights,
                                           cohort_train_loss, data_loss, next_state,
                                           server_state_init, server_update)
from fedjax_lite.core.aggregators import Aggregator, mean, weighted_mean
from fedjax_lite.core.faults import Faults, residuals_of, uplink
from fedjax_lite.core.local import local_train_chunk
from fedjax_lite.core.micro import check_micro_cohort
from fedjax_lite.core.round import (Cohort, EngineOptions, FederatedAlgorithm, client_keys,
                                    local_training_chunk, map_cohort)
from fedjax_lite.models.base import Model


def fednova(model: Model, *, client_optimizer: optax.GradientTransformation,
            server_optimizer: optax.GradientTransformation, local_epochs: int,
            batch_size: int, weighting: str = "examples",
            aggregator: Aggregator | None = None, faults: Faults = Faults(),
            engine: EngineOptions = EngineOptions()) -> FederatedAlgorithm:
    """Builds FedNova. ``client_optimizer`` should be plain SGD (the normalization by the
    step count tau_k is the paper's for vanilla SGD). ``weighting``: ``examples`` (p_k =
    n_k, the paper's) or ``uniform``."""
    aggregator = aggregator or mean()
    check_weighting(weighting)
    check_micro_cohort(engine, algorithm="fednova")

    init = server_state_init(server_optimizer, aggregator, faults)

    loss_fn = data_loss(model)

    def client_update(server_params, x, y, n, orders):
        """Clients k of a chunk: (1) then -d_k = (x_k - x_t) / tau_k (2)."""
        params, stats = local_train_chunk(loss_fn, client_optimizer, server_params, x, y, n,
                                          orders, local_epochs=local_epochs,
                                          batch_size=batch_size, unroll=engine.unroll)
        tau = jnp.maximum(stats.steps, 1).astype(jnp.float32)      # n = 0: no step, d = 0
        scale = lambda a: (1.0 / tau).reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype)
        return jax.tree.map(lambda p, s: (p - s) * scale(p), params, server_params), stats

    def apply(state: ServerState, cohort: Cohort, key: jax.Array):
        agg_key, train_key = jax.random.split(key)
        keys = client_keys(train_key, cohort.index)
        chunk_fn = local_training_chunk(lambda *a: client_update(state.params, *a),
                                        local_epochs=local_epochs)
        neg_d, stats = map_cohort(chunk_fn, cohort, (keys,), engine)
        neg_d, weights, residuals, fault_metrics = uplink(
            faults, neg_d, client_weights(cohort, weighting), cohort, agg_key,
            residuals_of(state))
        tau_eff = weighted_mean(stats.steps.astype(jnp.float32), weights)         # (3)
        neg_d_t, agg_state, agg_metrics = aggregator.apply(neg_d, weights, state.agg_state,
                                                           agg_key)
        delta = jax.tree.map(lambda a: tau_eff.astype(a.dtype) * a, neg_d_t)
        params, opt_state = server_update(server_optimizer, state.params, state.opt_state,  # (4)
                                          delta, weights, always=aggregator.private)
        metrics = {"train_loss": cohort_train_loss(stats), "tau_eff": tau_eff,
                   **fault_metrics, **agg_metrics}
        return next_state(state, params, opt_state, agg_state, residuals), metrics

    return FederatedAlgorithm(init, apply)
