"""The model interface: three pure functions on a parameter pytree.

Everything the engine needs from a model, for a batch of examples:

    init(key) -> params
    apply(params, x[B, ...]) -> logits[B, ...]
    loss(logits, y[B]) -> float[B]            per-example loss
    predict(logits) -> int[B]                 predicted labels (for accuracy)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = Any


class Model(NamedTuple):
    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    predict: Callable[[jax.Array], jax.Array]
    num_classes: int


def sigmoid_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.sigmoid_binary_cross_entropy(logits, y.astype(logits.dtype))


def softmax_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def masked_mean_loss(model: Model, params: Params, x: jax.Array, y: jax.Array,
                     mask: jax.Array) -> jax.Array:
    """Mean per-example loss over the real (``mask``) examples of a batch; 0 if none."""
    per_example = model.loss(model.apply(params, x), y)
    mask = mask.astype(per_example.dtype)
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)
