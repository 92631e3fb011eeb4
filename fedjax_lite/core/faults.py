"""Unreliable and adversarial clients, simulated inside the compiled round.

* Dropout: each sampled client fails to report with probability ``dropout`` (a fresh
  draw per round from the round key); its weight becomes 0, so every aggregator ignores
  it. A round in which nobody reports leaves the model unchanged (aggregators return a
  zero delta) and says so in its metrics.
* Byzantine clients: a fixed, seeded subset of the population (``attackers``, chosen
  once on the host). Update attacks rewrite their updates before aggregation:
  ``sign_flip`` (-scale * update), ``scale`` (scale * update), ``gaussian`` (replaced by
  N(0, noise_std^2) noise). ``label_flip`` corrupts their training labels instead, which
  is done once on the host (:func:`fedjax_lite.data.flip_labels`): a fixed attacker
  always trains on flipped labels, so this is the same thing.
* Uplink compression (``compressor``, :mod:`fedjax_lite.core.compression`): what reaches
  the server is the decoded compressed update; metrics ``upload_bytes`` (total over
  reporting clients) and ``upload_bytes_uncompressed`` (float32) count the payloads.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lite.core.compression import Compressor, identity

UPDATE_ATTACKS = ("sign_flip", "scale", "gaussian")
# fold_in constants of the faults' random streams. Small integers would collide with
# split(): fold_in(k, 0) and fold_in(k, 1) are split(k)'s two keys, and the same round key
# also reaches the aggregator.
ATTACK_STREAM = 0x4154_4B00    # "ATK"
DROPOUT_STREAM = 0x4452_4F50   # "DROP"
COMPRESS_STREAM = 0x434F_4D50  # "COMP"
ATTACKS = UPDATE_ATTACKS + ("label_flip",)


class Faults(NamedTuple):
    dropout: float = 0.0
    attack: str | None = None
    attackers: jax.Array | None = None   # bool[K]: population rows that are Byzantine
    scale: float = 1.0
    noise_std: float = 1.0
    compressor: Compressor | None = None   # uplink compression (None: float32 as is)


def apply_faults(faults: Faults, updates, weights: jax.Array, index: jax.Array,
                 key: jax.Array):
    """Corrupts attackers' updates and zeroes dropped clients' weights.

    Args:
      updates: pytree, leading axis C; weights: float[C]; index: int32[C] population rows.
    Returns:
      (updates, weights, metrics) with ``attackers_in_cohort``, ``reporting_clients`` and,
      with a compressor, ``upload_bytes`` / ``upload_bytes_uncompressed``.
    """
    C = weights.shape[0]
    metrics = {}
    if faults.attackers is not None:
        bad = faults.attackers[index]
        metrics["attackers_in_cohort"] = jnp.sum(bad)
        if faults.attack in UPDATE_ATTACKS:
            leaves, treedef = jax.tree.flatten(updates)
            keys = jax.random.split(jax.random.fold_in(key, ATTACK_STREAM), len(leaves))

            def corrupt(u, k):
                if faults.attack == "sign_flip":
                    evil = -faults.scale * u
                elif faults.attack == "scale":
                    evil = faults.scale * u
                else:
                    evil = faults.noise_std * jax.random.normal(k, u.shape, u.dtype)
                return jnp.where(bad.reshape((C,) + (1,) * (u.ndim - 1)), evil, u)

            updates = jax.tree.unflatten(treedef, [corrupt(u, k) for u, k in zip(leaves, keys)])
    members = weights > 0                 # padding slots of a padded cohort weigh 0
    if faults.dropout > 0:
        reports = jax.random.uniform(jax.random.fold_in(key, DROPOUT_STREAM), (C,)) >= faults.dropout
        weights = jnp.where(reports, weights, 0.0)
        metrics["reporting_clients"] = jnp.sum(reports & members)
    else:
        metrics["reporting_clients"] = jnp.sum(members)
    if faults.compressor is not None:
        updates, bits = faults.compressor.apply(updates,
                                                jax.random.fold_in(key, COMPRESS_STREAM))
        _, raw_bits = identity().apply(updates, key)
        sent = (weights > 0).astype(jnp.float32)
        metrics["upload_bytes"] = jnp.sum(sent * bits) / 8.0
        metrics["upload_bytes_uncompressed"] = jnp.sum(sent * raw_bits) / 8.0
    return updates, weights, metrics
