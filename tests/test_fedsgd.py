"""Tests for fedjax_lite.algorithms.fedsgd against a float64 NumPy reference.

Setup: a population of P=10 clients, d=3 features, padded to N=6 (garbage in the
padding); the cohort is rows 7, 3, 9, 0, 2 with n = [6, 2, 5, 1, 4]; 3 rounds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lite.algorithms.fedavg import fedavg
from fedjax_lite.algorithms.fedsgd import fedsgd
from fedjax_lite.core.round import EngineOptions, make_cohort
from fedjax_lite.models.linear import logistic_regression, multinomial_logistic_regression

K, N, D, C, P = 5, 6, 3, 3, 10
ETA = 0.5
SIZES = np.array([6, 2, 5, 1, 4], np.int32)
INDEX = np.array([7, 3, 9, 0, 2], np.int32)
ROUNDS = 3
ENGINE = EngineOptions(chunk_size=None, unroll=1)


def make_population(kind: str) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(P, N, D)).astype(np.float32)
    y = rng.integers(0, 2 if kind == "binary" else C, size=(P, N)).astype(np.int32)
    n = rng.integers(1, N + 1, size=P).astype(np.int32)
    n[INDEX] = SIZES
    for i in range(P):
        x[i, n[i]:] *= 5.0                       # padding garbage
    return {"x": x, "y": y, "n": n}


def make_model(kind: str):
    return logistic_regression(D) if kind == "binary" else multinomial_logistic_regression(D, C)


def init_params(kind: str):
    rng = np.random.default_rng(1)
    shape, bshape = ((D,), ()) if kind == "binary" else ((D, C), (C,))
    return {"w": jnp.asarray(0.1 * rng.normal(size=shape), jnp.float32),
            "b": jnp.asarray(0.1 * rng.normal(size=bshape), jnp.float32)}


def round_keys():
    return [jax.random.fold_in(jax.random.key(7), r) for r in range(ROUNDS)]


@functools.lru_cache(maxsize=None)
def run(name: str, kind: str = "binary", engine: EngineOptions = ENGINE):
    """(params, metrics) after each round of the jitted algorithm."""
    if name == "fedsgd":
        alg = fedsgd(make_model(kind), server_optimizer=optax.sgd(ETA), engine=engine)
    else:  # one full-batch local step of size ETA, server SGD(1)
        alg = fedavg(make_model(kind), client_optimizer=optax.sgd(ETA),
                     server_optimizer=optax.sgd(1.0), local_epochs=1, batch_size=N,
                     engine=engine)
    apply = jax.jit(alg.apply)
    state = alg.init(init_params(kind))
    population = {k: jnp.asarray(v) for k, v in make_population(kind).items()}
    cohort = make_cohort(population, jnp.asarray(INDEX))
    out = []
    for key in round_keys():
        state, metrics = apply(state, cohort, key)
        out.append((jax.tree.map(np.asarray, state.params),
                    {k: np.asarray(v) for k, v in metrics.items()}))
    assert int(state.round) == ROUNDS
    return out


def numpy_fedsgd(ref, kind):
    """float64: x <- x - ETA * sum_k n_k grad F_k(x) / sum_k n_k, F_k over k's n_k real
    examples; train_loss = the cohort's mean example loss at x."""
    pop = make_population(kind)
    x, y = pop["x"][INDEX], pop["y"][INDEX]
    params = {k: np.asarray(v, np.float64) for k, v in init_params(kind).items()}
    w = SIZES.astype(np.float64)
    out = []
    for _ in range(ROUNDS):
        losses, grads = zip(*(ref.loss_and_grads(kind, params, x[k, :SIZES[k]],
                                                 y[k, :SIZES[k]]) for k in range(K)))
        params = {n: params[n] - ETA * sum(wk * g[n] for wk, g in zip(w, grads)) / w.sum()
                  for n in params}
        out.append((params, float(np.dot(w, losses) / w.sum())))
    return out


def assert_same(got, want, rtol=1e-5, atol=1e-6):
    for r, ((a, ma), (b, mb)) in enumerate(zip(got, want)):
        for n in a:
            np.testing.assert_allclose(a[n], b[n], rtol=rtol, atol=atol,
                                       err_msg=f"round {r} {n}")
        np.testing.assert_allclose(ma["train_loss"], mb["train_loss"], rtol=rtol)


def test_fedsgd_matches_numpy_full_batch_gradient_step(numpy_reference):
    for kind in ("binary", "multinomial"):
        got = run("fedsgd", kind)
        want = [(p, {"train_loss": loss}) for p, loss in numpy_fedsgd(numpy_reference, kind)]
        assert_same(got, want)
        assert int(got[0][1]["reporting_clients"]) == K
        assert np.abs(got[-1][0]["w"] - np.asarray(init_params(kind)["w"])).max() > 1e-2


def test_fedsgd_is_fedavg_with_one_full_batch_local_step():
    assert_same(run("fedsgd"), run("fedavg"), rtol=1e-6, atol=1e-7)


def test_chunked_cohort_matches_whole_cohort():
    """chunk_size=2 over 5 clients: a padded last chunk (its n = 0 client is dropped)."""
    assert_same(run("fedsgd", engine=EngineOptions(chunk_size=2, unroll=1)), run("fedsgd"),
                rtol=1e-6, atol=1e-7)
