"""Fixed-point encoding for secure aggregation: clip, scale, unbiased stochastic rounding.

A value x is clipped to [-c, c] and mapped to the real number

    t = (x + c) / (2c) * L,        L = 2^bits - 1,   0 <= t <= L,

which is rounded to floor(t) + 1 with probability frac(t) and to floor(t) otherwise, so
E[enc(x)] = t exactly. Decoding maps an integer q back to q * 2c / L - c.

Why the arithmetic is careful. Computing t in float32 keeps 24 significant bits: for
t >= 2^23 (half the grid at bits = 24) frac(t) is rounded away and the "stochastic"
rounding becomes round-to-nearest, biased by up to half a step; at 20 bits the fraction
keeps only 3-4 bits. JAX runs with x64 off, so instead of float64 we carry the extra
precision in error-free transformations (Knuth's TwoSum, Dekker's TwoProduct, see
Ogita, Rump, Oishi, "Accurate Sum and Dot Product", SIAM J. Sci. Comput. 2005) with the
constant K = L / (2c) split into float32 parts K_hi + K_lo: t = (x + c) K is recovered
as floor + fraction with an absolute error of about 2^-23 at bits = 24 (less for fewer
bits), and the rounding compares the fraction with 32 random bits, not a float32
uniform (which has only 23).

Inputs are clipped whatever they hold: NaN encodes as 0.0 (the midpoint t = L/2), +-inf
and huge values as +-c.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS = 2
# t and floor(t) must be exact float32 integers, and the decoded quotient too: 24 bits.
MAX_BITS = 24
# K = L / (2c) and its parts must stay normal float32 numbers, far from overflow.
MIN_CLIP, MAX_CLIP = 2.0 ** -60, 2.0 ** 60


def _ceil_log2(n: int) -> int:
    return (int(n) - 1).bit_length()       # exact integer ceil(log2 n) for n >= 1


def modulus_bits(bits: int, cohort_size: int) -> int:
    """r = bits + max(1, ceil(log2 C)): the sum of C encodings, each <= 2^bits - 1, is
    < 2^r, so the modular sum mod 2^r never wraps."""
    return int(bits) + max(1, _ceil_log2(cohort_size))


def check_bits(bits: int, cohort_size: int) -> None:
    """Raises ValueError (one line, naming ``aggregator.bits``) unless ``bits`` is an
    integer in [MIN_BITS, MAX_BITS] and the modulus r = ``modulus_bits(bits, C)`` fits in
    the uint32 arithmetic (r <= 32) for a cohort of ``cohort_size`` slots."""
    if not (isinstance(cohort_size, (int, np.integer)) and cohort_size >= 1):
        raise ValueError(f"secure aggregation: cohort size must be an integer >= 1, got "
                         f"{cohort_size!r}")
    if not (isinstance(bits, (int, np.integer)) and not isinstance(bits, bool)
            and MIN_BITS <= bits <= MAX_BITS):
        raise ValueError(f"aggregator.bits must be an integer in [{MIN_BITS}, {MAX_BITS}], "
                         f"got {bits!r}")
    r = modulus_bits(bits, cohort_size)
    if r > 32:
        largest = min(MAX_BITS, 32 - max(1, _ceil_log2(cohort_size)))
        hint = (f"use aggregator.bits <= {largest}" if largest >= MIN_BITS
                else "no aggregator.bits fits; use a smaller cohort")
        raise ValueError(
            f"aggregator.bits={bits} with a cohort of {cohort_size} clients needs a {r}-bit "
            f"modulus (bits + ceil(log2 {cohort_size})) but sums are computed mod 2^32: "
            f"{hint}")


def check_clip(name: str, value: float) -> float:
    """``value`` as the float32 number actually used, after checking it is in range."""
    if not (isinstance(value, (int, float, np.floating)) and math.isfinite(value)
            and MIN_CLIP <= value <= MAX_CLIP):
        raise ValueError(f"{name} must be a finite number in [2^-60, 2^60], got {value!r}")
    return float(np.float32(value))


def modulus_mask(r: int) -> jax.Array:
    """x & modulus_mask(r) == x mod 2^r for uint32 x."""
    return jnp.uint32((1 << r) - 1 if r < 32 else 0xFFFFFFFF)


def _two_sum(a, b):
    """a + b = s + e exactly (Knuth), for float32 arrays without overflow."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a):
    """a = hi + lo with each part holding <= 12 significant bits. The split masks the
    bit pattern (no Veltkamp multiply, so compiler FMA contraction cannot break it)."""
    hi = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0xFFFFF000), jnp.float32)
    return hi, a - hi


def _two_prod(a, b):
    """a * b = p + e exactly (Dekker), barring underflow (errors below 2^-126)."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _constant_parts(clip_value: float, bits: int) -> tuple[float, float, float, int]:
    c = float(np.float32(clip_value))
    levels = 2 ** bits - 1
    k = levels / (2.0 * c)                   # float64 on the host
    k_hi = float(np.float32(k))
    k_lo = float(np.float32(k - k_hi))
    return c, k_hi, k_lo, levels


def clip_values(flat: jax.Array, clip_value: float) -> jax.Array:
    """float32: x clipped to [-c, c]; NaN -> 0, +-inf -> +-c."""
    c = jnp.float32(np.float32(clip_value))
    x = jnp.asarray(flat).astype(jnp.float32)
    return jnp.where(jnp.isnan(x), jnp.float32(0), jnp.clip(x, -c, c))


def scaled_parts(flat: jax.Array, clip_value: float,
                 bits: int) -> tuple[jax.Array, jax.Array]:
    """(low int32, frac float32) with low + frac = (clip(x) + c) / (2c) (2^bits - 1) to
    about 2^-23 absolute, 0 <= frac < 1, so floor(t) and frac(t) both come out right."""
    c, k_hi, k_lo, _ = _constant_parts(clip_value, bits)
    x = clip_values(flat, clip_value)
    s, e = _two_sum(x, jnp.float32(c))                    # x + c = s + e, 0 <= s <= 2c
    p, pe = _two_prod(s, jnp.float32(k_hi))               # s K_hi = p + pe
    whole = jnp.floor(p)
    g, ge = _two_sum(p - whole, pe)                       # p - whole is exact
    rest = ge + (s * jnp.float32(k_lo) + e * jnp.float32(k_hi))   # e K_lo ~ 2^-48 t
    h, he = _two_sum(g, rest)
    n = jnp.floor(h)
    frac = (h - n) + he
    n = n + jnp.where(frac < 0, -1.0, 0.0) + jnp.where(frac >= 1, 1.0, 0.0)
    frac = frac + jnp.where(frac < 0, 1.0, 0.0) - jnp.where(frac >= 1, 1.0, 0.0)
    frac = jnp.clip(frac, 0.0, np.float32(1.0 - 2.0 ** -24))
    return whole.astype(jnp.int32) + n.astype(jnp.int32), frac


def encode(flat: jax.Array, key: jax.Array, clip_value: float, bits: int) -> jax.Array:
    """uint32, same shape as ``flat``: clip each entry to [-c, c] (NaN -> 0, +-inf ->
    +-c) and round (x + c) / (2c) (2^bits - 1) stochastically and without bias to one of
    its two neighbouring integers in [0, 2^bits - 1] (see the module docstring)."""
    low, frac = scaled_parts(flat, clip_value, bits)
    levels = 2 ** bits - 1
    # P(up) = floor(frac 2^32) / 2^32: frac * 2^32 is exact and < 2^32.
    threshold = (frac * jnp.float32(2.0 ** 32)).astype(jnp.uint32)
    up = jax.random.bits(key, low.shape, jnp.uint32) < threshold
    return jnp.clip(low + up.astype(jnp.int32), 0, levels).astype(jnp.uint32)


def decode_mean(total: jax.Array, count: jax.Array, clip_value: float,
                bits: int) -> jax.Array:
    """float32: the mean of ``count`` decoded values whose encodings sum to ``total``
    (uint32, exact): total / count in exact integer quotient and remainder, centred on
    the grid's midpoint before scaling so small values keep their precision."""
    c = float(np.float32(clip_value))
    levels = 2 ** bits - 1
    count = jnp.maximum(jnp.asarray(count), 1).astype(jnp.uint32)
    quot, rem = total // count, total % count                # quot <= levels < 2^24
    centred = (quot.astype(jnp.int32) - (levels - 1) // 2).astype(jnp.float32)
    frac = rem.astype(jnp.float32) / count.astype(jnp.float32) - jnp.float32(0.5)
    return (centred + frac) * jnp.float32(2.0 * c / levels)


__all__ = ["MAX_BITS", "MIN_BITS", "check_bits", "check_clip", "clip_values", "decode_mean",
           "encode", "modulus_bits", "modulus_mask", "scaled_parts"]
