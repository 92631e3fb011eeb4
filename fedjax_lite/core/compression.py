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
  indices of ceil(log2 D) bits. Biased, so without memory the coordinates it drops are
  lost; :mod:`fedjax_lite.core.faults` adds error feedback (``Faults.error_feedback``).
* ``rotated_quantization(bits)``: stochastic k-level quantization after a random
  rotation, pi_srk of Suresh, Yu, Kumar and McMahan, "Distributed Mean Estimation with
  Limited Communication", ICML 2017, Sec. 4. The update is zero-padded to d = 2^m,
  rotated, z = H D v (D a random +-1 diagonal, H the normalized Walsh-Hadamard matrix,
  so H D is orthogonal), and each z_j is rounded stochastically to one of the
  k = 2^bits levels evenly spaced between min_j z_j and max_j z_j, unbiasedly (Sec. 2.2,
  pi_sk). The server decodes the levels and applies the inverse rotation D H. The
  rotation spreads a vector's energy over all coordinates, so (z_max - z_min)^2 is about
  (log d / d) ||v||^2 instead of up to ||v||^2: the error drops from O(d / k^2) ||v||^2
  (pi_sk, Theorem 2) to O(log d / k^2) ||v||^2 (Theorem 3). D comes from randomness
  the server shares (here: the round's compression key and the client's cohort slot), so
  it is not sent. Payload: ``bits`` per coordinate of the padded length plus the two
  float32 z_min and z_max, bits d + 64.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

COMPRESSIONS = ("none", "qsgd", "top_k", "rotated_quantization")


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


def next_power_of_two(d: int) -> int:
    return 1 << max(0, (d - 1).bit_length())


def hadamard(v: jax.Array) -> jax.Array:
    """H v for ONE vector of length d = 2^m: the normalized Walsh-Hadamard transform
    (Sylvester order, H = H_2 (x) ... (x) H_2 / sqrt(d), symmetric and orthogonal, so
    H^-1 = H), by the fast butterfly in O(d log d): m passes, each adding and
    subtracting the two halves of every block of 2h coordinates."""
    d = v.shape[-1]
    if d & (d - 1):
        raise ValueError(f"hadamard: length must be a power of two, got {d}")
    h = 1
    while h < d:
        blocks = v.reshape(d // (2 * h), 2, h)
        top, bottom = blocks[:, 0], blocks[:, 1]
        v = jnp.stack([top + bottom, top - bottom], axis=1).reshape(d)
        h *= 2
    return v * jnp.asarray(1.0 / math.sqrt(d), v.dtype)


def rotation_signs(key: jax.Array, d: int, dtype=jnp.float32) -> jax.Array:
    """The diagonal of D: d independent uniform signs +-1."""
    return jnp.where(jax.random.bernoulli(key, 0.5, (d,)), 1.0, -1.0).astype(dtype)


def rotate(v: jax.Array, signs: jax.Array) -> jax.Array:
    """z = H D v (v of the padded length)."""
    return hadamard(signs * v)


def unrotate(z: jax.Array, signs: jax.Array) -> jax.Array:
    """v = (H D)^T z = D H z, the inverse of :func:`rotate`."""
    return signs * hadamard(z)


def stochastic_levels(z: jax.Array, uniforms: jax.Array, bits: int) -> jax.Array:
    """pi_sk: each z_j rounded to one of the 2^bits levels evenly spaced in
    [min z, max z], up with probability equal to its distance from the level below
    (``uniforms`` in [0, 1), one per coordinate), so E[decoded] = z. Returns the decoded
    values (a constant vector is sent exactly)."""
    low, high = jnp.min(z), jnp.max(z)
    steps = float(2 ** bits - 1)
    width = high - low
    scaled = jnp.clip((z - low) / jnp.where(width > 0, width, 1.0) * steps, 0.0, steps)
    below = jnp.floor(scaled)
    level = jnp.minimum(below + (uniforms < scaled - below).astype(z.dtype), steps)
    return jnp.where(width > 0, low + level * (width / steps), z)


def rotated_quantization(bits: int) -> Compressor:
    """pi_srk (Suresh et al., ICML 2017, Sec. 4) with 2^bits levels, ``1 <= bits <= 16``."""
    if not (isinstance(bits, int) and 1 <= bits <= 16):
        raise ValueError(f"rotated_quantization: bits must be an integer in [1, 16], got "
                         f"bits={bits!r}")

    def one(v, key):
        D = v.shape[0]
        d = next_power_of_two(D)
        sign_key, noise_key = jax.random.split(key)     # shared rotation, private noise
        signs = rotation_signs(sign_key, d, v.dtype)
        z = rotate(jnp.pad(v, (0, d - D)), signs)
        decoded = stochastic_levels(z, jax.random.uniform(noise_key, (d,), v.dtype), bits)
        return unrotate(decoded, signs)[:D], jnp.asarray(bits * d + 64.0, jnp.float32)

    return _per_client_flat(one)
