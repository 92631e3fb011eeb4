"""Uplink compression of client updates, with exact payload sizes.

A compressor maps the cohort's updates (pytree, leading client axis C) to what the server
decodes, and counts the bits each client uploads:

    compressor.apply(updates, key) -> (decoded updates, bits float[C])

Everything is simulated in floating point inside the compiled round (encode and decode
fused); the bit counts are those of the encoding described, so ``upload_bytes`` in the
metrics is what a real client would send. A client's update is the concatenation of all
its leaves (D numbers).

* ``identity``: D float32 values, 32 D bits.
* ``qsgd(bits)``: QSGD (Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient
  Quantization and Encoding", NeurIPS 2017, Sec. 3.1): with s = 2^(bits-1) - 1 levels,
  ``Q(v)_i = ||v||_2 sign(v_i) xi_i`` where ``xi_i`` is ``|v_i| / ||v||_2`` rounded
  stochastically to a neighbouring multiple of 1/s, so ``E[Q(v)] = v``. Payload: the
  float32 norm plus ``bits`` per coordinate (sign + level), 32 + bits D (no entropy
  coding: Elias coding would shrink sparse levels further).
* ``top_k(fraction)``: keeps the k = ceil(fraction D) coordinates of largest magnitude
  (Aji and Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP
  2017), zeroes the rest (biased; no error feedback). Payload: k float32 values and k
  indices of ceil(log2 D) bits.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

COMPRESSIONS = ("none", "qsgd", "top_k")


class Compressor(NamedTuple):
    apply: Callable[[object, jax.Array], tuple[object, jax.Array]]


def _per_client_flat(fn):
    """Lifts ``fn(flat float[D], key) -> (flat, bits)`` to the cohort's pytree."""
    def apply(updates, key):
        one = jax.tree.map(lambda u: u[0], updates)
        _, unravel = ravel_pytree(one)
        flat = jax.vmap(lambda t: ravel_pytree(t)[0])(updates)
        keys = jax.random.split(key, flat.shape[0])
        out, bits = jax.vmap(fn)(flat, keys)
        return jax.vmap(unravel)(out), bits
    return Compressor(apply)


def identity() -> Compressor:
    def apply(updates, key):
        del key
        D = sum(math.prod(u.shape[1:]) for u in jax.tree.leaves(updates))
        C = jax.tree.leaves(updates)[0].shape[0]
        return updates, jnp.full((C,), 32.0 * D, jnp.float32)
    return Compressor(apply)


def qsgd(bits: int) -> Compressor:
    """QSGD with ``bits`` bits per coordinate (one of them the sign), ``bits >= 2``."""
    if not (isinstance(bits, int) and 2 <= bits <= 16):
        raise ValueError(f"qsgd: bits must be an integer in [2, 16], got bits={bits!r}")
    s = float(2 ** (bits - 1) - 1)

    def one(v, key):
        norm = jnp.sqrt(jnp.sum(jnp.square(v)))
        safe = jnp.where(norm > 0, norm, 1.0)
        level = jnp.abs(v) / safe * s                        # in [0, s]
        low = jnp.floor(level)
        up = jax.random.uniform(key, v.shape, v.dtype) < (level - low)
        q = (low + up.astype(v.dtype)) / s
        out = jnp.where(norm > 0, norm * jnp.sign(v) * q, jnp.zeros_like(v))
        return out, jnp.asarray(32.0 + bits * v.shape[0], jnp.float32)

    return _per_client_flat(one)


def top_k(fraction: float) -> Compressor:
    """Keeps the ceil(fraction * D) largest-magnitude coordinates, 0 < fraction <= 1."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top_k: fraction must be in (0, 1], got fraction={fraction!r}")

    def one(v, key):
        del key
        D = v.shape[0]
        k = max(1, math.ceil(fraction * D))
        _, idx = jax.lax.top_k(jnp.abs(v), k)
        out = jnp.zeros_like(v).at[idx].set(v[idx])
        index_bits = max(1, math.ceil(math.log2(D))) if D > 1 else 1
        return out, jnp.asarray(k * (32.0 + index_bits), jnp.float32)

    return _per_client_flat(one)
