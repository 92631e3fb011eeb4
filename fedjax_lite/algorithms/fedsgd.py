"""Federated SGD: one full-batch gradient per client, one server step per round.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017, Sec. 2 (FederatedSGD, the C-fraction baseline of FedAvg), with the
server step generalized as in FedOpt (Reddi et al., ICLR 2021):

    for each round t:
        S_t <- random cohort of m clients                          (core.round)
        for each client k in S_t, in parallel:                      (vmap)
            g_k = grad F_k(x_t),  F_k(w) = 1/n_k sum_{i in P_k} f_i(w)       (1)
        g_t = sum_k p_k g_k / sum_k p_k,  p_k = n_k                 (2) (= grad f(x_t)
                                                                     over the cohort)
        x_{t+1} = ServerOpt(x_t, g_t)                               (3)

With ServerOpt = SGD(eta) this is the paper's ``w_{t+1} <- w_t - eta sum_k (n_k/n) g_k``,
which is FedAvg with one full-batch local step (E = 1, B = infinity) and client learning
rate eta. The aggregator receives the deltas -g_k (and the server step the pseudo-gradient
-(-g_t)), so every aggregator (robust, clipped, noised, quantized) works unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms.fedavg import (ServerState, check_weighting, client_weights,
                                           cohort_delta, cohort_train_loss, next_state,
                                           server_state_init, server_update)
from fedjax_lite.core.aggregators import Aggregator, mean
from fedjax_lite.core.example_blocks import abstract, block_size, sum_over_blocks
from fedjax_lite.core.faults import Faults
from fedjax_lite.core.micro import check_micro_cohort
from fedjax_lite.core.local import LocalStats
from fedjax_lite.core.round import Cohort, EngineOptions, FederatedAlgorithm
from fedjax_lite.models.base import Model, masked_mean_loss


def fedsgd(model: Model, *, server_optimizer: optax.GradientTransformation,
           weighting: str = "examples", aggregator: Aggregator | None = None,
           faults: Faults = Faults(),
           engine: EngineOptions = EngineOptions()) -> FederatedAlgorithm:
    """Builds FedSGD. ``weighting``: ``examples`` (p_k = n_k, the paper's) or ``uniform``."""
    aggregator = aggregator or mean()
    check_weighting(weighting)
    check_micro_cohort(engine, aggregator, faults, algorithm="fedsgd")

    init = server_state_init(server_optimizer, aggregator, faults)

    def client_gradient(server_params, x, y, n, block):
        """ONE client: (1) over its n real examples (mask = arange(N) < n); with
        ``block`` < N, the gradient of the masked sum accumulated over blocks of examples
        (memory: core.example_blocks), divided by n."""
        mask = jnp.arange(x.shape[0]) < n
        k = n.astype(jnp.float32)
        if block >= x.shape[0]:
            loss, grads = jax.value_and_grad(masked_mean_loss, argnums=1)(
                model, server_params, x, y, mask)
        else:
            def block_sums(xb, yb, mb):
                def total(p):
                    per_example = model.loss(model.apply(p, xb), yb)
                    return jnp.sum(per_example * mb.astype(per_example.dtype))
                return jax.value_and_grad(total)(server_params)
            loss_sum, grad_sum = sum_over_blocks(block_sums, (x, y, mask), block)
            count = jnp.maximum(k, 1.0)
            loss, grads = loss_sum / count, jax.tree.map(lambda g: g / count, grad_sum)
        return grads, LocalStats(loss * k, k, jnp.minimum(n, 1))

    def apply(state: ServerState, cohort: Cohort, key: jax.Array):
        agg_key, _ = jax.random.split(key)       # the same aggregation key as FedAvg's
        def chunk_fn(x, y, n):
            one = jax.ShapeDtypeStruct(x.shape[2:], x.dtype)      # forward + backward: 3x
            block = block_size(lambda p, e: model.apply(p, e[None]),
                               (abstract(state.params), one), x.shape[1], x.shape[0], 3.0)
            grads, stats = jax.vmap(lambda *a: client_gradient(state.params, *a, block))(
                x, y, n)
            return jax.tree.map(jnp.negative, grads), stats                # -g_k

        delta, weights, agg_state, residuals, stats, round_metrics = cohort_delta(  # (2)
            chunk_fn, cohort, (), client_weights(cohort, weighting), state, agg_key,
            aggregator=aggregator, faults=faults, engine=engine)           # -g_t
        params, opt_state = server_update(server_optimizer, state.params, state.opt_state,  # (3)
                                          delta, weights, always=aggregator.private)
        metrics = {"train_loss": cohort_train_loss(stats), **round_metrics}
        return next_state(state, params, opt_state, agg_state, residuals), metrics

    return FederatedAlgorithm(init, apply)
