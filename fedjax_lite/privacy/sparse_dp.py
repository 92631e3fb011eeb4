"""DP-FedAvg's Gaussian mechanism on sparse row updates (user-level DP for recommenders).

Each client sends :class:`fedjax_lite.core.sparse.SparseUpdate`: deltas of the rows of
the tables it touched (e.g. the items a user rated), aligned with their row ids, plus
small dense deltas. The mechanism (McMahan et al., ICLR 2018, as in
:mod:`fedjax_lite.privacy.gaussian`, on the DENSE release):

    clip each client's whole update -- all its rows and dense leaves as one vector -- to
    L2 norm S (:func:`fedjax_lite.privacy.clipping.clip_rows`);
    scatter-add the clipped rows into the full tables [num_rows, ...];
    add N(0, (z S)^2) to EVERY entry of every table and dense leaf;
    divide by the fixed denominator m = ``expected_clients``.

Sensitivity: the released tables are a linear image of the clients' vectors in which a
client's slots land on DISTINCT rows (one rating per (user, item): the ratings loaders
merge duplicates), so one client moves the release by at most S in L2 (add/remove,
zero-out; 2S under replace-one) -- accounted like ``dp_gaussian``. Noise goes on every row,
not only the touched ones: which items were touched is itself the users' data. The
per-item "raters" normalization is not available here (the number of raters of an item is
data outside the mechanism); the denominator is the fixed m. Clipping is per client and
the rest is a sum, so the mechanism is a :class:`~fedjax_lite.core.aggregators.Reduction`
(``engine.micro_cohort``): the noise is drawn once, in the finalization.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lite.core.aggregators import Aggregator, Reduction, reduced, reporting_metrics
from fedjax_lite.core.sparse import SparseUpdate, flatten_update, weighted_sums
from fedjax_lite.privacy.clipping import clip_rows
from fedjax_lite.privacy.gaussian import DP_NOISE_STREAM


def dp_sparse_gaussian(num_rows: int, clip_norm: float, noise_multiplier: float,
                       expected_clients: float) -> Aggregator:
    """The Gaussian mechanism on sparse updates; returns dense deltas
    ``{**tables [num_rows, ...], **dense leaves}``. Metrics: ``noise_std`` (on the mean
    update), ``clip_norm``; non-private diagnostics ``clipped_fraction``,
    ``num_reporting``, ``no_client_reported``."""
    for name, v in (("clip_norm", clip_norm), ("expected_clients", expected_clients)):
        if not v > 0:
            raise ValueError(f"dp_sparse_gaussian: {name} must be > 0, got {v!r}")
    if not noise_multiplier >= 0:
        raise ValueError(f"dp_sparse_gaussian: noise_multiplier must be >= 0, got "
                         f"{noise_multiplier!r}")
    S, z, m = float(clip_norm), float(noise_multiplier), float(expected_clients)

    def init(params_like):
        del params_like
        return ()

    def partial(update: SparseUpdate, weights, state):
        del state
        reporting = weights > 0
        flat, unflatten = flatten_update(update)
        clipped = clip_rows(flat, reporting, S)
        update_c = unflatten(clipped.rows)
        slot_w = (update.mask & reporting[:, None]).astype(flat.dtype)
        return {**weighted_sums(update_c, slot_w, reporting, num_rows),
                "count": jnp.sum(reporting.astype(jnp.int32)),
                "clipped": jnp.sum(clipped.clipped)}

    def finalize(sums, state, key):
        names = sorted(sums["rows"]) + sorted(sums["dense"])
        keys = dict(zip(names, jax.random.split(jax.random.fold_in(key, DP_NOISE_STREAM),
                                                len(names))))
        out = {}
        for group in ("rows", "dense"):
            for name, summed in sums[group].items():
                noise = jax.random.normal(keys[name], summed.shape, summed.dtype) * (z * S)
                out[name] = (summed + noise) / m
        count = sums["count"]
        metrics = reporting_metrics(count)
        metrics["clipped_fraction"] = (sums["clipped"] / jnp.maximum(count, 1)
                                       ).astype(jnp.float32)
        metrics["noise_std"] = jnp.asarray(z * S / m, jnp.float32)
        metrics["clip_norm"] = jnp.asarray(S, jnp.float32)
        return out, state, metrics

    return reduced(init, Reduction(partial, finalize), private=True)


__all__ = ["dp_sparse_gaussian"]
