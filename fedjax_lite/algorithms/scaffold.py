"""SCAFFOLD: stochastic controlled averaging.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020, Algorithm 1 with control variate option II. Server state: the model x, the
server control variate c and every client's control variate c_i (a population-sized
stacked pytree, zeros at init; a round gathers the cohort's rows and scatters them back):

    for each round t:
        S <- cohort of clients                                   (core.round)
        for each client i in S, in parallel:                     (vmap, not a loop)
            y_i <- x
            K_i local SGD steps:  y_i <- y_i - eta_l (g_i(y_i) - c_i + c)      (Alg. 1 l. 10)
            c_i+ <- c_i - c + (x - y_i) / (K_i eta_l)            (option II, l. 12)
            Delta y_i = y_i - x,  Delta c_i = c_i+ - c_i         (l. 13)
        Delta x = (1/|S|) sum_i Delta y_i                        (l. 16; aggregator, uniform)
        x <- ServerOpt(x, -Delta x)                              (l. 17: x + eta_g Delta x
                                                                  for server SGD(eta_g))
        c <- c + (|S|/N) (1/|S|) sum_i Delta c_i                 (l. 17, N = num_clients)

The correction -c_i + c enters local training as the linear term <c - c_i, y> added to
each client's objective (its gradient is exactly c - c_i); the reported train loss is the
data loss without it. K_i is the number of steps client i actually took, so clients of
different sizes get their own K_i; a client that took no step keeps its c_i.

Faults: a client that drops out (``Faults.dropout``) has weight 0 in Delta x, adds
nothing to c, and keeps its old c_i; S in the c update is then the reporting clients, so
c <- c + (1/N) sum_{reporting i} Delta c_i, which keeps c = mean_i c_i. Update attacks
corrupt Delta y_i only. A round in which nobody reports changes nothing. With
``Faults(error_feedback=True)`` the uplink of Delta y_i gets error feedback
(:mod:`fedjax_lite.core.faults`) and the state is :class:`ScaffoldStateEF`; the control
variates are exchanged uncompressed, as in the paper.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lite.algorithms.fedavg import (client_weights, cohort_train_loss, next_state,
                                           server_update)
from fedjax_lite.core import client_state
from fedjax_lite.core.aggregators import Aggregator, mean
from fedjax_lite.core.faults import Faults, check_faults, init_residuals, residuals_of, uplink
from fedjax_lite.core.local import local_train_chunk
from fedjax_lite.core.micro import check_micro_cohort
from fedjax_lite.core.round import (Cohort, EngineOptions, FederatedAlgorithm, client_keys,
                                    local_training_chunk, map_cohort)
from fedjax_lite.models.base import Model, masked_mean_loss


class ScaffoldState(NamedTuple):
    params: Any        # x, the global model
    opt_state: Any     # server optimizer state
    agg_state: Any
    round: jax.Array
    c: Any             # server control variate, params-shaped
    client_c: Any      # c_i of every population row: params-shaped leaves, leading axis N


class ScaffoldStateEF(NamedTuple):
    """:class:`ScaffoldState` plus every client's error-feedback residual e_i (leading
    axis N) for the compressed uplink of Delta y_i."""
    params: Any
    opt_state: Any
    agg_state: Any
    round: jax.Array
    c: Any
    client_c: Any
    residuals: Any


def sgd_learning_rate(tx: optax.GradientTransformation,
                      client_learning_rate: float | None = None) -> float:
    """eta_l of a plain, constant-rate SGD ``tx``; ValueError for anything else.

    Option II divides by K_i eta_l, which is only the paper's control variate for plain
    SGD. ``tx`` is probed on a few steps: every update must be -eta_l * gradient (this
    rejects momentum, Nesterov, Adam & co., weight decay and learning rate schedules).
    """
    params = {"p": jnp.array([0.5, -1.5, 2.0], jnp.float32)}
    grads = [jnp.array(g, jnp.float32) for g in
             ([1.0, -2.0, 0.25], [3.0, 0.5, -1.0], [-0.75, 4.0, 2.0])]
    try:
        state = tx.init(params)
        rates = []
        for g in grads:
            updates, state = tx.update({"p": g}, state, params)
            rates.append(-np.asarray(updates["p"], np.float64) / np.asarray(g, np.float64))
    except Exception as err:  # noqa: BLE001 -- any failure means "not plain SGD"
        raise ValueError(f"scaffold: client_optimizer must be plain SGD (optax.sgd(lr)); "
                         f"probing it failed: {err!r}") from err
    rates = np.concatenate(rates)
    lr = float(rates[0])
    if not (np.isfinite(rates).all() and lr > 0 and np.allclose(rates, lr, rtol=1e-5)):
        raise ValueError("scaffold: client_optimizer must be plain SGD with a constant, "
                         "positive learning rate (optax.sgd(lr), no momentum, schedule or "
                         "weight decay): control variate option II divides by K_i * lr")
    if client_learning_rate is not None and not np.isclose(client_learning_rate, lr,
                                                           rtol=1e-5):
        raise ValueError(f"scaffold: client_learning_rate={client_learning_rate} but "
                         f"client_optimizer is SGD with learning rate {lr}")
    return float(client_learning_rate) if client_learning_rate is not None else lr


def scaffold(model: Model, *, num_clients: int, client_optimizer: optax.GradientTransformation,
             server_optimizer: optax.GradientTransformation, local_epochs: int,
             batch_size: int, client_learning_rate: float | None = None,
             aggregator: Aggregator | None = None, faults: Faults = Faults(),
             engine: EngineOptions = EngineOptions()) -> FederatedAlgorithm:
    """Builds SCAFFOLD (option II) for a population of ``num_clients`` rows.

    ``client_optimizer`` must be plain SGD (``optax.sgd(lr)``), else ValueError; eta_l is
    read from it, or given as ``client_learning_rate`` (then both must agree). The global
    learning rate eta_g is ``server_optimizer``'s (``optax.sgd(eta_g)`` is the paper's).
    """
    if num_clients < 1:
        raise ValueError(f"scaffold: num_clients={num_clients} must be >= 1")
    eta_l = sgd_learning_rate(client_optimizer, client_learning_rate)
    check_micro_cohort(engine, algorithm="scaffold")
    aggregator = aggregator or mean()
    check_faults(faults)
    if faults.error_feedback and faults.num_clients != num_clients:
        raise ValueError(f"scaffold: num_clients={num_clients} but faults.num_clients="
                         f"{faults.num_clients}")

    def init(params) -> ScaffoldState | ScaffoldStateEF:
        fields = (params, server_optimizer.init(params), aggregator.init(params),
                  jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params),
                  client_state.zeros(num_clients, params))
        residuals = init_residuals(faults, params)
        return ScaffoldState(*fields) if residuals is None else ScaffoldStateEF(*fields,
                                                                                residuals)

    def client_update(x_t, c, x, y, n, orders, c_i):
        """Clients i of a chunk (c_i: leading axis K): corrected local SGD from x_t, then
        option II. Returns (Delta y_i, Delta c_i, stats)."""

        def loss_fn(p, xb, yb, mb, c_i):
            data_loss = masked_mean_loss(model, p, xb, yb, mb)
            correction = sum(jnp.vdot(cc - ci, pp) for cc, ci, pp in zip(
                jax.tree.leaves(c), jax.tree.leaves(c_i), jax.tree.leaves(p)))
            return data_loss + correction, data_loss          # grad: g_i(y) - c_i + c

        y_i, stats = local_train_chunk(loss_fn, client_optimizer, x_t, x, y, n, orders,
                                       local_epochs=local_epochs, batch_size=batch_size,
                                       extra=(c_i,), unroll=engine.unroll)
        delta_y = jax.tree.map(lambda yi, xt: yi - xt, y_i, x_t)
        k_eta = jnp.maximum(stats.steps, 1).astype(jnp.float32) * eta_l
        took_steps = stats.steps > 0

        def delta_c(ci, cc, dy):   # c_i+ - c_i = -c + (x - y_i) / (K_i eta_l)
            scale = (1.0 / k_eta).reshape((-1,) + (1,) * (dy.ndim - 1)).astype(dy.dtype)
            new = -cc - dy * scale
            return jnp.where(took_steps.reshape((-1,) + (1,) * (dy.ndim - 1)), new,
                             jnp.zeros_like(new))

        return delta_y, jax.tree.map(delta_c, c_i, c, delta_y), stats

    def apply(state: ScaffoldState, cohort: Cohort, key: jax.Array):
        if cohort.num_clients != num_clients:   # static: fails at trace time
            raise ValueError(f"scaffold: num_clients={num_clients} but the population has "
                             f"{cohort.num_clients} rows")
        agg_key, train_key = jax.random.split(key)
        keys = client_keys(train_key, cohort.index)
        c_rows = client_state.gather(state.client_c, cohort)
        chunk_fn = local_training_chunk(
            lambda *a: client_update(state.params, state.c, *a), local_epochs=local_epochs)
        delta_y, delta_c, stats = map_cohort(chunk_fn, cohort, (keys, c_rows), engine)
        delta_y, weights, residuals, fault_metrics = uplink(
            faults, delta_y, client_weights(cohort, "uniform"), cohort, agg_key,
            residuals_of(state))
        reports = weights > 0
        delta_x, agg_state, agg_metrics = aggregator.apply(delta_y, weights,
                                                           state.agg_state, agg_key)
        params, opt_state = server_update(server_optimizer, state.params, state.opt_state,
                                          delta_x, weights, always=aggregator.private)
        # c <- c + (|S|/N) mean_{i in S} Delta c_i, S the reporting clients.
        delta_c = jax.tree.map(
            lambda d: jnp.where(reports.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0), delta_c)
        c = jax.tree.map(lambda cc, d: cc + jnp.sum(d, axis=0) / num_clients, state.c,
                         delta_c)
        # c_i <- c_i+ for the reporting clients; dropped clients and padding slots keep c_i
        client_c = client_state.scatter(state.client_c, cohort,
                                        jax.tree.map(jnp.add, c_rows, delta_c), keep=~reports)
        metrics = {"train_loss": cohort_train_loss(stats),
                   "server_c_norm": optax.tree.norm(c), **fault_metrics, **agg_metrics}
        return next_state(state, params, opt_state, agg_state, residuals, c=c,
                          client_c=client_c), metrics

    return FederatedAlgorithm(init, apply)
