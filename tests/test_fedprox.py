"""Tests for fedjax_lite.algorithms.fedprox against float64 NumPy references.

Setup: a population of P=10 clients, d=3 features, padded to N=6 (garbage in the
padding); the cohort is rows 7, 3, 9, 0, 2 with n = [6, 2, 5, 1, 4]; binary logistic
regression, E=3 local epochs of batch 2 with client SGD, server SGD(1), 3 rounds. The
references take the engine's example orders (``epoch_orders``) and, for stragglers, the
per-client epoch counts (``straggler_epochs``) as inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms.fedavg import fedavg
from fedjax_lite.algorithms.fedprox import fedprox, straggler_epochs
from fedjax_lite.core.round import EngineOptions, make_cohort
from fedjax_lite.core.shuffle import epoch_orders
from fedjax_lite.models.linear import logistic_regression
from conftest import padded_binary_population, small_logistic_params

K, N, D, P = 5, 6, 3, 10
E, BATCH, LR, MU = 3, 2, 0.3, 0.5
SIZES = np.array([6, 2, 5, 1, 4], np.int32)
INDEX = np.array([7, 3, 9, 0, 2], np.int32)
ROUNDS = 3
ENGINE = EngineOptions(chunk_size=None, unroll=1)


POP = padded_binary_population(P, N, D, sizes={tuple(INDEX): SIZES})


def init_params():
    return small_logistic_params(D)


def round_keys():
    return [jax.random.fold_in(jax.random.key(42), r) for r in range(ROUNDS)]


@functools.lru_cache(maxsize=None)
def run(name: str, mu: float = 0.0, fraction: float = 0.0, drop: bool = False):
    """(params, metrics) after each round of the jitted algorithm."""
    kw = dict(client_optimizer=optax.sgd(LR), server_optimizer=optax.sgd(1.0),
              local_epochs=E, batch_size=BATCH, engine=ENGINE)
    if name == "fedavg":
        alg = fedavg(logistic_regression(D), **kw)
    else:
        alg = fedprox(logistic_regression(D), mu=mu, straggler_fraction=fraction,
                      drop_stragglers=drop, **kw)
    apply = jax.jit(alg.apply)
    state = alg.init(init_params())
    cohort = make_cohort({k: jnp.asarray(v) for k, v in POP.items()}, jnp.asarray(INDEX))
    out = []
    for key in round_keys():
        state, metrics = apply(state, cohort, key)
        out.append((jax.tree.map(np.asarray, state.params),
                    {k: np.asarray(v) for k, v in metrics.items()}))
    assert int(state.round) == ROUNDS
    return out


@jax.jit
def engine_orders(key):
    _, train_key = jax.random.split(key)
    keys = jax.vmap(lambda i: jax.random.fold_in(train_key, i))(jnp.asarray(INDEX))
    return epoch_orders(keys, jnp.asarray(SIZES), N, E)


def np_prox_sgd(ref, params, x, y, n, orders, epochs, mu):
    """float64 minibatch SGD on F_k(w) + mu/2 ||w - params||^2; data loss reported."""
    return ref.prox_sgd("binary", params, params, x, y, n, orders, epochs=epochs,
                        batch_size=BATCH, lr=LR, mu=mu)


def numpy_fedprox(ref, mu, epochs_fn=lambda r: np.full(K, E), weight_fn=None):
    """float64 FedProx with server SGD(1): the weighted mean of the client models;
    ``epochs_fn(r)`` / ``weight_fn(r)`` give round r's per-client epochs / weights."""
    x, y = POP["x"][INDEX].astype(np.float64), POP["y"][INDEX]
    params = {k: np.asarray(v, np.float64) for k, v in init_params().items()}
    out = []
    for r, key in enumerate(round_keys()):
        orders, epochs = np.asarray(engine_orders(key)), epochs_fn(r)
        weights = SIZES.astype(np.float64) if weight_fn is None else weight_fn(r)
        deltas, loss_sum, examples = [], 0.0, 0
        for k in range(K):
            p_k, ls, ex = np_prox_sgd(ref, params, x[k], y[k], int(SIZES[k]), orders[k],
                                      int(epochs[k]), mu)
            deltas.append({n: p_k[n] - params[n] for n in params})
            loss_sum, examples = loss_sum + ls, examples + ex
        params = {n: params[n] + sum(w * d[n] for w, d in zip(weights, deltas))
                  / weights.sum() for n in params}
        out.append((params, loss_sum / examples))
    return out


def assert_matches(got, want, rtol=1e-5, atol=1e-6):
    for r, ((params, metrics), (ref_params, ref_loss)) in enumerate(zip(got, want)):
        for n in ref_params:
            np.testing.assert_allclose(params[n], ref_params[n], rtol=rtol, atol=atol,
                                       err_msg=f"round {r} {n}")
        np.testing.assert_allclose(metrics["train_loss"], ref_loss, rtol=rtol)


FRACTIONS = (1.0, 0.4, 0.0)
EXTRA_KEYS = [jax.random.key(r) for r in range(5)]


@jax.jit
def _all_draws(keys, index):
    return {f: jax.vmap(lambda k: straggler_epochs(k, index, f, E))(keys) for f in FRACTIONS}


@functools.lru_cache(maxsize=None)
def all_draws(perm=None):
    """{fraction: (is_straggler bool[R, K], epochs int[R, K])} for the ROUNDS round keys
    followed by 5 more keys (one compiled program for every fraction)."""
    index = INDEX if perm is None else INDEX[np.asarray(perm)]
    out = _all_draws(jnp.stack(round_keys() + EXTRA_KEYS), jnp.asarray(index))
    return {f: tuple(np.asarray(a) for a in v) for f, v in out.items()}


def draws(r, fraction):
    """(is_straggler bool[K], epochs int[K]) of round r."""
    s, e = all_draws()[fraction]
    return s[r], e[r]


def test_mu_zero_is_fedavg():
    got, want = run("fedprox", mu=0.0), run("fedavg")
    for (a, ma), (b, mb) in zip(got, want):
        for n in a:
            np.testing.assert_allclose(a[n], b[n], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ma["train_loss"], mb["train_loss"], rtol=1e-6)
        assert int(ma["stragglers"]) == 0


def test_straggler_epochs_helper():
    for fraction, count in ((1.0, K), (0.4, 2), (0.0, 0)):
        s, e = all_draws()[fraction]
        assert (s.sum(axis=1) == count).all(), s
        assert (e[~s] == E).all() and ((1 <= e[s]) & (e[s] <= E)).all(), e
    # fewer than E epochs do occur in the rounds the tests use
    assert (all_draws()[1.0][1][:ROUNDS] < E).any()
    # a client's draw follows its population row, not its cohort position
    perm = (3, 0, 4, 1, 2)
    for fraction in FRACTIONS:
        for a, b in zip(all_draws(perm)[fraction], all_draws()[fraction]):
            np.testing.assert_array_equal(a, b[:, list(perm)])


def test_proximal_sgd_with_stragglers_matches_numpy(numpy_reference):
    """mu > 0 and every client a straggler (partial work aggregated, FedProx's rule)."""
    got = run("fedprox", mu=MU, fraction=1.0)
    want = numpy_fedprox(numpy_reference, MU, epochs_fn=lambda r: draws(r, 1.0)[1])
    assert_matches(got, want)
    assert all(int(m["stragglers"]) == K for _, m in got)
    # the proximal term matters: the same epochs without it end elsewhere
    no_prox = numpy_fedprox(numpy_reference, 0.0, epochs_fn=lambda r: draws(r, 1.0)[1])
    assert np.abs(got[-1][0]["w"] - no_prox[-1][0]["w"]).max() > 1e-3


def test_drop_stragglers_aggregates_only_the_others(numpy_reference):
    """drop_stragglers (FedAvg's rule in the paper's comparison): weight 0 for the 2
    stragglers; the other 3 run all E epochs of proximal SGD."""
    got = run("fedprox", mu=MU, fraction=0.4, drop=True)
    want = numpy_fedprox(numpy_reference, MU, epochs_fn=lambda r: draws(r, 0.4)[1],
                         weight_fn=lambda r: np.where(draws(r, 0.4)[0], 0.0,
                                                      SIZES.astype(np.float64)))
    assert_matches(got, want)
    assert all(int(m["stragglers"]) == 2 for _, m in got)


def test_invalid_arguments_are_rejected():
    kw = dict(client_optimizer=optax.sgd(LR), server_optimizer=optax.sgd(1.0),
              local_epochs=E, batch_size=BATCH)
    with pytest.raises(ValueError, match="mu must be >= 0"):
        fedprox(logistic_regression(D), mu=-1.0, **kw)
    with pytest.raises(ValueError, match="straggler_fraction must be in"):
        fedprox(logistic_regression(D), mu=0.1, straggler_fraction=1.5, **kw)
