"""Shared test fixtures: independent float64 NumPy references for local training.

The references never call fedjax_lite; they take the example orders (from
``epoch_orders``) as an input, like the engine does.
"""

from __future__ import annotations

import os
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import settings

# The CLI's persistent compilation cache: one fresh folder per test session (subprocess
# runs inherit it), never the user's own cache.
os.environ.setdefault("FEDJAX_LITE_COMPILE_CACHE", tempfile.mkdtemp(prefix="fedjax_cc_"))

# Property tests explore the same examples on every run: CI never flakes on a new draw.
settings.register_profile("deterministic", derandomize=True)
settings.load_profile("deterministic")


def np_loss_and_grads(kind: str, params: dict, xb: np.ndarray, yb: np.ndarray):
    """Mean loss over the batch and its gradient, float64.

    kind 'binary': sigmoid BCE, params w[d], b[]; 'multinomial': softmax CE, w[d, C], b[C].
    """
    xb = np.asarray(xb, np.float64).reshape(len(xb), -1)
    w, b = params["w"], params["b"]
    z = xb @ w + b
    k = len(xb)
    if kind == "binary":
        yf = yb.astype(np.float64)
        losses = np.logaddexp(0.0, z) - yf * z
        g = 1.0 / (1.0 + np.exp(-z)) - yf
    elif kind == "multinomial":
        zmax = z.max(axis=1, keepdims=True)
        lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
        losses = lse - z[np.arange(k), yb]
        g = np.exp(z - lse[:, None])
        g[np.arange(k), yb] -= 1.0
    else:
        raise ValueError(kind)
    return losses.mean(), {"w": xb.T @ g / k, "b": g.mean(axis=0)}


class NumpyOptimizer:
    """sgd / sgd with (heavy-ball, optax-style trace) momentum / adam, float64."""

    def __init__(self, name: str, lr: float, momentum: float = 0.0, b1: float = 0.9,
                 b2: float = 0.999, eps: float = 1e-8):
        self.name, self.lr, self.momentum = name, lr, momentum
        self.b1, self.b2, self.eps = b1, b2, eps

    def init(self, params):
        zeros = {k: np.zeros_like(v, dtype=np.float64) for k, v in params.items()}
        return {"t": 0, "m": dict(zeros), "v": {k: v.copy() for k, v in zeros.items()}}

    def step(self, params, grads, state):
        """Returns (new params, new state)."""
        out = {}
        state = {"t": state["t"] + 1, "m": dict(state["m"]), "v": dict(state["v"])}
        t = state["t"]
        for k in params:
            g = grads[k]
            if self.name == "sgd":
                if self.momentum:
                    state["m"][k] = g + self.momentum * state["m"][k]  # optax.trace
                    g = state["m"][k]
                out[k] = params[k] - self.lr * g
            elif self.name == "adam":
                state["m"][k] = self.b1 * state["m"][k] + (1 - self.b1) * g
                state["v"][k] = self.b2 * state["v"][k] + (1 - self.b2) * g * g
                m_hat = state["m"][k] / (1 - self.b1 ** t)
                v_hat = state["v"][k] / (1 - self.b2 ** t)
                out[k] = params[k] - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
            else:
                raise ValueError(self.name)
        return out, state


def np_local_train(kind: str, opt: NumpyOptimizer, params: dict, x, y, n: int, orders, *,
                   epochs: int, batch_size: int):
    """One client's minibatch training on its ``n`` real examples: epoch e visits
    ``orders[e][:n]`` in consecutive batches of ``batch_size`` (the last one partial).
    Returns (params, (loss_sum, examples, steps)); loss_sum sums batch loss x batch size,
    the loss taken before each step."""
    params = {k: np.array(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    y = np.asarray(y)
    orders = np.asarray(orders)
    state = opt.init(params)
    loss_sum, examples, steps = 0.0, 0, 0
    for e in range(epochs):
        perm = orders[e][:n]
        assert sorted(perm.tolist()) == list(range(n)), "orders must permute the real ones"
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            loss, grads = np_loss_and_grads(kind, params, x[idx], y[idx])
            params, state = opt.step(params, grads, state)
            loss_sum += loss * len(idx)
            examples += len(idx)
            steps += 1
    return params, (loss_sum, examples, steps)


def np_prox_sgd(kind: str, start: dict, anchor: dict, x, y, n: int, orders, *,
                epochs: int, batch_size: int, lr: float, mu: float):
    """float64 minibatch SGD on F_k(w) + mu/2 ||w - anchor||^2 from ``start`` (FedProx's
    local objective, Ditto's personal one), epoch e visiting ``orders[e][:n]``. Returns
    (params, data loss summed over the steps' examples, examples)."""
    p = {k: np.asarray(v, np.float64) for k, v in start.items()}
    loss_sum, examples = 0.0, 0
    for e in range(epochs):
        perm = orders[e][:n]
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            loss, g = np_loss_and_grads(kind, p, x[idx], y[idx])
            p = {k: p[k] - lr * (g[k] + mu * (p[k] - anchor[k])) for k in p}
            loss_sum += loss * len(idx)
            examples += len(idx)
    return p, loss_sum, examples


def padded_binary_population(P: int, N: int, D: int, sizes: dict | None = None) -> dict:
    """P clients of d = D features and 0/1 labels padded to N examples, with garbage in
    the padding (x 5); ``sizes``: {rows: counts} overriding the random counts (seed 0)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(P, N, D)).astype(np.float32)
    y = rng.integers(0, 2, size=(P, N)).astype(np.int32)
    n = rng.integers(1, N + 1, size=P).astype(np.int32)
    for rows, counts in (sizes or {}).items():
        n[np.asarray(rows)] = counts
    for i in range(P):
        x[i, n[i]:] *= 5.0                       # padding garbage
    return {"x": x, "y": y, "n": n}


def small_logistic_params(D: int) -> dict:
    """Binary logistic regression parameters, 0.1 * N(0, 1) (seed 1)."""
    import jax.numpy as jnp
    rng = np.random.default_rng(1)
    return {"w": jnp.asarray(0.1 * rng.normal(size=(D,)), jnp.float32),
            "b": jnp.asarray(0.1 * rng.normal(), jnp.float32)}


@pytest.fixture(scope="session")
def numpy_reference():
    """Independent float64 NumPy references (see this module)."""
    return SimpleNamespace(loss_and_grads=np_loss_and_grads, Optimizer=NumpyOptimizer,
                           local_train=np_local_train, prox_sgd=np_prox_sgd)
