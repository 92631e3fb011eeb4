"""Adapts a flax (linen) module to the :class:`Model` interface."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from fedjax_lite.models.base import Model, sigmoid_loss, softmax_loss


def from_flax(module, input_shape: Sequence[int], num_classes: int) -> Model:
    """Wraps ``module`` (a ``flax.linen.Module`` mapping x[B, *input_shape] to logits).

    ``num_classes == 2`` with a module emitting one logit per example (shape [B] or
    [B, 1]) uses the sigmoid loss; otherwise logits are [B, num_classes] with softmax.
    """

    def init(key):
        return module.init(key, jnp.zeros((1, *input_shape), jnp.float32))

    def apply(params, x):
        logits = module.apply(params, x)
        if num_classes == 2 and logits.ndim == 2 and logits.shape[-1] == 1:
            logits = logits[:, 0]
        return logits

    def binary_out(params_shape) -> bool:
        out = jax.eval_shape(lambda p: apply(p, jnp.zeros((1, *input_shape))), params_shape)
        return out.ndim == 1

    params_shape = jax.eval_shape(init, jax.random.key(0))
    if binary_out(params_shape):
        return Model(init, apply, sigmoid_loss, lambda z: (z > 0).astype(jnp.int32), 2)
    return Model(init, apply, softmax_loss, lambda z: jnp.argmax(z, -1), num_classes)
