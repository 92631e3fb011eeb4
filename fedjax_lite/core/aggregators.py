"""Aggregators: optax-style (init, apply) pairs over a stacked client axis.

    aggregator.init(params_like) -> agg_state
    aggregator.apply(deltas, weights, agg_state, key) -> (delta, agg_state, metrics)

``deltas`` is a pytree whose leaves have a leading client axis [C, ...]; ``weights`` is
float[C] (example counts, ones, or 0 for clients that did not report). Everything is
traceable, so aggregation compiles into the round.

Builders: ``mean`` (FedAvg) and the robust ``median``, ``trimmed_mean`` (Yin et al. 2018),
``krum``, ``multi_krum`` (Blanchard et al. 2017), ``geometric_median`` (RFA, Pillutla et
al. 2022) and ``norm_bound`` (clip to an L2 ball, then the weighted mean). The privacy
mechanisms (DP-FedAvg's Gaussian mechanism, DP-FTRL, secure aggregation) are aggregators
of the same shape in ``fedjax_lite.privacy``.

Aggregators that are a sum over clients followed by a finalization (``mean``,
``norm_bound``, ``dp_gaussian``, ``dp_ftrl``) carry that form as ``Aggregator.reduction``
(:class:`Reduction`), so a cohort can be aggregated a micro-cohort at a time
(``engine.micro_cohort``, :mod:`fedjax_lite.core.micro`); the others leave it None.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


class Reduction(NamedTuple):
    """An aggregator that is a sum over clients followed by a finalization:

        partial(deltas[M, ...], weights[M], agg_state) -> sums   (a pytree, additive: the
                                                                  sums of two disjoint
                                                                  groups of clients add)
        finalize(sums, agg_state, key) -> (delta, agg_state, metrics)

    so a cohort can be aggregated a micro-cohort at a time (``engine.micro_cohort``,
    :mod:`fedjax_lite.core.micro`). ``apply`` of such an aggregator IS
    ``finalize(partial(all clients))`` (:func:`reduced`), so both agree to float
    reassociation of the sum."""
    partial: Callable[[Any, jax.Array, Any], Any]
    finalize: Callable[[Any, Any, jax.Array], tuple[Any, Any, dict]]


class Aggregator(NamedTuple):
    """``private``: the aggregate is a DP release that must be applied every round, even
    when no client reported (keeping the model then would reveal that the cohort was
    empty -- a fact about client data outside the accounted mechanism).
    ``reduction``: the aggregator's sum-then-finalize form, or None when it needs all
    updates at once (median, Krum, ...)."""
    init: Callable[[Any], Any]
    apply: Callable[[Any, jax.Array, Any, jax.Array], tuple[Any, Any, dict]]
    private: bool = False
    reduction: Reduction | None = None


def reduced(init: Callable[[Any], Any], reduction: Reduction,
            private: bool = False) -> Aggregator:
    """The aggregator whose ``apply`` is ``reduction.finalize(reduction.partial(...))``."""

    def apply(deltas, weights, state, key):
        return reduction.finalize(reduction.partial(deltas, weights, state), state, key)

    return Aggregator(init, apply, private, reduction)


def _no_state(params_like):
    del params_like
    return ()


def weighted_mean(deltas, weights: jax.Array):
    """sum_k w_k delta_k / sum_k w_k over the leading axis; zeros if all weights are 0."""
    total = jnp.sum(weights)
    scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
    return jax.tree.map(
        lambda d: jnp.tensordot(weights.astype(d.dtype), d, axes=1) * scale.astype(d.dtype),
        deltas)


def mean() -> Aggregator:
    """The weighted mean of FedAvg (McMahan et al. 2017, Algorithm 1)."""

    def partial(deltas, weights, state):
        del state
        return (jax.tree.map(lambda d: jnp.tensordot(weights.astype(d.dtype), d, axes=1),
                             deltas), jnp.sum(weights))

    def finalize(sums, state, key):
        del key
        weighted, total = sums                       # as weighted_mean, term for term
        scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
        return jax.tree.map(lambda s: s * scale.astype(s.dtype), weighted), state, {}

    return reduced(_no_state, Reduction(partial, finalize))


# --------------------------------------------------------------------------------------
# Robust aggregators.
#
# Conventions shared by everything below:
#   * a client reports iff weights[k] > 0; non-reporting clients (dropouts) are EXCLUDED,
#     never treated as a zero update, and their (possibly garbage / NaN) deltas are masked
#     with ``where`` so they cannot leak into the result;
#   * the coordinate-wise and distance-based rules are UNWEIGHTED among reporting clients
#     (weights only say who reported); ``geometric_median`` uses the weights as RFA's
#     alphas and ``norm_bound`` is a weighted mean, like ``mean``;
#   * an update is the concatenation of all leaves, flattened (``ravel_pytree``);
#   * m = number of reporting clients is dynamic (traced), C is static; if m == 0 the
#     aggregate is a zero delta (keep the model) and metrics["num_reporting"] == 0.
# --------------------------------------------------------------------------------------


def flatten_updates(deltas, weights):
    """[C, ...] pytree -> (X float[C, D] with non-reporting rows zeroed, mask bool[C], m,
    unravel: float[D] -> pytree of one update)."""
    _, unravel = ravel_pytree(jax.tree.map(lambda d: d[0], deltas))
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])(deltas)
    mask = jnp.asarray(weights) > 0
    flat = jnp.where(mask[:, None], flat, jnp.zeros((), flat.dtype))
    m = jnp.sum(mask.astype(jnp.int32))
    return flat, mask, m, unravel


def reporting_metrics(m) -> dict:
    return {"num_reporting": m.astype(jnp.float32),
            "no_client_reported": (m == 0).astype(jnp.float32)}


def _stateless(apply_fn) -> Aggregator:
    def init(params_like):
        del params_like
        return ()

    def apply(deltas, weights, state, key):
        del key
        delta, metrics = apply_fn(deltas, weights)
        return delta, state, metrics

    return Aggregator(init, apply)


def _sorted_reporting_first(flat, mask):
    """Sort each coordinate over the client axis with reporting clients' values first:
    lexicographic sort on (not reporting, value), so positions [0, m) hold the reporting
    clients' values in ascending order (NaNs, if any client sent them, last among them)."""
    rank = jnp.broadcast_to(jnp.where(mask, 0, 1)[:, None].astype(jnp.int32), flat.shape)
    _, values = jax.lax.sort((rank, flat), dimension=0, num_keys=2)
    return values


def median() -> Aggregator:
    """Coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML 2018, Definition 1 / Algorithm 1 option I):

        g_j = med{ Delta_k,j : k reporting }   for every coordinate j,

    unweighted over the m reporting clients; for even m the mean of the two middle values
    (NumPy's convention). Tolerates fewer than m/2 arbitrary (Byzantine) clients.
    """

    def apply_fn(deltas, weights):
        flat, mask, m, unravel = flatten_updates(deltas, weights)
        values = _sorted_reporting_first(flat, mask)
        lo = jnp.maximum((m - 1) // 2, 0)
        hi = jnp.maximum(m // 2, 0)
        med = 0.5 * (jax.lax.dynamic_index_in_dim(values, lo, 0, keepdims=False)
                     + jax.lax.dynamic_index_in_dim(values, hi, 0, keepdims=False))
        med = jnp.where(m > 0, med, jnp.zeros((), med.dtype))
        return unravel(med), reporting_metrics(m)

    return _stateless(apply_fn)


def trimmed_mean(trim: float) -> Aggregator:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018, Definition 2 / Algorithm 1
    option II): for every coordinate j, with m reporting clients and b = floor(trim * m),

        g_j = 1 / (m - 2b) * sum_{x in U_j} x,

    where U_j are the reporting clients' values of coordinate j with the b largest and the
    b smallest removed. Unweighted over reporting clients; tolerates b Byzantine clients.
    ``trim`` (the paper's beta) must satisfy 0 <= trim < 0.5.
    """
    trim = float(trim)
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trimmed_mean: trim must satisfy 0 <= trim < 0.5, got trim={trim}")

    def apply_fn(deltas, weights):
        flat, mask, m, unravel = flatten_updates(deltas, weights)
        num_clients = flat.shape[0]
        # b(m) tabulated in Python (exact float64 floor, like NumPy) for every possible m.
        b_table = jnp.asarray([math.floor(trim * k) for k in range(num_clients + 1)],
                              jnp.int32)
        b = b_table[m]
        values = _sorted_reporting_first(flat, mask)
        pos = jnp.arange(num_clients)[:, None]
        keep = (pos >= b) & (pos < m - b)
        total = jnp.sum(jnp.where(keep, values, jnp.zeros((), values.dtype)), axis=0)
        count = jnp.maximum(m - 2 * b, 1).astype(values.dtype)
        out = jnp.where(m > 0, total / count, jnp.zeros((), values.dtype))
        metrics = reporting_metrics(m)
        metrics["trimmed_per_side"] = b.astype(jnp.float32)
        return unravel(out), metrics

    return _stateless(apply_fn)


def _krum_scores(flat, mask, m, num_byzantine: int):
    """Krum scores (Blanchard et al. 2017, Sec. 4): s(i) = sum_{i -> j} ||V_i - V_j||^2 over
    the n - f - 2 closest other reporting updates j. Non-reporting clients score +inf.
    n - f - 2 is clamped to >= 1 (and to the m - 1 available neighbours) inside jit."""
    num_clients = flat.shape[0]
    if num_clients - num_byzantine - 2 < 1:
        raise ValueError(
            f"krum needs C > num_byzantine + 2 reporting slots (n - f - 2 >= 1 neighbours): "
            f"got C={num_clients} clients and num_byzantine={num_byzantine}")
    # Exact pairwise squared distances, one row at a time ([C, D] memory, no Gram-matrix
    # cancellation).
    sq = jax.lax.map(lambda v: jnp.sum(jnp.square(flat - v), axis=1), flat)
    idx = jnp.arange(num_clients)
    valid = mask[None, :] & mask[:, None] & (idx[:, None] != idx[None, :])
    sq = jnp.where(valid, sq, jnp.inf)
    nearest = jnp.sort(sq, axis=1)
    num_neighbours = jnp.minimum(jnp.maximum(m - num_byzantine - 2, 1), jnp.maximum(m - 1, 0))
    take = idx[None, :] < num_neighbours
    scores = jnp.sum(jnp.where(take, nearest, jnp.zeros((), nearest.dtype)), axis=1)
    return jnp.where(mask, scores, jnp.inf)


def _check_byzantine(num_byzantine) -> int:
    if int(num_byzantine) != num_byzantine or num_byzantine < 0:
        raise ValueError(f"num_byzantine must be an integer >= 0, got num_byzantine="
                         f"{num_byzantine!r}")
    return int(num_byzantine)


def krum(num_byzantine: int) -> Aggregator:
    """Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", NeurIPS 2017, Sec. 4): with m reporting updates V_1..V_m and f =
    ``num_byzantine``, score each

        s(i) = sum_{i -> j} ||V_i - V_j||^2   (i -> j: the m - f - 2 closest V_j, j != i)

    and return KR(V_1..V_m) = V_{i*}, i* = argmin_i s(i) (ties: lowest index). Unweighted
    over reporting clients. Needs C > f + 2 (checked at trace time); with dropouts m is
    dynamic and m - f - 2 is clamped to at least one neighbour.
    Metrics: ``krum_selected`` (client index on the cohort axis; -1 if none reported).
    """
    num_byzantine = _check_byzantine(num_byzantine)

    def apply_fn(deltas, weights):
        flat, mask, m, unravel = flatten_updates(deltas, weights)
        scores = _krum_scores(flat, mask, m, num_byzantine)
        chosen = jnp.argmin(scores)
        out = jnp.where(m > 0, flat[chosen], jnp.zeros((), flat.dtype))
        metrics = reporting_metrics(m)
        metrics["krum_selected"] = jnp.where(m > 0, chosen, -1).astype(jnp.int32)
        return unravel(out), metrics

    return _stateless(apply_fn)


def multi_krum(num_byzantine: int, num_selected: int) -> Aggregator:
    """Multi-Krum (Blanchard et al., NeurIPS 2017, Sec. 4 "Multi-Krum"): compute the Krum
    scores s(i) (see ``krum``) and return the (unweighted) average of the ``num_selected``
    updates with the lowest scores (ties: lowest index). If fewer than ``num_selected``
    clients reported, all reporting updates are averaged. ``num_selected`` = 1 is Krum,
    ``num_selected`` = n is the plain average.
    Metrics: ``multi_krum_num_selected`` (how many updates were averaged).
    """
    num_byzantine = _check_byzantine(num_byzantine)
    if int(num_selected) != num_selected or num_selected < 1:
        raise ValueError(f"num_selected must be an integer >= 1, got num_selected="
                         f"{num_selected!r}")
    num_selected = int(num_selected)

    def apply_fn(deltas, weights):
        flat, mask, m, unravel = flatten_updates(deltas, weights)
        num_clients = flat.shape[0]
        if num_selected > num_clients:
            raise ValueError(f"multi_krum: num_selected={num_selected} exceeds the number "
                             f"of clients C={num_clients}")
        scores = _krum_scores(flat, mask, m, num_byzantine)
        order = jnp.argsort(scores, stable=True)
        rank = jnp.zeros((num_clients,), jnp.int32).at[order].set(
            jnp.arange(num_clients, dtype=jnp.int32))
        count = jnp.minimum(m, num_selected)
        selected = mask & (rank < count)
        total = jnp.sum(jnp.where(selected[:, None], flat, jnp.zeros((), flat.dtype)), axis=0)
        out = jnp.where(count > 0, total / jnp.maximum(count, 1).astype(flat.dtype),
                        jnp.zeros((), flat.dtype))
        metrics = reporting_metrics(m)
        metrics["multi_krum_num_selected"] = count.astype(jnp.float32)
        return unravel(out), metrics

    return _stateless(apply_fn)


def geometric_median(max_iters: int = 10, eps: float = 1e-5, nu: float = 1e-6) -> Aggregator:
    """Robust Federated Aggregation: the geometric median by the smoothed Weiszfeld
    algorithm (Pillutla, Kakade & Harchaoui, "Robust Aggregation for Federated Learning",
    IEEE TSP 2022, Algorithm 2). With updates w_i and weights alpha_i (the given client
    weights; non-reporting clients have alpha_i = 0), it approximately minimises

        g(z) = sum_i alpha_i ||z - w_i|| / sum_i alpha_i                  (eq. (3), normalised)

    starting from the weighted mean z^(0) and iterating

        beta_i^(t) = alpha_i / max(nu, ||z^(t) - w_i||),
        z^(t+1)    = sum_i beta_i^(t) w_i / sum_i beta_i^(t),

    for at most ``max_iters`` iterations, stopping early once the objective's relative
    change |g(z^(t)) - g(z^(t+1))| < eps * g(z^(t+1)) (the RFA reference code's ftol;
    eps = 0 always runs ``max_iters`` iterations).
    ``nu`` > 0 is the smoothing parameter. Metrics: ``geomed_iterations``,
    ``geomed_objective`` (final g).
    """
    if int(max_iters) != max_iters or max_iters < 1:
        raise ValueError(f"geometric_median: max_iters must be an integer >= 1, got "
                         f"max_iters={max_iters!r}")
    if not eps >= 0:
        raise ValueError(f"geometric_median: eps must be >= 0, got eps={eps!r}")
    if not nu > 0:
        raise ValueError(f"geometric_median: nu must be > 0, got nu={nu!r}")
    max_iters = int(max_iters)

    def apply_fn(deltas, weights):
        flat, mask, m, unravel = flatten_updates(deltas, weights)
        dtype = flat.dtype
        alphas = jnp.where(mask, jnp.asarray(weights).astype(dtype), jnp.zeros((), dtype))
        total = jnp.sum(alphas)
        alphas = alphas / jnp.where(total > 0, total, 1.0)

        def dists(z):
            return jnp.sqrt(jnp.sum(jnp.square(flat - z[None, :]), axis=1))

        def objective(z):
            return jnp.sum(alphas * dists(z))

        def step(z):
            beta = alphas / jnp.maximum(nu, dists(z))
            denom = jnp.sum(beta)
            return (beta @ flat) / jnp.where(denom > 0, denom, 1.0)

        z0 = alphas @ flat
        obj0 = objective(z0)

        def cond(carry):
            it, _, _, done = carry
            return (it < max_iters) & ~done

        def body(carry):
            it, z, obj, _ = carry
            z_new = step(z)
            obj_new = objective(z_new)
            done = jnp.abs(obj - obj_new) < eps * obj_new
            return it + 1, z_new, obj_new, done

        iters, z, obj, _ = jax.lax.while_loop(
            cond, body, (jnp.zeros((), jnp.int32), z0, obj0, m == 0))
        z = jnp.where(m > 0, z, jnp.zeros((), dtype))
        metrics = reporting_metrics(m)
        metrics["geomed_iterations"] = iters
        metrics["geomed_objective"] = jnp.where(m > 0, obj, 0.0).astype(jnp.float32)
        return unravel(z), metrics

    return _stateless(apply_fn)


def _clip_scale(flat: jax.Array, mask: jax.Array, max_norm: float):
    """Per-client factors min(1, max_norm / ||x_k||_2) for rows of ``flat`` [C, D], and
    which reporting clients were clipped."""
    norms = jnp.sqrt(jnp.sum(jnp.square(flat), axis=1))
    clipped = mask & (norms > max_norm)
    return jnp.where(clipped, max_norm / jnp.where(clipped, norms, 1.0), 1.0), clipped


def norm_bound(max_norm: float) -> Aggregator:
    """Norm bounding (Sun et al., "Can You Really Backdoor Federated Learning?", 2019,
    Sec. 4; the clipping step of DP-FedAvg, McAfee et al. 2018): clip every reporting
    client's update, taken over the whole pytree, to L2 norm at most ``max_norm``,

        Delta_k <- Delta_k * min(1, max_norm / ||Delta_k||_2),

    then take the weighted mean sum_k w_k Delta_k / sum_k w_k (weighted, like ``mean``).
    Metrics: ``clipped_fraction`` (fraction of reporting clients that were clipped).
    """
    if not max_norm > 0:
        raise ValueError(f"norm_bound: max_norm must be > 0, got max_norm={max_norm!r}")
    max_norm = float(max_norm)

    def partial(deltas, weights, state):
        del state
        flat, mask, m, unravel = flatten_updates(deltas, weights)
        dtype = flat.dtype
        scale, clipped = _clip_scale(flat, mask, max_norm)
        w = jnp.where(mask, jnp.asarray(weights).astype(dtype), jnp.zeros((), dtype))
        return {"sum": unravel((w * scale.astype(dtype)) @ flat), "weight": jnp.sum(w),
                "m": m, "clipped": jnp.sum(clipped, dtype=jnp.int32)}

    def finalize(sums, state, key):
        del key
        total, m = sums["weight"], sums["m"]
        out = jax.tree.map(lambda s: jnp.where(m > 0, s / jnp.where(total > 0, total, 1.0),
                                               jnp.zeros((), s.dtype)), sums["sum"])
        metrics = reporting_metrics(m)
        metrics["clipped_fraction"] = (sums["clipped"] / jnp.maximum(m, 1)).astype(
            jnp.float32)
        return out, state, metrics

    return reduced(_no_state, Reduction(partial, finalize))
