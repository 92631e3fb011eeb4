"""Aggregators: optax-style (init, apply) pairs over a stacked client axis.

    aggregator.init(params_like) -> agg_state
    aggregator.apply(deltas, weights, agg_state, key) -> (delta, agg_state, metrics)

``deltas`` is a pytree whose leaves have a leading client axis [C, ...]; ``weights`` is
float[C] (example counts, ones, or 0 for clients that did not report). Everything is
traceable, so aggregation compiles into the round.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class Aggregator(NamedTuple):
    init: Callable[[Any], Any]
    apply: Callable[[Any, jax.Array, Any, jax.Array], tuple[Any, Any, dict]]


def weighted_mean(deltas, weights: jax.Array):
    """sum_k w_k delta_k / sum_k w_k over the leading axis; zeros if all weights are 0."""
    total = jnp.sum(weights)
    scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
    return jax.tree.map(
        lambda d: jnp.tensordot(weights.astype(d.dtype), d, axes=1) * scale.astype(d.dtype),
        deltas)


def mean() -> Aggregator:
    """The weighted mean of FedAvg (McMahan et al. 2017, Algorithm 1)."""

    def init(params_like):
        del params_like
        return ()

    def apply(deltas, weights, state, key):
        del key
        return weighted_mean(deltas, weights), state, {}

    return Aggregator(init, apply)
