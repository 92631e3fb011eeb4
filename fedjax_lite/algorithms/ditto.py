"""Ditto: a personal model per client beside the global one.

Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021. Each client k solves its personal objective (their eq. 2)

    min_{v_k} h_k(v_k; w*) = F_k(v_k) + lam/2 ||v_k - w*||^2

around the global model w* that FedAvg learns. Their Algorithm 1 alternates the two on
the clients of each round; here the global solver is FedAvg in its FedOpt form
(:mod:`.fedavg`, server optimizer on the pseudo-gradient):

    for each round t:
        S_t <- random cohort of m clients                              (core.round)
        for each client k in S_t, in parallel:                          (vmap)
            global:   w_k <- ClientOpt E epochs on F_k from w_t          (Alg. 1, UPDATE_GLOBAL)
                      Delta_k = w_k - w_t
            personal: v_k <- ClientOpt E_p epochs on h_k(v; w_t)         (Alg. 1, the s local
                      from v_k (its own row of the population's          iterations on v_k:
                      personal models)                                   v_k - eta (grad F_k(v_k)
                                                                         + lam (v_k - w_t)))
        Delta_t = sum_k p_k Delta_k / sum_k p_k                          (aggregator)
        w_{t+1} = ServerOpt(w_t, -Delta_t)

Decisions:

* The personal models are population-sized client state (:mod:`fedjax_lite.core.client_state`,
  field ``personal``), initialized to w_0 (Alg. 1's v_k^0 = w^0), gathered and scattered
  with the cohort. They never reach the aggregator or the server state's ``params``:
  the global round is FedAvg's to the bit (tested).
* The personal pass draws its example orders from its own stream of the round key
  (:data:`PERSONAL_STREAM`), so the global pass sees exactly FedAvg's orders.
* A client that drops out (``Faults.dropout``) keeps its v_k: the simulation treats a
  dropout as a client that did not finish the round.
* ``lam = 0`` trains each v_k on its own data alone (local training that persists
  across the rounds a client is sampled in); large ``lam`` pulls v_k to w_t.
* ``train_loss`` is the global pass's data loss (FedAvg's); ``personal_train_loss`` the
  personal pass's data loss F_k(v_k), without the proximal term.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lite.algorithms.fedavg import (check_weighting, cohort_train_loss, data_loss,
                                           fedavg_round, local_delta)
from fedjax_lite.algorithms.fedprox import proximal_objective
from fedjax_lite.core import client_state
from fedjax_lite.core.aggregators import Aggregator, mean
from fedjax_lite.core.faults import Faults, check_faults, init_residuals
from fedjax_lite.core.local import local_train_chunk
from fedjax_lite.core.micro import check_micro_cohort
from fedjax_lite.core.round import (Cohort, EngineOptions, FederatedAlgorithm, client_keys,
                                    local_training_chunk, map_cohort)
from fedjax_lite.models.base import Model

PERSONAL_STREAM = 0x4449_5454    # fold_in constant of the personal pass's key ("DITT")


class DittoState(NamedTuple):
    params: Any        # w, the global model
    opt_state: Any
    agg_state: Any
    round: jax.Array
    personal: Any      # v_k of every population row: params-shaped leaves, leading axis K


class DittoStateEF(NamedTuple):
    """:class:`DittoState` plus the error-feedback residuals of the global uplink."""
    params: Any
    opt_state: Any
    agg_state: Any
    round: jax.Array
    personal: Any
    residuals: Any


def ditto(model: Model, *, num_clients: int, client_optimizer: optax.GradientTransformation,
          server_optimizer: optax.GradientTransformation, local_epochs: int,
          batch_size: int, lam: float, personal_epochs: int | None = None,
          weighting: str = "examples", aggregator: Aggregator | None = None,
          faults: Faults = Faults(),
          engine: EngineOptions = EngineOptions()) -> FederatedAlgorithm:
    """Builds Ditto for a population of ``num_clients`` rows. ``lam`` >= 0: the pull of
    each personal model to the global one; ``personal_epochs``: E_p (default
    ``local_epochs``)."""
    if num_clients < 1:
        raise ValueError(f"ditto: num_clients={num_clients} must be >= 1")
    if lam < 0:
        raise ValueError(f"ditto: lam must be >= 0, got lam={lam}")
    personal_epochs = local_epochs if personal_epochs is None else personal_epochs
    if personal_epochs < 1:
        raise ValueError(f"ditto: personal_epochs must be >= 1, got {personal_epochs}")
    aggregator = aggregator or mean()
    check_weighting(weighting)
    check_faults(faults)
    check_micro_cohort(engine, algorithm="ditto")
    global_update = local_delta(data_loss(model), client_optimizer,    # FedAvg's client
                                local_epochs=local_epochs, batch_size=batch_size,
                                unroll=engine.unroll)

    def init(params) -> DittoState | DittoStateEF:
        personal = jax.tree.map(                    # v_k^0 = w^0 (Alg. 1)
            lambda p: jnp.broadcast_to(p, (num_clients,) + jnp.shape(p)).copy(), params)
        fields = (params, server_optimizer.init(params), aggregator.init(params),
                  jnp.zeros((), jnp.int32), personal)
        residuals = init_residuals(faults, params)
        return DittoState(*fields) if residuals is None else DittoStateEF(*fields, residuals)

    def personal_update(w_t, x, y, n, orders, v_k):
        """v_k <- ClientOpt E_p epochs on h_k(v; w_t) from each client's own v_k."""
        return local_train_chunk(proximal_objective(model, w_t, lam), client_optimizer,
                                 v_k, x, y, n, orders,
                                 local_epochs=personal_epochs, batch_size=batch_size,
                                 unroll=engine.unroll, per_client_params=True)

    def apply(state: DittoState, cohort: Cohort, key: jax.Array):
        if cohort.num_clients != num_clients:   # static: fails at trace time
            raise ValueError(f"ditto: num_clients={num_clients} but the population has "
                             f"{cohort.num_clients} rows")
        new_state, metrics, weights = fedavg_round(             # FedAvg's, as is
            state, cohort, key, global_update, server_optimizer=server_optimizer,
            local_epochs=local_epochs, weighting=weighting, aggregator=aggregator,
            faults=faults, engine=engine)
        # the personal pass, from w_t (the model the clients received this round)
        v_rows = client_state.gather(state.personal, cohort)
        train_key = jax.random.split(key)[1]
        personal_keys = client_keys(jax.random.fold_in(train_key, PERSONAL_STREAM),
                                    cohort.index)
        personal_fn = local_training_chunk(lambda *a: personal_update(state.params, *a),
                                           local_epochs=personal_epochs)
        v_new, personal_stats = map_cohort(personal_fn, cohort, (personal_keys, v_rows),
                                           engine)
        personal = client_state.scatter(state.personal, cohort, v_new, keep=~(weights > 0))
        metrics = {**metrics, "personal_train_loss": cohort_train_loss(personal_stats)}
        return new_state._replace(personal=personal), metrics

    return FederatedAlgorithm(init, apply)
