"""The models' per-example losses against float64 NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.models.base import sigmoid_loss

Z = np.array([-100.0, -30.0, -5.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 3.0, 20.0, 100.0])


def _reference(z, y):
    """float64: loss = log(1 + e^z) - y z, dloss/dz = sigmoid(z) - y, d2 = p (1 - p)."""
    z = np.asarray(z, np.float64)
    p = 1.0 / (1.0 + np.exp(-z))
    return np.logaddexp(0.0, z) - y * z, p - y, p * (1.0 - p)


def test_sigmoid_loss_value_gradient_and_curvature_match_float64():
    for label in (0, 1):
        y = np.full(Z.shape, label)
        value, grad, curv = _reference(Z, y)
        z = jnp.asarray(Z, jnp.float32)
        yj = jnp.asarray(y, jnp.int32)
        got = sigmoid_loss(z, yj)
        np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-6)
        g = jax.vmap(jax.grad(lambda t, l: sigmoid_loss(t[None], l[None])[0]))(z, yj)
        np.testing.assert_allclose(g, grad, rtol=1e-5, atol=1e-7)
        h = jax.vmap(jax.grad(jax.grad(lambda t, l: sigmoid_loss(t[None], l[None])[0])))(z, yj)
        np.testing.assert_allclose(h, curv, rtol=1e-4, atol=1e-7)
        assert np.all(np.isfinite(np.asarray(got))) and np.all(np.isfinite(np.asarray(g)))


def test_sigmoid_loss_gradient_through_a_mean_matches_optax_form():
    """The custom derivative agrees with autodiff of optax's formula in a model-shaped
    use (mean loss of a linear model), weights included."""
    import optax
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, size=32), jnp.int32)
    w = jnp.asarray(rng.normal(size=5) * 3, jnp.float32)
    ours = jax.grad(lambda w: jnp.mean(sigmoid_loss(x @ w, y)))(w)
    theirs = jax.grad(lambda w: jnp.mean(optax.sigmoid_binary_cross_entropy(
        x @ w, y.astype(jnp.float32))))(w)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
