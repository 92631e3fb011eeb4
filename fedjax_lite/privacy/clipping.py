"""L2 clipping that bounds EVERY input, whatever it holds.

The sensitivity argument of every DP mechanism here rests on one fact: each client's
contribution to the sum has L2 norm at most S. A naive ``x * min(1, S / ||x||)`` breaks it
twice: a NaN or inf anywhere makes the factor NaN (the sum, the model and the run become
NaN, and the halt singles that client out), and a huge finite vector overflows
``sum(x**2)`` to inf so the factor is 0 (the client is silently dropped instead of
clipped). Here:

* a row with any non-finite entry contributes the zero vector (norm 0 <= S; the
  replacement depends on nothing but the fact that the row was non-finite, which the
  mechanism never releases);
* norms are computed as ``max|x| * ||x / max|x|||``, which cannot overflow, and a row is
  scaled by ``S / ||x||`` in that factored form, so a vector of 1e38s is clipped to norm
  S, not zeroed;
* rows outside ``mask`` (non-reporting clients, padding slots) contribute zero.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lite.core.aggregators import flatten_updates


class Clipped(NamedTuple):
    rows: jax.Array       # float[C, D]: each row's L2 norm <= S (zero outside mask)
    clipped: jax.Array    # bool[C]: a reporting row whose norm exceeded S
    nonfinite: jax.Array  # bool[C]: a reporting row with a NaN/inf entry (sent as zero)
    norms: jax.Array      # float[C]: L2 norms of the (finite) rows; 0 for the others


def clip_rows(flat: jax.Array, mask: jax.Array, clip_norm) -> Clipped:
    """Clips each row of ``flat`` [C, D] to L2 norm ``clip_norm`` (a float or a traced
    scalar > 0), robustly (see the module docstring)."""
    flat = jnp.asarray(flat)
    dtype = flat.dtype
    mask = jnp.asarray(mask, bool)
    finite = jnp.all(jnp.isfinite(flat), axis=1)
    keep = mask & finite
    x = jnp.where(keep[:, None], flat, jnp.zeros((), dtype))
    amax = jnp.max(jnp.abs(x), axis=1)
    # Divide by 2^e ~ max|x| (exactly, in two power-of-two factors that are normal
    # floats: XLA may turn x / amax into x * (1 / amax), and 1 / 1e38 flushes to 0).
    _, e = jnp.frexp(jnp.where(amax > 0, amax, jnp.ones((), dtype)))
    half = e // 2
    unit = x * _pow2(-half, dtype)[:, None] * _pow2(half - e, dtype)[:, None]  # |.| <= 1
    r = jnp.sqrt(jnp.sum(jnp.square(unit), axis=1))       # ||x|| = 2^e r, no overflow
    s = jnp.asarray(clip_norm, dtype)
    norm = r * _pow2(half, dtype) * _pow2(e - half, dtype)   # inf if > float max: fine
    over = keep & (amax > 0) & (norm > s)                 # ||x|| > S
    rows = jnp.where(over[:, None], unit * (s / jnp.where(over, r, 1.0))[:, None], x)
    norms = jnp.where(keep & (amax > 0), norm, 0.0)
    return Clipped(rows, over, mask & ~finite, norms)


def clip_metrics(clipped: Clipped, m: jax.Array) -> dict:
    """Round metrics of a clip over ``m`` reporting clients: ``clipped_fraction`` and
    ``nonfinite_clients`` (both NOT private: diagnostics), ``num_reporting``,
    ``no_client_reported``."""
    return clip_count_metrics(jnp.sum(clipped.clipped), jnp.sum(clipped.nonfinite), m)


def clip_count_metrics(num_clipped: jax.Array, num_nonfinite: jax.Array,
                       m: jax.Array) -> dict:
    """:func:`clip_metrics` from the counts (int) of clipped and non-finite rows."""
    m_f = m.astype(jnp.float32)
    return {"clipped_fraction": num_clipped.astype(jnp.float32) / jnp.maximum(m_f, 1.0),
            "nonfinite_clients": num_nonfinite.astype(jnp.float32),
            "num_reporting": m_f,
            "no_client_reported": (m == 0).astype(jnp.float32)}


def clipped_sums(deltas, weights: jax.Array, clip_norm) -> dict:
    """The additive part of a clip-and-sum mechanism over a group of clients: ``sum``
    (pytree shaped like one update: sum_k clip(Delta_k, S) over reporting clients),
    ``m`` (reporting clients), ``clipped``, ``nonfinite`` and ``unclipped`` (reporting
    clients with norm <= S) counts, all int32. Sums of disjoint groups add
    (``Reduction.partial`` of the DP aggregators)."""
    flat, mask, m, unravel = flatten_updates(deltas, weights)
    clipped = clip_rows(flat, mask, clip_norm)
    count = lambda b: jnp.sum(b, dtype=jnp.int32)
    return {"sum": unravel(jnp.sum(clipped.rows, axis=0)), "m": m,
            "clipped": count(clipped.clipped), "nonfinite": count(clipped.nonfinite),
            "unclipped": count(mask & ~clipped.clipped)}


def clipped_sums_metrics(sums: dict) -> dict:
    """:func:`clip_metrics` of :func:`clipped_sums`."""
    return clip_count_metrics(sums["clipped"], sums["nonfinite"], sums["m"])


def _pow2(k: jax.Array, dtype) -> jax.Array:
    """2.0 ** k exactly, for integer k with a normal float result (|k| <= 126)."""
    bits = jnp.left_shift((k + 127).astype(jnp.int32), 23)
    return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)


__all__ = ["Clipped", "clip_count_metrics", "clip_metrics", "clip_rows", "clipped_sums",
           "clipped_sums_metrics"]
