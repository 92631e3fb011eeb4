"""Sparse per-row aggregation: clients that touch a few rows of a large table.

A recommender's client rates a handful of the I items, so its update to the item table
Q [I, k] is a few rows. It sends them aligned with their row ids, never a dense [I, k]
delta, and the server adds them into the table with a scatter-add (a segment sum), so a
cohort costs O(C * N * k) memory (N = the most rows one client touches), never
O(C * I * k): a cohort of 10 000 users over 100 000 items at k = 64 needs the 10 000 x N
rows and one [100 000, 64] table.

    SparseUpdate(rows={name: [C, N, ...]}, index=int32[C, N], mask=bool[C, N],
                 dense={name: [C, ...]})

``rows`` are per-row deltas of tables with a leading row axis (item factors, item biases),
``index`` their row ids, ``mask`` which of the N slots are real, ``dense`` ordinary
per-client deltas of small parameters (e.g. the global mean). Aggregators here are the
usual ``(init, apply)`` pairs over such updates and return a dense delta pytree
``{**tables, **dense}``.

Normalization of a row's sum (``normalize``): ``raters`` divides row i's weighted sum by
the total weight of the clients that touched row i (each touched row moves by the mean of
its raters' deltas); ``all`` divides every row by the total weight of all reporting
clients (rows few clients touch move little; the estimator FedAvg gives when an untouched
row counts as a zero delta). DP needs ``all`` with a fixed denominator: how many clients
touched an item is itself client data.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lite.core.aggregators import Aggregator, Reduction, reduced, reporting_metrics

NORMALIZATIONS = ("raters", "all")


class SparseUpdate(NamedTuple):
    rows: dict            # name -> [C, N, ...] per-row deltas
    index: jax.Array      # int32[C, N] row ids
    mask: jax.Array       # bool[C, N] real slots
    dense: dict           # name -> [C, ...] per-client deltas of small parameters


def scatter_rows(values: jax.Array, index: jax.Array, weights: jax.Array,
                 num_rows: int) -> jax.Array:
    """sum_c sum_j weights[c, j] values[c, j] into row index[c, j] of a [num_rows, ...]
    table (a segment sum; slots with weight 0 add nothing)."""
    w = weights.reshape(weights.shape + (1,) * (values.ndim - weights.ndim))
    flat = (values * w.astype(values.dtype)).reshape((-1,) + values.shape[2:])
    table = jnp.zeros((num_rows,) + values.shape[2:], values.dtype)
    return table.at[index.reshape(-1)].add(flat, mode="drop")


def weighted_sums(update: SparseUpdate, slot_weights: jax.Array,
                  client_weights: jax.Array, num_rows: int) -> dict:
    """The additive part of a sparse aggregation: ``{'rows': {name: [num_rows, ...]},
    'dense': {name: [...]}}`` -- each table's rows scatter-added with ``slot_weights``
    [C, N], each dense leaf summed over clients with ``client_weights`` [C]."""
    return {"rows": {name: scatter_rows(values, update.index, slot_weights, num_rows)
                     for name, values in update.rows.items()},
            "dense": {name: jnp.tensordot(client_weights.astype(values.dtype), values,
                                          axes=1)
                      for name, values in update.dense.items()}}


def row_weights(index: jax.Array, slot_weights: jax.Array, num_rows: int) -> jax.Array:
    """float[num_rows]: the total weight of the clients that touched each row."""
    return jnp.zeros((num_rows,), slot_weights.dtype).at[index.reshape(-1)].add(
        slot_weights.reshape(-1), mode="drop")


def sparse_mean(num_rows: int, normalize: str = "raters") -> Aggregator:
    """The weighted mean of sparse updates (FedAvg's, per row): row i's delta is
    sum_c w_c d_{c,i} / (sum of w_c over the clients that touched i) with ``raters``, or
    / sum_c w_c with ``all``; dense leaves are the plain weighted mean. A sum over
    clients then a division (a :class:`~fedjax_lite.core.aggregators.Reduction`), so a
    cohort can be aggregated a micro-cohort at a time (``engine.micro_cohort``)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")

    def init(params_like):
        del params_like
        return ()

    def partial(update: SparseUpdate, weights, state):
        del state
        reporting = weights > 0
        slot_w = jnp.where(update.mask & reporting[:, None], weights[:, None], 0.0)
        w = jnp.where(reporting, weights, 0.0)
        return {**weighted_sums(update, slot_w, w, num_rows),
                "row_weight": row_weights(update.index, slot_w, num_rows),
                "total": jnp.sum(w), "count": jnp.sum(reporting.astype(jnp.int32))}

    def finalize(sums, state, key):
        del key
        total = sums["total"]
        denom = sums["row_weight"] if normalize == "raters" else jnp.full((num_rows,), total)
        safe = jnp.where(denom > 0, denom, 1.0)
        out = {name: summed / safe.reshape((-1,) + (1,) * (summed.ndim - 1))
               for name, summed in sums["rows"].items()}
        for name, summed in sums["dense"].items():
            out[name] = summed / jnp.where(total > 0, total, 1.0)
        metrics = reporting_metrics(sums["count"])
        metrics["rows_touched"] = jnp.sum(sums["row_weight"] > 0).astype(jnp.float32)
        return out, state, metrics

    return reduced(init, Reduction(partial, finalize))


def flatten_update(update: SparseUpdate) -> tuple[jax.Array, Any]:
    """float[C, M]: each client's whole update as one vector (masked slots zeroed), for
    clipping; and ``unflatten(float[C, M]) -> SparseUpdate`` with the same index/mask."""
    m = update.mask
    names_r, names_d = sorted(update.rows), sorted(update.dense)
    parts, shapes = [], []
    for name in names_r:
        v = update.rows[name]
        v = jnp.where(m.reshape(m.shape + (1,) * (v.ndim - 2)), v, 0)
        parts.append(v.reshape(v.shape[0], -1)); shapes.append(("r", name, v.shape[1:]))
    for name in names_d:
        v = update.dense[name]
        parts.append(v.reshape(v.shape[0], -1)); shapes.append(("d", name, v.shape[1:]))
    flat = jnp.concatenate(parts, axis=1)

    def unflatten(f):
        rows, dense, at = {}, {}, 0
        for kind, name, shape in shapes:
            size = 1
            for d in shape:
                size *= d
            piece = f[:, at:at + size].reshape((f.shape[0],) + shape)
            (rows if kind == "r" else dense)[name] = piece
            at += size
        return SparseUpdate(rows, update.index, update.mask, dense)

    return flat, unflatten


__all__ = ["NORMALIZATIONS", "SparseUpdate", "flatten_update", "row_weights",
           "scatter_rows", "sparse_mean", "weighted_sums"]
