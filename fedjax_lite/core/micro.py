"""Cohorts larger than device memory: micro-cohorts and a running sum.

With ``EngineOptions.micro_cohort = M`` a FedAvg-family round never holds the [C, params]
stack of client updates (nor an FCF round the [C, N, k] stack of its sparse item-row
updates: ``core.sparse.sparse_mean`` and ``privacy.sparse_dp`` are reductions too). The cohort is cut into ceil(C / M) micro-cohorts of at most M
clients (sorted by example count first when ``group_by_size``, so a micro-cohort's chunks
skip the same padded steps as before); a ``lax.scan`` trains one micro-cohort at a time
(:func:`~fedjax_lite.core.round.map_cohort`: chunks, devices, backends as usual) and adds
its contribution to a running sum. That is exact -- equal to the one-shot round up to
float reassociation of the sum -- for every aggregator that is a sum over clients
followed by a finalization (:class:`~fedjax_lite.core.aggregators.Reduction`):

    mean          sum_k w_k Delta_k,  sum_k w_k                    -> divide
    norm_bound    sum_k w_k clip(Delta_k) (per-client clip), sum_k w_k, counts -> divide
    dp_gaussian   sum_k clip(Delta_k, S_t), counts (adaptive: unclipped count)
                                                                   -> noise once, / m
    dp_ftrl       sum_k clip(Delta_k, S), counts                   -> tree noise, / m

The noise of the DP mechanisms is drawn once, in the finalization, from the same key as
in the one-shot round, so it is the same noise. Aggregators that need every update at
once (median, trimmed mean, Krum, Multi-Krum, the geometric median) and secure
aggregation (its pairwise masks, dropout recovery and stochastic rounding span the whole
cohort) have no such form and are refused.

Faults: dropout (drawn for the whole cohort up front, as in the one-shot round) and the
per-client update attacks ``sign_flip`` / ``scale`` work; ``label_flip`` is done on the
host anyway. The ``gaussian`` attack (its noise is drawn for the whole [C, ...] stack),
uplink compression (per-slot keys split for the whole cohort) and error feedback (its
residuals are scattered for the whole cohort) are refused.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_lite.core.aggregators import Aggregator
from fedjax_lite.core.faults import Faults, attackers_of, corrupt_updates, report_weights
from fedjax_lite.core.round import Cohort, EngineOptions, map_cohort

MICRO_ATTACKS = (None, "sign_flip", "scale", "label_flip")


def micro_cohort_problem(aggregator: Aggregator | None = None,
                         faults: Faults = Faults()) -> str | None:
    """Why a round with this aggregator and fault model cannot run in micro-cohorts
    (None if it can)."""
    if aggregator is not None and aggregator.reduction is None:
        return ("the aggregator needs every client's update at once (it is not a sum over "
                "clients followed by a finalization)")
    if faults.attack not in MICRO_ATTACKS:
        return (f"the {faults.attack!r} attack draws its noise for the whole cohort's "
                f"update stack")
    if faults.compressor is not None or faults.error_feedback:
        return ("uplink compression and error feedback draw per-slot keys and scatter "
                "residuals for the whole cohort")
    return None


def check_micro_cohort(options: EngineOptions, aggregator: Aggregator | None = None,
                       faults: Faults = Faults(), *, algorithm: str) -> None:
    """ValueError naming ``engine.micro_cohort`` when it is set and ``algorithm`` (with
    this aggregator and faults) cannot honour it; ``aggregator=None``: the algorithm has
    no micro-cohort path at all."""
    if options.micro_cohort is None:
        return
    if not (isinstance(options.micro_cohort, int) and options.micro_cohort >= 1):
        raise ValueError(f"engine.micro_cohort must be None or an integer >= 1, got "
                         f"{options.micro_cohort!r}")
    if aggregator is None:
        raise ValueError(f"engine.micro_cohort: {algorithm} does not run in micro-cohorts "
                         f"(only the FedAvg family -- fedavg, fedavgm, fedadam, fedyogi, "
                         f"fedadagrad, fedprox, fedsgd -- and fcf do); leave it null")
    problem = micro_cohort_problem(aggregator, faults)
    if problem is not None:
        raise ValueError(f"engine.micro_cohort: {algorithm}: {problem}; leave it null")


def map_reduce_cohort(chunk_fn: Callable, reduce_fn: Callable, cohort: Cohort,
                      per_client: tuple, options: EngineOptions, reduce_inputs: tuple = ()):
    """:func:`map_cohort` and a reduction, ``options.micro_cohort`` clients at a time.

    For each micro-cohort (M slots, the last padded with slots that train nothing),
    ``reduce_fn(outputs, valid, *reduce_inputs)`` gets ``chunk_fn``'s outputs (leading
    axis M), ``valid`` bool[M] (False for padding slots: they must add nothing) and the
    matching rows of ``reduce_inputs`` (pytrees with leading axis C), and returns
    ``(sums, kept)``: ``sums`` is added over micro-cohorts, ``kept`` (leading axis M:
    small per-client values, e.g. loss statistics) is stacked.

    Returns (sums over the cohort, kept with leading axis C in cohort order).
    """
    C = cohort.index.shape[0]
    groups = -(-C // options.micro_cohort)
    M = -(-C // groups)                       # the least padding for this many groups
    padded = groups * M
    inner = options._replace(micro_cohort=None)
    fields = (cohort.index, cohort.data_rows, cohort.n, cohort.mask, per_client,
              reduce_inputs)
    order = None
    if options.group_by_size and groups > 1:
        order = jnp.argsort(-jnp.where(cohort.mask, cohort.n, -1), stable=True)
        fields = jax.tree.map(lambda a: a[order], fields)

    def split(a):   # pad with copies of row 0 (masked out below), then [groups, M, ...]
        a = jnp.concatenate([a, jnp.repeat(a[:1], padded - C, axis=0)])
        return a.reshape(groups, M, *a.shape[1:])

    index, rows, n, mask, per_client, reduce_inputs = jax.tree.map(split, fields)
    valid = (jnp.arange(padded) < C).reshape(groups, M)
    xs = (index, rows, n, mask, valid, per_client, reduce_inputs)

    def one(x):
        index, rows, n, mask, valid, per_client, reduce_inputs = x
        sub = Cohort(cohort.population, index, jnp.where(valid, n, 0), mask & valid,
                     None if cohort.rows is None else rows, cohort.size)
        return reduce_fn(map_cohort(chunk_fn, sub, per_client, inner), valid,
                         *reduce_inputs)

    sums_like, _ = jax.eval_shape(one, jax.tree.map(lambda a: a[0], xs))

    def body(total, x):
        sums, kept = one(x)
        return jax.tree.map(jnp.add, total, sums), kept

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_like)
    sums, kept = lax.scan(body, zeros, xs)
    kept = jax.tree.map(lambda k: k.reshape(padded, *k.shape[2:])[:C], kept)
    if order is not None:
        kept = jax.tree.map(lambda k: k[jnp.argsort(order)], kept)
    return sums, kept


def micro_uplink_aggregate(chunk_fn: Callable, cohort: Cohort, per_client: tuple,
                           weights: jax.Array, agg_state, key: jax.Array, *,
                           aggregator: Aggregator, faults: Faults, options: EngineOptions):
    """The FedAvg family's ``map_cohort`` -> ``faults.uplink`` -> ``aggregator.apply``,
    a micro-cohort at a time. ``chunk_fn`` returns (updates, per-client stats); ``key``
    is the round's aggregation key (the one ``uplink`` and ``apply`` get).

    Returns (delta, weights after dropout, agg_state, stats [C], metrics): the same as
    the one-shot path to float tolerance (metrics included).
    """
    problem = micro_cohort_problem(aggregator, faults)
    if problem is not None:
        raise ValueError(f"engine.micro_cohort: {problem}")
    bad, metrics = attackers_of(faults, cohort.index)
    weights, reporting = report_weights(faults, weights, key)
    metrics.update(reporting)
    reduction = aggregator.reduction

    def reduce_fn(outputs, valid, w, *bad):
        updates, stats = outputs
        updates = corrupt_updates(faults, updates, bad[0] if bad else None, key)
        return reduction.partial(updates, jnp.where(valid, w, 0.0), agg_state), stats

    inputs = (weights,) if bad is None else (weights, bad)
    sums, stats = map_reduce_cohort(chunk_fn, reduce_fn, cohort, per_client, options,
                                    inputs)
    delta, agg_state, agg_metrics = reduction.finalize(sums, agg_state, key)
    return delta, weights, agg_state, stats, {**metrics, **agg_metrics}


__all__ = ["MICRO_ATTACKS", "check_micro_cohort", "map_reduce_cohort",
           "micro_cohort_problem", "micro_uplink_aggregate"]
