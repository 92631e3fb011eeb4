"""Tests for fedjax_lite.algorithms.fednova against a float64 NumPy reference.

Setup: a population of P=10 clients, d=3 features, padded to N=6 (garbage in the
padding); the cohort is rows 7, 3, 9, 0, 2; binary logistic regression, E=2 local epochs
of batch 2 with client SGD, server SGD(1), 3 rounds. With n = [6, 2, 5, 1, 4] the clients
take tau = E * ceil(n / 2) = [6, 2, 6, 2, 4] steps; with n = 4 for all they take 4 each.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lite.algorithms.fedavg import fedavg
from fedjax_lite.algorithms.fednova import fednova
from fedjax_lite.core.round import EngineOptions, make_cohort
from fedjax_lite.core.shuffle import epoch_orders
from fedjax_lite.models.linear import logistic_regression

K, N, D, P = 5, 6, 3, 10
E, BATCH, LR = 2, 2, 0.3
SIZES = (6, 2, 5, 1, 4)
EQUAL = (4, 4, 4, 4, 4)
INDEX = np.array([7, 3, 9, 0, 2], np.int32)
ROUNDS = 3
ENGINE = EngineOptions(chunk_size=None, unroll=1)


def make_population(sizes) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(P, N, D)).astype(np.float32)
    y = rng.integers(0, 2, size=(P, N)).astype(np.int32)
    n = rng.integers(1, N + 1, size=P).astype(np.int32)
    n[INDEX] = sizes
    for i in range(P):
        x[i, n[i]:] *= 5.0                       # padding garbage
    return {"x": x, "y": y, "n": n}


def init_params():
    rng = np.random.default_rng(1)
    return {"w": jnp.asarray(0.1 * rng.normal(size=(D,)), jnp.float32),
            "b": jnp.asarray(0.1 * rng.normal(), jnp.float32)}


def round_keys():
    return [jax.random.fold_in(jax.random.key(3), r) for r in range(ROUNDS)]


@functools.lru_cache(maxsize=None)
def algorithm(name: str):
    build = fednova if name == "fednova" else fedavg
    alg = build(logistic_regression(D), client_optimizer=optax.sgd(LR),
                server_optimizer=optax.sgd(1.0), local_epochs=E, batch_size=BATCH,
                engine=ENGINE)
    return alg.init, jax.jit(alg.apply)


@functools.lru_cache(maxsize=None)
def run(name: str, sizes=SIZES):
    """(params, metrics) after each round (one compiled program per algorithm)."""
    init, apply = algorithm(name)
    state = init(init_params())
    population = {k: jnp.asarray(v) for k, v in make_population(sizes).items()}
    cohort = make_cohort(population, jnp.asarray(INDEX))
    out = []
    for key in round_keys():
        state, metrics = apply(state, cohort, key)
        out.append((jax.tree.map(np.asarray, state.params),
                    {k: np.asarray(v) for k, v in metrics.items()}))
    assert int(state.round) == ROUNDS
    return out


@jax.jit
def engine_orders(key, n):
    _, train_key = jax.random.split(key)
    keys = jax.vmap(lambda i: jax.random.fold_in(train_key, i))(jnp.asarray(INDEX))
    return epoch_orders(keys, n, N, E)


def numpy_fednova(ref, sizes):
    """float64 FedNova: d_k = (x - x_k) / tau_k, tau_eff = sum p_k tau_k,
    x <- x - tau_eff sum_k p_k d_k, p_k = n_k / sum n."""
    pop = make_population(sizes)
    x, y, n = pop["x"][INDEX], pop["y"][INDEX], np.asarray(sizes)
    params = {k: np.asarray(v, np.float64) for k, v in init_params().items()}
    p = n / n.sum()
    out = []
    for key in round_keys():
        orders = np.asarray(engine_orders(key, jnp.asarray(n, jnp.int32)))
        ds, taus, loss_sum, examples = [], [], 0.0, 0
        for k in range(K):
            x_k, (ls, ex, tau) = ref.local_train("binary", ref.Optimizer("sgd", lr=LR),
                                                 params, x[k], y[k], int(n[k]), orders[k],
                                                 epochs=E, batch_size=BATCH)
            assert tau == E * -(-int(n[k]) // BATCH)
            ds.append({m: (params[m] - x_k[m]) / tau for m in params})
            taus.append(tau)
            loss_sum, examples = loss_sum + ls, examples + ex
        tau_eff = float(np.dot(p, taus))
        params = {m: params[m] - tau_eff * sum(pk * d[m] for pk, d in zip(p, ds))
                  for m in params}
        out.append((params, loss_sum / examples, tau_eff))
    return out


def assert_same(got, want, rtol=1e-5, atol=1e-6):
    for r, ((a, ma), (b, mb)) in enumerate(zip(got, want)):
        for m in a:
            np.testing.assert_allclose(a[m], b[m], rtol=rtol, atol=atol,
                                       err_msg=f"round {r} {m}")
        np.testing.assert_allclose(ma["train_loss"], mb["train_loss"], rtol=rtol)


def test_fednova_matches_numpy_with_different_step_counts(numpy_reference):
    got = run("fednova")
    want = numpy_fednova(numpy_reference, SIZES)
    assert_same(got, [(p, {"train_loss": loss}) for p, loss, _ in want])
    for (_, metrics), (_, _, tau_eff) in zip(got, want):
        np.testing.assert_allclose(metrics["tau_eff"], tau_eff, rtol=1e-6)   # 84 / 18
    # different tau_k: FedNova is not FedAvg here (the comparison is not vacuous)
    assert np.abs(got[-1][0]["w"] - run("fedavg")[-1][0]["w"]).max() > 1e-3


def test_fednova_is_fedavg_when_step_counts_are_equal(numpy_reference):
    got = run("fednova", EQUAL)
    assert_same(got, run("fedavg", EQUAL), rtol=1e-5, atol=1e-6)
    assert all(float(m["tau_eff"]) == E * 2 for _, m in got)
    assert_same(got, [(p, {"train_loss": loss})
                      for p, loss, _ in numpy_fednova(numpy_reference, EQUAL)])
