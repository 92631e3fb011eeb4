"""DP-FTRL: differentially private follow-the-regularized-leader with tree aggregation.

Paper: Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep)
Learning without Sampling or Shuffling", ICML 2021 (tree aggregation of Dwork et al. 2010
and Chan, Shi, Song 2011 for the noisy prefix sums; Appendix D for several
participations).

Mechanism. Round t = 1..T of a tree contributes the leaf g_t = sum_k clip(Delta_k, S), the
sum of the reporting clients' whole updates clipped to L2 norm S by
:func:`fedjax_lite.privacy.clipping.clip_rows`. Over the leaves sits the binary tree whose
level-h nodes sum the leaves ((j - 1) 2^h, j 2^h]; every node gets its own independent
noise N(0, (z S)^2 I), drawn once, when its last leaf arrives. The noisy prefix sum

    P_t = sum_{s <= t} g_s + n_t,   n_t = sum of the noises of the nodes of the binary
                                     decomposition of t (one node per set bit of t),

is released, and the aggregator returns its increment

    delta_t = (P_t - P_{t-1}) / m,    m = ``expected_clients`` (fixed), P_0 = 0.

A server SGD step with learning rate eta on the pseudo-gradient -delta_t therefore gives
x_t = x_0 + eta P_t / m, exactly FTRL's iterate with the linearized losses (the updates are
negative pseudo-gradients, so this is x_0 - eta (sum of noisy gradients) / m). Whatever
the server optimizer, the model is a post-processing of the released prefix sums.

The node at level h that appears in the decomposition of t is the level-h node completed
last, so the state keeps, per level, the noise of that node (H = floor(log2(T)) + 1
levels), plus n_{t-1}: memory O(H D). Each round draws ONE fresh node noise, for the level
ctz(t) of the node completing at t; the nodes completing together below it never enter any
prefix decomposition, so not drawing them changes nothing released. After
``restart_every`` rounds the tree restarts: the next round is t = 1 of a fresh tree with
P_0 = 0 (the model carries the earlier trees' noise, it is not refreshed).

Neighbouring relation, sensitivity, sampling: no sampling or shuffling is assumed; the
clients of each round may be chosen arbitrarily (even adversarially). Neighbouring data
sets differ in one client's data replaced by a special "zero" record whose clipped update
is the zero vector ("zero-out"), so one participation moves one leaf by at most S. If each
client contributes at most once per tree, every tree node sum moves by at most S at each
of the tree's ``tree_depth(T)`` levels: the noisy tree is a Gaussian mechanism with L2
sensitivity S sqrt(depth) and noise z S per node (dp-accounting's
``SingleEpochTreeAggregationDpEvent(z, T)``). With up to k participations per tree, use
:func:`tree_sensitivity_factor`. With replace-one neighbours the sensitivity doubles.
Client weights only say who reported.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_lite.core.aggregators import Aggregator, Reduction, reduced
from fedjax_lite.privacy.clipping import clipped_sums, clipped_sums_metrics
# the round's node noise is drawn from the same key stream as the Gaussian mechanism's
from fedjax_lite.privacy.gaussian import DP_NOISE_STREAM


class TreeState(NamedTuple):
    round_in_tree: jax.Array   # int32[]: rounds already aggregated in the current tree
    node_noise: jax.Array      # float[H, D]: noise of the last completed node per level
    prev_noise: jax.Array      # float[D]: n_{t-1}, the noise in the previous prefix sum


def tree_depth(steps: int) -> int:
    """ceil(log2(steps + 1)) = floor(log2(steps)) + 1: the number of levels of a tree with
    ``steps`` leaves (what dp-accounting's SingleEpochTreeAggregationDpEvent uses)."""
    if int(steps) != steps or steps < 0:
        raise ValueError(f"tree_depth: steps must be an integer >= 0, got steps={steps!r}")
    return int(steps).bit_length()


def tree_sensitivity_factor(max_participations: int, steps: int) -> float:
    """Upper bound, in units of S, on the L2 sensitivity of the vector of all tree nodes of
    one tree with ``steps`` leaves when one client contributes (norm <= S each) to at most
    k = ``max_participations`` distinct leaves.

    At level h (nodes of 2^h leaves) the client's leaves fall into nodes with counts
    m_j <= min(k, 2^h) and sum_j m_j <= k, so sum_j m_j^2 <= k min(k, 2^h); summing over
    the levels h = 0..depth-1 gives sqrt(sum_h k min(k, 2^h)). For k = 1 this is
    sqrt(tree_depth(steps)). The true noise multiplier of the tree is then
    z / tree_sensitivity_factor(k, steps).
    """
    k = max_participations
    if int(k) != k or k < 1:
        raise ValueError(f"tree_sensitivity_factor: max_participations must be an integer "
                         f">= 1, got max_participations={max_participations!r}")
    depth = tree_depth(steps)
    if k > steps:
        raise ValueError(f"tree_sensitivity_factor: max_participations={k} exceeds the "
                         f"number of leaves steps={steps} (at most one participation per "
                         "leaf)")
    return math.sqrt(sum(k * min(k, 2 ** h) for h in range(depth)))


def _check(name: str, value: float, allow_zero: bool) -> float:
    v = float(value)
    if not (math.isfinite(v) and (v >= 0 if allow_zero else v > 0)):
        raise ValueError(f"dp_ftrl: {name} must be finite and {'>=' if allow_zero else '>'}"
                         f" 0, got {name}={value!r}")
    return v


def dp_ftrl(clip_norm: float, noise_multiplier: float, expected_clients: float, *,
            restart_every: int) -> Aggregator:
    """DP-FTRL's tree-aggregated noisy prefix sums (see the module docstring).

    Args:
      clip_norm: S, the L2 bound on each client's whole update.
      noise_multiplier: z, noise std z S on every tree node (the privacy of a tree follows
        from z, ``tree_depth(restart_every)`` and the participations per tree).
      expected_clients: m, the fixed denominator.
      restart_every: T, the leaves per tree; round T + 1 starts a fresh tree.

    Returns an Aggregator whose ``apply`` returns (P_t - P_{t-1}) / m. ``agg_state`` is a
    ``TreeState``. Metrics (float32 scalars): ``clip_norm``, ``tree_round`` (t),
    ``noise_std`` (per coordinate, of n_t / m, the noise in the released prefix average:
    z S sqrt(popcount(t)) / m), ``clipped_fraction`` and ``nonfinite_clients`` (exact,
    NOT private: diagnostics), ``num_reporting``, ``no_client_reported``.
    """
    S = _check("clip_norm", clip_norm, False)
    z = _check("noise_multiplier", noise_multiplier, True)
    denom = _check("expected_clients", expected_clients, False)
    if int(restart_every) != restart_every or restart_every < 1:
        raise ValueError(f"dp_ftrl: restart_every must be an integer >= 1, got "
                         f"restart_every={restart_every!r}")
    T = int(restart_every)
    H = tree_depth(T)
    # popcount(t) for t = 0..T, tabulated (for the noise_std metric)
    popcount = jnp.asarray([bin(t).count("1") for t in range(T + 1)], jnp.float32)

    def init(params_like):
        flat, _ = ravel_pytree(params_like)
        return TreeState(jnp.zeros((), jnp.int32), jnp.zeros((H,) + flat.shape, flat.dtype),
                         jnp.zeros(flat.shape, flat.dtype))

    def partial(deltas, weights, state):
        del state
        return clipped_sums(deltas, weights, S)

    def finalize(sums, state, key):
        leaf, unravel = ravel_pytree(sums["sum"])                 # g_t
        dtype = leaf.dtype

        fresh_tree = state.round_in_tree >= T
        t = jnp.where(fresh_tree, 1, state.round_in_tree + 1)     # 1..T
        prev = jnp.where(fresh_tree, jnp.zeros((), dtype), state.prev_noise)
        nodes = jnp.where(fresh_tree, jnp.zeros((), dtype), state.node_noise)

        levels = jnp.arange(H, dtype=jnp.int32)
        # the node completing at t at level h exists iff 2^h divides t; the one kept is the
        # highest, c = ctz(t) (divisibility by 2^h is monotone in h)
        divides = (t % jnp.left_shift(1, levels)) == 0
        c = jnp.sum(divides.astype(jnp.int32)) - 1
        fresh = jax.random.normal(jax.random.fold_in(key, DP_NOISE_STREAM), leaf.shape,
                                  dtype) * (z * S)
        nodes = jnp.where((levels == c)[:, None], fresh[None, :], nodes)
        bits = (jnp.right_shift(t, levels) & 1).astype(dtype)     # binary digits of t
        noise = bits @ nodes                                      # n_t
        out = (leaf + (noise - prev)) / denom

        metrics = {
            "clip_norm": jnp.asarray(S, jnp.float32),
            "tree_round": t.astype(jnp.float32),
            "noise_std": (z * S / denom) * jnp.sqrt(popcount[t]),
            **clipped_sums_metrics(sums),
        }
        return unravel(out), TreeState(t.astype(jnp.int32), nodes, noise), metrics

    return reduced(init, Reduction(partial, finalize), private=True)


__all__ = ["TreeState", "dp_ftrl", "tree_depth",
           "tree_sensitivity_factor"]
