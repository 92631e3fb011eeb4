"""Tests for fedjax_lite.core.local.local_train (ONE client's local training).

Shapes are tiny and shared (d=3 features, a client of n=5 examples padded to N=5 or
N=15, batch 2 or 8); one jitted program runs every optimizer variant, so each
(N, batch size) compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.core.local import LocalStats, local_train
from fedjax_lite.core.shuffle import epoch_orders
from fedjax_lite.models import logistic_regression, masked_mean_loss

D = 3          # features
NREAL = 5      # the client's real examples
E = 3          # local epochs
MODEL = logistic_regression(D)

OPTIMIZERS = {
    "sgd": (lambda: optax.sgd(0.5), dict(name="sgd", lr=0.5)),
    "momentum": (lambda: optax.sgd(0.3, momentum=0.9), dict(name="sgd", lr=0.3, momentum=0.9)),
    "adam": (lambda: optax.adam(0.1), dict(name="adam", lr=0.1)),
}


def loss_fn(params, xb, yb, mb):
    loss = masked_mean_loss(MODEL, params, xb, yb, mb)
    return loss, loss


@functools.lru_cache(maxsize=None)
def trainer(batch_size: int):
    """One jitted program running local_train for every optimizer of OPTIMIZERS (plus
    Adam with a traced ``num_epochs``), so a (shape,
    batch_size) compiles once for all the tests that use it."""

    def f(params, x, y, n, orders, num_epochs):
        out = {}
        for name, (make_tx, _) in OPTIMIZERS.items():
            out[name] = local_train(loss_fn, make_tx(), params, x, y, n, orders,
                                    local_epochs=E, batch_size=batch_size, unroll=2)
        out["adam_num_epochs"] = local_train(loss_fn, OPTIMIZERS["adam"][0](), params, x, y,
                                             n, orders, local_epochs=E,
                                             batch_size=batch_size, num_epochs=num_epochs,
                                             unroll=2)
        return out

    return jax.jit(f)


@functools.partial(jax.jit, static_argnums=(2,))
def client_orders(key, n, N):
    """int32[E, N] orders of one client (from its key) via epoch_orders."""
    return epoch_orders(key[None], n[None], N, E)[0]


@pytest.fixture(scope="module")
def client():
    """One client: n=5 real examples, and the same client padded to 15 with non-zero
    garbage in the padding (padding must be invisible whatever it holds)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NREAL, D)).astype(np.float32)
    y = np.array([1, 0, 1, 1, 0], np.int32)
    x_pad = np.concatenate([x, 5.0 * rng.normal(size=(2 * NREAL, D)).astype(np.float32)])
    y_pad = np.concatenate([y, np.ones(2 * NREAL, np.int32)])
    params = {"w": jnp.asarray([0.1, -0.2, 0.3], jnp.float32), "b": jnp.asarray(0.05)}
    key = jax.random.key(42)
    return dict(x=x, y=y, x_pad=x_pad, y_pad=y_pad, params=params, key=key)


def _orders(client, N):
    return client_orders(client["key"], jnp.asarray(NREAL, jnp.int32), N)


def _run_all(client, N, batch_size, num_epochs=E):
    """{optimizer: (params, stats)} as NumPy, and the orders used."""
    x, y = client["x_pad"][:N], client["y_pad"][:N]
    orders = _orders(client, N)
    out = trainer(batch_size)(client["params"], jnp.asarray(x), jnp.asarray(y),
                              jnp.asarray(NREAL, jnp.int32), orders,
                              jnp.asarray(num_epochs, jnp.int32))
    return jax.tree.map(np.asarray, out), np.asarray(orders)


def _run(client, opt, N, batch_size):
    out, orders = _run_all(client, N, batch_size)
    return out[opt][0], out[opt][1], orders


def _assert_params_close(got, want, rtol=1e-5, atol=1e-6):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol=rtol,
                                   atol=atol, err_msg=k)


@pytest.mark.parametrize("N", [NREAL, 3 * NREAL])
def test_sgd_matches_numpy_minibatch_reference(client, numpy_reference, N):
    params, stats, orders = _run(client, "sgd", N, batch_size=2)
    ref_params, (loss_sum, examples, steps) = numpy_reference.local_train(
        "binary", numpy_reference.Optimizer(**OPTIMIZERS["sgd"][1]), client["params"],
        client["x"], client["y"], NREAL, orders, epochs=E, batch_size=2)
    _assert_params_close(params, ref_params)
    assert isinstance(stats, LocalStats)
    assert int(stats.steps) == steps == E * 3          # ceil(5 / 2) steps per epoch
    assert float(stats.examples) == examples == E * NREAL
    np.testing.assert_allclose(float(stats.loss_sum), loss_sum, rtol=1e-5)
    # it actually trained
    assert np.abs(params["w"] - np.asarray(client["params"]["w"])).max() > 1e-3


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_stateful_optimizers_match_numpy_reference(client, numpy_reference, opt):
    params, stats, orders = _run(client, opt, 3 * NREAL, batch_size=2)
    ref_params, (_, _, steps) = numpy_reference.local_train(
        "binary", numpy_reference.Optimizer(**OPTIMIZERS[opt][1]), client["params"],
        client["x"], client["y"], NREAL, orders, epochs=E, batch_size=2)
    _assert_params_close(params, ref_params, rtol=1e-4, atol=1e-5)
    assert int(stats.steps) == steps


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("batch_size", [2, 8])
def test_padding_invariance(client, opt, batch_size):
    """The client padded to N=n and to N=3n ends at the same parameters. With momentum
    and Adam a zero-gradient step would still move the parameters, so this shows the
    padded step slots are skipped (params and optimizer state carried through)."""
    p_small, s_small, _ = _run(client, opt, NREAL, batch_size)
    p_big, s_big, _ = _run(client, opt, 3 * NREAL, batch_size)
    for k in p_small:
        np.testing.assert_allclose(p_big[k], p_small[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert int(s_big.steps) == int(s_small.steps) == E * -(-NREAL // batch_size)
    assert float(s_big.examples) == float(s_small.examples) == E * NREAL
    np.testing.assert_allclose(float(s_big.loss_sum), float(s_small.loss_sum), rtol=1e-6)


def test_zero_gradient_steps_would_be_detected():
    """Sanity check of the test above: under momentum and Adam an extra step with a zero
    gradient does move the parameters, so equality there is evidence of skipping."""
    p = {"w": jnp.ones(2)}
    g = {"w": jnp.full(2, 0.5)}
    zero = {"w": jnp.zeros(2)}
    for tx in (optax.sgd(0.3, momentum=0.9), optax.adam(0.1)):
        s = tx.init(p)
        u, s = tx.update(g, s, p)
        p1 = optax.apply_updates(p, u)
        u2, _ = tx.update(zero, s, p1)
        assert float(jnp.abs(u2["w"]).max()) > 1e-3


@pytest.mark.parametrize("N", [NREAL, 3 * NREAL])
def test_batch_size_at_least_n_is_one_full_batch_step_per_epoch(client, numpy_reference, N):
    params, stats, orders = _run(client, "sgd", N, batch_size=8)
    assert int(stats.steps) == E
    assert float(stats.examples) == E * NREAL
    # full-batch gradient descent: the order does not matter
    identity = np.tile(np.arange(NREAL), (E, 1))
    ref_params, (loss_sum, _, _) = numpy_reference.local_train(
        "binary", numpy_reference.Optimizer(**OPTIMIZERS["sgd"][1]), client["params"],
        client["x"], client["y"], NREAL, identity, epochs=E, batch_size=NREAL)
    _assert_params_close(params, ref_params)
    np.testing.assert_allclose(float(stats.loss_sum), loss_sum, rtol=1e-5)


def test_num_epochs_fewer_than_local_epochs(client, numpy_reference):
    N = 3 * NREAL
    opt = numpy_reference.Optimizer(**OPTIMIZERS["adam"][1])
    for num_epochs in (0, 1, 2, 3):
        out, orders = _run_all(client, N, 2, num_epochs=num_epochs)
        params, stats = out["adam_num_epochs"]
        ref_params, (loss_sum, examples, steps) = numpy_reference.local_train(
            "binary", opt, client["params"], client["x"], client["y"], NREAL, orders,
            epochs=num_epochs, batch_size=2)
        _assert_params_close(params, ref_params, rtol=1e-4, atol=1e-5)
        assert int(stats.steps) == steps == 3 * num_epochs
        assert float(stats.examples) == examples
        np.testing.assert_allclose(float(stats.loss_sum), loss_sum, rtol=1e-5, atol=1e-7)
        if num_epochs == 0:  # nothing ran: the parameters are exactly unchanged
            for k in params:
                np.testing.assert_array_equal(params[k], np.asarray(client["params"][k]))
        if num_epochs == E:  # same as not passing num_epochs
            for k in params:
                np.testing.assert_allclose(params[k], out["adam"][0][k], rtol=1e-6, atol=1e-7)
