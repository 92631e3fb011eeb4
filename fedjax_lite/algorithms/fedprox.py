"""FedProx: FedAvg with a proximal local objective and partial work from stragglers.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, Algorithm 2
(FedProx), with the server step generalized as in FedOpt (see :mod:`.fedavg`):

    for each round t:
        S_t <- random cohort of m clients                                  (core.round)
        stragglers: a fraction of S_t, each with epochs E_k ~ U{1..E};     (1)
                    everyone else E_k = E                                  (Sec. 5.2)
        for each client k in S_t, in parallel:                             (vmap)
            x_k <- ClientOpt for E_k epochs on the proximal objective
                   h_k(w; w_t) = F_k(w) + mu/2 ||w - w_t||^2               (2) (paper eq. 2)
            Delta_k = x_k - x_t
        Delta_t = sum_k p_k Delta_k / sum_k p_k,  p_k = n_k                (3)
                  (p_k = 0 for stragglers when ``drop_stragglers``: FedAvg's behaviour in
                  the paper's comparison, where they then contribute nothing)
        x_{t+1} = ServerOpt(x_t, -Delta_t)                                 (4)

The stragglers of a round come from their own stream of the round key
(:func:`straggler_epochs`), so FedProx and FedAvg-with-drops see the same stragglers for
the same seed. ``train_loss`` is the data loss F_k, without the proximal term. With
``mu = 0``, no stragglers and ``drop_stragglers = False`` this is FedAvg.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms.fedavg import (ServerState, check_weighting, client_weights,
                                           cohort_delta, cohort_train_loss, next_state,
                                           server_state_init, server_update)
from fedjax_lite.core.aggregators import Aggregator, mean
from fedjax_lite.core.faults import Faults
from fedjax_lite.core.local import local_train_chunk
from fedjax_lite.core.micro import check_micro_cohort
from fedjax_lite.core.round import (Cohort, EngineOptions, FederatedAlgorithm, client_keys,
                                    local_training_chunk)
from fedjax_lite.models.base import Model, masked_mean_loss

STRAGGLER_STREAM = 0x5354_5247   # fold_in constant of the stragglers' key ("STRG")


def straggler_epochs(key: jax.Array, index: jax.Array, straggler_fraction: float,
                     local_epochs: int) -> tuple[jax.Array, jax.Array]:
    """Eq. (1): (is_straggler bool[C], epochs int32[C]) of a round with key ``key``.

    floor(straggler_fraction * C + 1/2) cohort clients are stragglers (those with the lowest
    priorities u_k ~ U[0, 1)); a straggler runs E_k ~ U{1, ..., local_epochs} epochs, the
    others local_epochs. u_k and E_k come from the client's population row, not its cohort
    position.
    """
    num = int(straggler_fraction * index.shape[0] + 0.5)
    pick_key, epochs_key = jax.random.split(jax.random.fold_in(key, STRAGGLER_STREAM))
    priority = jax.vmap(jax.random.uniform)(client_keys(pick_key, index))
    is_straggler = jnp.argsort(jnp.argsort(priority)) < num
    draws = jax.vmap(lambda k: jax.random.randint(k, (), 1, local_epochs + 1))(
        client_keys(epochs_key, index))
    return is_straggler, jnp.where(is_straggler, draws, local_epochs).astype(jnp.int32)


def proximal_objective(model: Model, anchor, mu):
    """h(w) = F_k(w) + mu/2 ||w - anchor||^2 (paper eq. 2) as a local loss: returns
    (h, F_k), the data loss F_k reported without the proximal term. Ditto's personal
    objective is the same with mu = lam and the anchor w_t."""

    def loss_fn(p, xb, yb, mb):
        data_loss = masked_mean_loss(model, p, xb, yb, mb)
        sq = sum(jnp.sum(jnp.square(a - b)) for a, b in
                 zip(jax.tree.leaves(p), jax.tree.leaves(anchor)))
        return data_loss + 0.5 * mu * sq, data_loss          # h_k, F_k

    return loss_fn


def fedprox(model: Model, *, client_optimizer: optax.GradientTransformation,
            server_optimizer: optax.GradientTransformation, local_epochs: int,
            batch_size: int, mu: float, straggler_fraction: float = 0.0,
            drop_stragglers: bool = False, weighting: str = "examples",
            aggregator: Aggregator | None = None, faults: Faults = Faults(),
            engine: EngineOptions = EngineOptions()) -> FederatedAlgorithm:
    """Builds FedProx. ``mu``: proximal coefficient (>= 0); ``straggler_fraction`` in
    [0, 1]; ``drop_stragglers``: give stragglers weight 0 (FedAvg's rule) instead of
    aggregating their partial work (FedProx's)."""
    if mu < 0:
        raise ValueError(f"fedprox: mu must be >= 0, got mu={mu}")
    if not 0.0 <= straggler_fraction <= 1.0:
        raise ValueError(f"fedprox: straggler_fraction must be in [0, 1], got "
                         f"straggler_fraction={straggler_fraction}")
    aggregator = aggregator or mean()
    check_weighting(weighting)
    check_micro_cohort(engine, aggregator, faults, algorithm="fedprox")

    init = server_state_init(server_optimizer, aggregator, faults)

    def client_update(server_params, x, y, n, orders, num_epochs):
        """Clients k of a chunk: x_k <- ClientOpt E_k epochs on h_k (2); Delta_k."""
        loss_fn = proximal_objective(model, server_params, mu)
        params, stats = local_train_chunk(loss_fn, client_optimizer, server_params, x, y, n,
                                          orders, local_epochs=local_epochs,
                                          batch_size=batch_size, num_epochs=num_epochs,
                                          unroll=engine.unroll)
        return jax.tree.map(lambda p, s: p - s, params, server_params), stats

    def apply(state: ServerState, cohort: Cohort, key: jax.Array):
        agg_key, train_key = jax.random.split(key)
        keys = client_keys(train_key, cohort.index)
        is_straggler, num_epochs = straggler_epochs(key, cohort.index, straggler_fraction,
                                                    local_epochs)
        chunk_fn = local_training_chunk(lambda *a: client_update(state.params, *a),
                                        local_epochs=local_epochs)
        weights = client_weights(cohort, weighting)                        # (3)
        if drop_stragglers:
            weights = jnp.where(is_straggler, 0.0, weights)
        delta, weights, agg_state, residuals, stats, round_metrics = cohort_delta(
            chunk_fn, cohort, (keys, num_epochs), weights, state, agg_key,
            aggregator=aggregator, faults=faults, engine=engine)
        params, opt_state = server_update(server_optimizer, state.params, state.opt_state,  # (4)
                                          delta, weights, always=aggregator.private)
        metrics = {"train_loss": cohort_train_loss(stats),
                   "stragglers": jnp.sum(is_straggler.astype(jnp.int32)), **round_metrics}
        return next_state(state, params, opt_state, agg_state, residuals), metrics

    return FederatedAlgorithm(init, apply)
