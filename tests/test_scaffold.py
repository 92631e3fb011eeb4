"""Tests for fedjax_lite.algorithms.scaffold against an independent float64 reference.

Setup: a population of P=9 clients of different sizes (d=3 features, 3 classes, padded
to N=6 with garbage in the padding); 3 rounds with hand-picked cohorts of 4 rows, so
clients are sampled in some rounds and not others (their c_i go stale) and row 8 is
never sampled; 2 local epochs of batch 2 with client SGD, so K_i differs per client;
server SGD with eta_g = 0.8; dropout runs are chunked (see CHUNKED). The engine's
example orders are drawn by ``core.shuffle.epoch_orders`` from the same per-client keys
as the reference's input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms.fedavg import fedavg
from fedjax_lite.algorithms.scaffold import scaffold
from fedjax_lite.core import EngineOptions, make_cohort
from fedjax_lite.core.faults import DROPOUT_STREAM, Faults
from fedjax_lite.core.shuffle import epoch_orders
from fedjax_lite.models import multinomial_logistic_regression

P, N, D, CLASSES = 9, 6, 3, 3
E, BATCH = 2, 2
LR, ETA_G = 0.3, 0.8
SIZES = np.array([6, 2, 5, 1, 4, 3, 6, 2, 5], np.int32)
COHORTS = [np.array(c, np.int32) for c in ([1, 4, 6, 2], [4, 0, 7, 3], [6, 1, 5, 4])]
ENGINE = EngineOptions(chunk_size=None, unroll=2)
DROPOUT = 0.5
# The dropout runs also use chunks of 3 over the 4-client cohort: a padded last chunk,
# so the per-client c_i rows pass through map_cohort's padding (one compile less).
CHUNKED = EngineOptions(chunk_size=3, unroll=1)


def make_population() -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(P, N, D)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=(P, N)).astype(np.int32)
    for i in range(P):
        x[i, SIZES[i]:] *= 5.0
    return {"x": x, "y": y, "n": SIZES.copy()}


def make_init_params() -> dict:
    rng = np.random.default_rng(1)
    return {"w": jnp.asarray(0.1 * rng.normal(size=(D, CLASSES)), jnp.float32),
            "b": jnp.asarray(0.1 * rng.normal(size=(CLASSES,)), jnp.float32)}


def round_keys():
    root = jax.random.key(7)
    return [jax.random.fold_in(root, r) for r in range(len(COHORTS))]


MODEL = multinomial_logistic_regression(D, CLASSES)


@functools.lru_cache(maxsize=None)
def algorithm(dropout: float = 0.0, engine: EngineOptions = ENGINE):
    alg = scaffold(MODEL, num_clients=P, client_optimizer=optax.sgd(LR),
                   server_optimizer=optax.sgd(ETA_G), local_epochs=E, batch_size=BATCH,
                   client_learning_rate=LR, faults=Faults(dropout=dropout), engine=engine)
    return alg.init, jax.jit(alg.apply)


def to_np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@functools.lru_cache(maxsize=None)
def run_rounds(dropout: float = 0.0, engine: EngineOptions = ENGINE):
    """[(state before, state after, metrics)] per round, as NumPy."""
    init, apply = algorithm(dropout, engine)
    population = {k: jnp.asarray(v) for k, v in make_population().items()}
    state = init(make_init_params())
    history = []
    for key, index in zip(round_keys(), COHORTS):
        new, metrics = apply(state, make_cohort(population, jnp.asarray(index)), key)
        history.append((to_np(state), to_np(new), {k: np.asarray(v) for k, v in
                                                   metrics.items()}))
        state = new
    return history


@jax.jit
def reference_orders(round_key, index, n):
    """The orders a round with this key uses: apply splits the key into (aggregation,
    training) keys and folds each client's population row into the training key."""
    _, train_key = jax.random.split(round_key)
    keys = jax.vmap(lambda i: jax.random.fold_in(train_key, i))(index)
    return epoch_orders(keys, n, N, E)


def reference_reports(round_key, dropout: float) -> np.ndarray:
    """Who reports (core.faults' draw: uniform from fold_in(aggregation key, DROPOUT_STREAM))."""
    if dropout == 0:
        return np.ones(len(COHORTS[0]), bool)
    agg_key, _ = jax.random.split(round_key)
    u = jax.random.uniform(jax.random.fold_in(agg_key, DROPOUT_STREAM), (len(COHORTS[0]),))
    return np.asarray(u >= dropout)


def numpy_scaffold(numpy_reference, dropout: float = 0.0):
    """Algorithm 1, option II, float64. Returns per round (x, c, client_c, loss, reports)."""
    pop = make_population()
    x_all, y_all = pop["x"].astype(np.float64), pop["y"]
    x = to_np(make_init_params())
    c = {k: np.zeros_like(v) for k, v in x.items()}
    client_c = [{k: np.zeros_like(v) for k, v in x.items()} for _ in range(P)]
    history = []
    for key, index in zip(round_keys(), COHORTS):
        orders = np.asarray(reference_orders(key, jnp.asarray(index),
                                             jnp.asarray(SIZES[index])))
        reports = reference_reports(key, dropout)
        dys, new_cs, loss_sum, examples = [], [], 0.0, 0
        for k, row in enumerate(index):
            n, ci = int(SIZES[row]), client_c[row]
            y = {name: v.copy() for name, v in x.items()}
            steps = 0
            for e in range(E):
                perm = orders[k, e, :n]
                for s in range(0, n, BATCH):
                    idx = perm[s:s + BATCH]
                    loss, g = numpy_reference.loss_and_grads("multinomial", y, x_all[row, idx],
                                                             y_all[row, idx])
                    y = {name: y[name] - LR * (g[name] - ci[name] + c[name]) for name in y}
                    loss_sum += loss * len(idx)
                    examples += len(idx)
                    steps += 1
            assert steps == E * -(-n // BATCH)
            dys.append({name: y[name] - x[name] for name in x})
            new_cs.append({name: ci[name] - c[name] + (x[name] - y[name]) / (steps * LR)
                           for name in x})
        m = reports.sum()
        delta_x = {name: sum(d[name] for d, r in zip(dys, reports) if r) / max(m, 1)
                   for name in x}
        new_c = {name: c[name] + sum(nc[name] - client_c[row][name] for nc, row, r in
                                     zip(new_cs, index, reports) if r) / P for name in c}
        for nc, row, r in zip(new_cs, index, reports):
            if r:
                client_c[row] = nc
        x = {name: x[name] + ETA_G * delta_x[name] for name in x}
        c = new_c
        history.append((x, c, [dict(ci) for ci in client_c], loss_sum / examples, reports))
    return history


def assert_tree_close(got, want, msg="", rtol=1e-5, atol=1e-6):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol=rtol,
                                   atol=atol, err_msg=f"{msg} {k}")


def check_against_reference(history, reference):
    for r, ((_, state, metrics), (x, c, client_c, loss, reports)) in enumerate(
            zip(history, reference)):
        assert_tree_close(state.params, x, f"round {r} params")
        assert_tree_close(state.c, c, f"round {r} server c")
        for i in range(P):
            assert_tree_close({k: v[i] for k, v in state.client_c.items()}, client_c[i],
                              f"round {r} c_{i}")
        np.testing.assert_allclose(metrics["train_loss"], loss, rtol=1e-5)
        assert int(metrics["reporting_clients"]) == reports.sum()
        assert int(state.round) == r + 1


def test_matches_numpy_reference(numpy_reference):
    history = run_rounds()
    reference = numpy_scaffold(numpy_reference)
    check_against_reference(history, reference)
    # the control variates are non-trivial and the correction matters after round 1
    assert np.abs(reference[-1][1]["w"]).max() > 1e-2


def test_dropout_matches_reference_and_dropped_clients_keep_c_i(numpy_reference):
    history = run_rounds(DROPOUT, CHUNKED)
    reference = numpy_scaffold(numpy_reference, DROPOUT)
    all_reports = [ref[4] for ref in reference]
    assert any(0 < rep.sum() < len(rep) for rep in all_reports), "pick another key"
    check_against_reference(history, reference)
    dropped_somewhere = False
    for (before, after, _), index, reports in zip(history, COHORTS, all_reports):
        for row, rep in zip(index, reports):
            for k in before.client_c:
                same = np.array_equal(after.client_c[k][row], before.client_c[k][row])
                assert same == (not rep), (row, rep)
            dropped_somewhere |= not rep
    assert dropped_somewhere


def test_unsampled_rows_unchanged_and_c_is_mean_of_client_c():
    for before, after, _ in run_rounds():
        index = COHORTS[int(before.round)]
        other = np.setdiff1d(np.arange(P), index)
        for k in before.client_c:
            np.testing.assert_array_equal(after.client_c[k][other], before.client_c[k][other])
            # c <- c + (1/N) sum Delta c_i keeps c = mean_i c_i (all start at zero)
            np.testing.assert_allclose(after.c[k], after.client_c[k].mean(axis=0), rtol=1e-5,
                                       atol=1e-7)
    final = run_rounds()[-1][1]
    assert all(np.all(v[8] == 0) for v in final.client_c.values())   # never sampled


def test_first_round_with_zero_control_variates_is_uniform_fedavg():
    alg = fedavg(MODEL, client_optimizer=optax.sgd(LR), server_optimizer=optax.sgd(ETA_G),
                 local_epochs=E, batch_size=BATCH, weighting="uniform", engine=ENGINE)
    population = {k: jnp.asarray(v) for k, v in make_population().items()}
    cohort = make_cohort(population, jnp.asarray(COHORTS[0]))
    state, metrics = jax.jit(alg.apply)(alg.init(make_init_params()), cohort,
                                        round_keys()[0])
    _, first, first_metrics = run_rounds()[0]
    assert_tree_close(first.params, to_np(state.params), "params", rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(first_metrics["train_loss"], metrics["train_loss"],
                               rtol=1e-6)


@pytest.mark.parametrize("tx", [optax.adam(0.1), optax.sgd(0.1, momentum=0.9),
                                optax.sgd(0.1, nesterov=True, momentum=0.5),
                                optax.sgd(optax.linear_schedule(0.1, 0.01, 10)),
                                optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1))])
def test_non_sgd_client_optimizer_is_rejected(tx):
    with pytest.raises(ValueError, match="plain SGD"):
        scaffold(MODEL, num_clients=P, client_optimizer=tx, server_optimizer=optax.sgd(1.0),
                 local_epochs=E, batch_size=BATCH)


def test_client_learning_rate_must_match_the_sgd_optimizer():
    with pytest.raises(ValueError, match="client_learning_rate"):
        scaffold(MODEL, num_clients=P, client_optimizer=optax.sgd(0.1),
                 server_optimizer=optax.sgd(1.0), local_epochs=E, batch_size=BATCH,
                 client_learning_rate=0.2)


def test_population_size_must_match_num_clients():
    alg = scaffold(MODEL, num_clients=P + 1, client_optimizer=optax.sgd(LR),
                   server_optimizer=optax.sgd(1.0), local_epochs=E, batch_size=BATCH)
    population = {k: jnp.asarray(v) for k, v in make_population().items()}
    with pytest.raises(ValueError, match="num_clients"):
        alg.apply(alg.init(make_init_params()),
                  make_cohort(population, jnp.asarray(COHORTS[0])), round_keys()[0])
