"""Tests for fedjax_lite.algorithms.fedavg against independent references.

Setup shared by every test: a population of P=14 clients, d=3 features, padded to N=6
(non-zero garbage in the padding); the cohort is K=5 of its rows, 7, 3, 9, 0, 12 (in
that order), with n = [6, 2, 5, 1, 4]; 2 local epochs of batch 2 with client SGD. Each distinct FedAvg configuration compiles one round (a few seconds), so
the configurations are built once per module and reused.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms import fedavg
from fedjax_lite.core import (Cohort, EngineOptions, local_train, local_train_chunk,
                              make_cohort)
from fedjax_lite.core.shuffle import epoch_orders, epoch_orders_lanes
from fedjax_lite.models import (logistic_regression, masked_mean_loss,
                                multinomial_logistic_regression)

K, N, D, C = 5, 6, 3, 3
E, BATCH = 2, 2
CLIENT_LR = 0.3
SIZES = np.array([6, 2, 5, 1, 4], np.int32)
INDEX = np.array([7, 3, 9, 0, 12], np.int32)
P = 14  # population rows
ROUNDS = 3
ENGINE = EngineOptions(chunk_size=None, unroll=2)


def make_population(kind: str, seed: int = 0) -> dict:
    """NumPy {x, y, n} of P clients; the cohort's clients are rows INDEX (sizes SIZES),
    the other rows hold clients of their own; padding slots hold garbage."""
    rng = np.random.default_rng(seed)
    classes = 2 if kind == "binary" else C
    x = rng.normal(size=(P, N, D)).astype(np.float32)
    y = rng.integers(0, classes, size=(P, N)).astype(np.int32)
    n = rng.integers(1, N + 1, size=P).astype(np.int32)
    n[INDEX] = SIZES
    for i in range(P):
        x[i, n[i]:] *= 5.0
    return {"x": x, "y": y, "n": n}


def make_data(kind: str, seed: int = 0):
    """The cohort's clients' x [K, N, D], y [K, N], in cohort order."""
    pop = make_population(kind, seed)
    return pop["x"][INDEX], pop["y"][INDEX]


def make_model(kind: str):
    return logistic_regression(D) if kind == "binary" else multinomial_logistic_regression(D, C)


def make_init_params(kind: str):
    rng = np.random.default_rng(1)  # non-zero start, so bias terms etc. all matter
    shape = (D,) if kind == "binary" else (D, C)
    bshape = () if kind == "binary" else (C,)
    return {"w": jnp.asarray(0.1 * rng.normal(size=shape), jnp.float32),
            "b": jnp.asarray(0.1 * rng.normal(size=bshape), jnp.float32)}


def population_for(kind: str) -> dict:
    return {k: jnp.asarray(v) for k, v in make_population(kind).items()}


def cohort_for(kind: str, index=INDEX) -> Cohort:
    return make_cohort(population_for(kind), jnp.asarray(index))


def round_keys():
    root = jax.random.key(123)
    return [jax.random.fold_in(root, r) for r in range(ROUNDS)]


@functools.lru_cache(maxsize=None)
def algorithm(kind: str, weighting: str = "examples", server: str = "sgd",
              engine: EngineOptions = ENGINE):
    server_tx = optax.sgd(1.0) if server == "sgd" else optax.adam(0.1)
    alg = fedavg(make_model(kind), client_optimizer=optax.sgd(CLIENT_LR),
                 server_optimizer=server_tx, local_epochs=E, batch_size=BATCH,
                 weighting=weighting, engine=engine)
    return alg.init, jax.jit(alg.apply)


@functools.lru_cache(maxsize=None)
def run_rounds(kind: str, weighting: str = "examples", server: str = "sgd",
               engine: EngineOptions = ENGINE):
    """Params after each of ROUNDS rounds (NumPy) and the metrics."""
    init, apply = algorithm(kind, weighting, server, engine)
    state = init(make_init_params(kind))
    cohort = cohort_for(kind)
    history = []
    for key in round_keys():
        state, metrics = apply(state, cohort, key)
        history.append((jax.tree.map(np.asarray, state.params),
                        {k: np.asarray(v) for k, v in metrics.items()}, int(state.round)))
    return history


@jax.jit
def reference_orders(round_key, n):
    """The per-client orders a round with this key uses: apply splits the key into
    (aggregation, training) keys and folds the population row into the training key."""
    _, train_key = jax.random.split(round_key)
    keys = jax.vmap(lambda i: jax.random.fold_in(train_key, i))(jnp.asarray(INDEX))
    return epoch_orders(keys, n, N, E)


def numpy_fedavg(numpy_reference, kind, *, weighting="examples", server=None):
    """float64 FedAvg: every client runs minibatch SGD from the server params on the
    given orders; the server steps on the pseudo-gradient -weighted_mean(delta)."""
    x, y = make_data(kind)
    params = {k: np.asarray(v, np.float64) for k, v in make_init_params(kind).items()}
    server = server or numpy_reference.Optimizer("sgd", lr=1.0)
    server_state = server.init(params)
    history = []
    for key in round_keys():
        orders = np.asarray(reference_orders(key, jnp.asarray(SIZES)))
        deltas, loss_sum, examples = [], 0.0, 0
        for k in range(K):
            p_k, (ls, ex, _) = numpy_reference.local_train(
                kind, numpy_reference.Optimizer("sgd", lr=CLIENT_LR), params, x[k], y[k],
                int(SIZES[k]), orders[k], epochs=E, batch_size=BATCH)
            deltas.append({name: p_k[name] - params[name] for name in params})
            loss_sum += ls
            examples += ex
        weights = SIZES.astype(np.float64) if weighting == "examples" else np.ones(K)
        mean_delta = {name: sum(w * d[name] for w, d in zip(weights, deltas)) / weights.sum()
                      for name in params}
        pseudo_grad = {name: -v for name, v in mean_delta.items()}
        params, server_state = server.step(params, pseudo_grad, server_state)
        history.append((params, loss_sum / examples))
    return history


def assert_tree_close(got, want, rtol, atol, msg=""):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol=rtol,
                                   atol=atol, err_msg=f"{msg} {k}")


# --------------------------------------------------------------------------- (a)


def test_vmapped_cohort_equals_python_loop_over_clients():
    kind = "binary"
    model = make_model(kind)
    _, apply = algorithm(kind)
    init, _ = algorithm(kind)
    params0 = make_init_params(kind)
    cohort = cohort_for(kind)
    key = round_keys()[0]
    new_state, metrics = apply(init(params0), cohort, key)

    def loss_fn(p, xb, yb, mb):
        loss = masked_mean_loss(model, p, xb, yb, mb)
        return loss, loss

    @jax.jit
    def one_client(params, x, y, n, client_key):
        orders = epoch_orders(client_key[None], n[None], N, E)[0]
        return local_train(loss_fn, optax.sgd(CLIENT_LR), params, x, y, n, orders,
                           local_epochs=E, batch_size=BATCH)

    _, train_key = jax.random.split(key)
    pop = cohort.population
    np.testing.assert_array_equal(cohort.n, SIZES)
    deltas, weights, loss_sum, examples = [], [], 0.0, 0.0
    for k in range(K):  # one client at a time, its key from its population row
        row = int(INDEX[k])
        client_key = jax.random.fold_in(train_key, row)
        p_k, stats = one_client(params0, pop["x"][row], pop["y"][row], pop["n"][row],
                                client_key)
        deltas.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), p_k, params0))
        weights.append(float(SIZES[k]))
        loss_sum += float(stats.loss_sum)
        examples += float(stats.examples)
        assert int(stats.steps) == E * -(-int(SIZES[k]) // BATCH)
    w = np.array(weights)
    expected = {name: np.asarray(params0[name])
                + sum(wk * d[name] for wk, d in zip(w, deltas)) / w.sum()
                for name in params0}
    assert_tree_close(new_state.params, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(metrics["train_loss"]), loss_sum / examples, rtol=1e-6)
    assert int(new_state.round) == 1


def test_client_randomness_does_not_depend_on_cohort_position():
    """Reordering the cohort (same population rows) gives the same round: each client's
    key comes from its row, not its position."""
    kind = "binary"
    init, apply = algorithm(kind)
    cohort = cohort_for(kind)
    perm = np.array([2, 4, 0, 3, 1])
    shuffled = cohort_for(kind, INDEX[perm])
    np.testing.assert_array_equal(shuffled.n, SIZES[perm])
    key = round_keys()[0]
    state0 = init(make_init_params(kind))
    a, ma = apply(state0, cohort, key)
    b, mb = apply(state0, shuffled, key)
    assert_tree_close(b.params, jax.tree.map(np.asarray, a.params), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mb["train_loss"], ma["train_loss"], rtol=1e-6)


def test_rows_outside_the_cohort_do_not_matter():
    """Only the cohort's population rows are read: rewriting every other row (data and
    n) leaves the round unchanged."""
    kind = "binary"
    init, apply = algorithm(kind)
    pop = make_population(kind)
    other = np.setdiff1d(np.arange(P), INDEX)
    rng = np.random.default_rng(99)
    changed = {k: v.copy() for k, v in pop.items()}
    changed["x"][other] = rng.normal(size=changed["x"][other].shape) * 3.0
    changed["y"][other] = 1 - changed["y"][other]
    changed["n"][other] = N + 1 - changed["n"][other]
    key = round_keys()[0]
    state0 = init(make_init_params(kind))
    a, ma = apply(state0, cohort_for(kind), key)
    b, mb = apply(state0, make_cohort({k: jnp.asarray(v) for k, v in changed.items()},
                                      jnp.asarray(INDEX)), key)
    assert_tree_close(b.params, jax.tree.map(np.asarray, a.params), rtol=0, atol=0)
    np.testing.assert_array_equal(mb["train_loss"], ma["train_loss"])


def _adam_loss_fn(p, xb, yb, mb):
    loss = masked_mean_loss(make_model("binary"), p, xb, yb, mb)
    return loss, loss


ADAM_KW = dict(local_epochs=E, batch_size=BATCH, unroll=2)


@jax.jit
def _adam_chunk(params, x, y, n, orders):
    """local_train_chunk on K clients (orders [E, N, K])."""
    return local_train_chunk(_adam_loss_fn, optax.adam(0.1), params, x, y, n, orders,
                             **ADAM_KW)


@jax.jit
def _adam_one(params, x, y, n, orders):
    """local_train on one client (orders [E, N])."""
    return local_train(_adam_loss_fn, optax.adam(0.1), params, x, y, n, orders, **ADAM_KW)


def test_local_train_chunk_equals_separate_local_train_calls_under_adam():
    """The engine's loop over K clients (different n, Adam state per client) is K
    independent clients: each ends where local_train alone on its orders ends."""
    x, y = make_data("binary")
    params = make_init_params("binary")
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.asarray(INDEX))
    orders = jax.jit(epoch_orders_lanes, static_argnums=(2, 3))(keys, jnp.asarray(SIZES),
                                                                 N, E)
    assert orders.shape == (E, N, K)
    n = jnp.asarray(SIZES)
    p_chunk, s_chunk = _adam_chunk(params, jnp.asarray(x), jnp.asarray(y), n, orders)
    for k in range(K):
        p_k, s_k = _adam_one(params, jnp.asarray(x[k]), jnp.asarray(y[k]), n[k],
                             orders[:, :, k])
        for name in params:
            np.testing.assert_allclose(p_chunk[name][k], p_k[name], rtol=1e-6, atol=1e-7,
                                       err_msg=f"client {k} {name}")
        np.testing.assert_allclose(s_chunk.loss_sum[k], s_k.loss_sum, rtol=1e-6)
        assert float(s_chunk.examples[k]) == float(s_k.examples) == E * SIZES[k]
        assert int(s_chunk.steps[k]) == int(s_k.steps) == E * -(-int(SIZES[k]) // BATCH)
        assert np.abs(np.asarray(p_k["w"]) - np.asarray(params["w"])).max() > 1e-3


# --------------------------------------------------------------------------- (b), (c)


@pytest.mark.parametrize("kind,weighting", [("binary", "examples"),
                                            ("multinomial", "examples"),
                                            ("binary", "uniform")])
def test_fedavg_matches_numpy_fedavg(numpy_reference, kind, weighting):
    got = run_rounds(kind, weighting)
    want = numpy_fedavg(numpy_reference, kind, weighting=weighting)
    p0 = {k: np.asarray(v) for k, v in make_init_params(kind).items()}
    for r, ((params, metrics, rnd), (ref_params, ref_loss)) in enumerate(zip(got, want)):
        assert_tree_close(params, ref_params, rtol=1e-5, atol=1e-6, msg=f"round {r}")
        np.testing.assert_allclose(float(metrics["train_loss"]), ref_loss, rtol=1e-5)
        assert rnd == r + 1
    # the model moved, so the comparison is not vacuous
    assert np.abs(got[-1][0]["w"] - p0["w"]).max() > 1e-2


def test_example_and_uniform_weighting_differ():
    a = run_rounds("binary", "examples")[0][0]
    b = run_rounds("binary", "uniform")[0][0]
    assert np.abs(a["w"] - b["w"]).max() > 1e-4


def test_invalid_weighting_is_rejected():
    with pytest.raises(ValueError, match="weighting must be 'examples' or 'uniform'"):
        fedavg(make_model("binary"), client_optimizer=optax.sgd(0.1),
               server_optimizer=optax.sgd(1.0), local_epochs=1, batch_size=1,
               weighting="by_size")


# --------------------------------------------------------------------------- (d)


def test_server_adam_matches_adam_on_the_mean_pseudo_gradient(numpy_reference):
    kind = "binary"
    got = run_rounds(kind, server="adam")

    # (1) against a float64 NumPy Adam on the NumPy FedAvg pseudo-gradient
    want = numpy_fedavg(numpy_reference, kind,
                        server=numpy_reference.Optimizer("adam", lr=0.1))
    for r, ((params, _, _), (ref_params, _)) in enumerate(zip(got, want)):
        assert_tree_close(params, ref_params, rtol=1e-4, atol=1e-5, msg=f"round {r}")

    # (2) optax.adam applied by hand: the mean delta of each round is what FedAvg with
    # server SGD(lr=1) adds to the same starting params (client training does not depend
    # on the server optimizer)
    init_sgd, apply_sgd = algorithm(kind)
    adam = optax.adam(0.1)
    params = make_init_params(kind)
    opt_state = adam.init(params)
    cohort = cohort_for(kind)
    for r, key in enumerate(round_keys()):
        stepped, _ = apply_sgd(init_sgd(params), cohort, key)
        mean_delta = jax.tree.map(jnp.subtract, stepped.params, params)
        updates, opt_state = adam.update(jax.tree.map(jnp.negative, mean_delta), opt_state,
                                         params)
        params = optax.apply_updates(params, updates)
        assert_tree_close(got[r][0], jax.tree.map(np.asarray, params), rtol=1e-5,
                          atol=1e-6, msg=f"round {r}")


# --------------------------------------------------------------------------- (e)


def test_chunked_cohort_matches_whole_cohort():
    """chunk_size=3 over 5 clients (a padded last chunk) and another unroll give the
    same rounds as one vmapped chunk, up to float reassociation."""
    whole = run_rounds("binary")
    chunked = run_rounds("binary", engine=EngineOptions(chunk_size=3, unroll=1))
    for r, ((a, ma, _), (b, mb, _)) in enumerate(zip(whole, chunked)):
        assert_tree_close(b, a, rtol=1e-5, atol=1e-6, msg=f"round {r}")
        np.testing.assert_allclose(mb["train_loss"], ma["train_loss"], rtol=1e-5)
