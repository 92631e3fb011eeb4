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
* Error feedback (``error_feedback=True``, with a compressor and ``num_clients``): every
  population client i keeps a residual e_i (params-shaped, zeros at init) of what its
  compressor dropped, sends C(Delta_i + e_i) and keeps e_i <- Delta_i + e_i -
  C(Delta_i + e_i) -- Stich, Cordonnier and Jaggi, "Sparsified SGD with Memory",
  NeurIPS 2018, Algorithm 1 (mem-SGD); Karimireddy, Rebjock, Stich and Jaggi, "Error
  Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML 2019,
  Algorithm 2 (EF-SGD; there the step size multiplies the gradient before compression,
  here Delta_i already is a model difference). Summed over rounds, what a client sent is
  the sum of its updates minus its current residual, so nothing a biased compressor
  (top-k) drops is lost, only delayed. The residuals are a population-sized client state
  (:mod:`fedjax_lite.core.client_state`) carried in the algorithm's state: :func:`uplink`
  gathers the cohort's rows and scatters the new ones back inside the compiled round.
  A client that sent nothing (dropped out, or weight 0 -- e.g. a dropped straggler) and
  padding slots keep their old residual. Residuals are private: the aggregator only
  sees what each client sent.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lite.core import client_state
from fedjax_lite.core.compression import Compressor, identity
from fedjax_lite.core.round import Cohort

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
    error_feedback: bool = False           # residual memory e_i (needs compressor)
    num_clients: int | None = None         # population rows K, for the residuals


def check_faults(faults: Faults) -> None:
    """ValueError for an inconsistent fault model (builders call it once)."""
    if faults.error_feedback:
        if faults.compressor is None:
            raise ValueError("faults: error_feedback=True needs a compressor "
                             "(the residual is what the compressor drops)")
        if not (isinstance(faults.num_clients, int) and faults.num_clients >= 1):
            raise ValueError(f"faults: error_feedback=True needs num_clients (the "
                             f"population size), got num_clients={faults.num_clients!r}")


def init_residuals(faults: Faults, params):
    """e_i = 0 for every population row (leading axis K), or None without error
    feedback."""
    check_faults(faults)
    return client_state.zeros(faults.num_clients, params) if faults.error_feedback else None


def residuals_of(state):
    """The ``residuals`` field of an algorithm's state, or None (states of runs without
    error feedback have no such field)."""
    return getattr(state, "residuals", None)


def apply_faults(faults: Faults, updates, weights: jax.Array, index: jax.Array,
                 key: jax.Array):
    """Corrupts attackers' updates, zeroes dropped clients' weights, compresses.

    Args:
      updates: pytree, leading axis C; weights: float[C]; index: int32[C] population rows.
    Returns:
      (updates, weights, metrics) with ``attackers_in_cohort``, ``reporting_clients`` and,
      with a compressor, ``upload_bytes`` / ``upload_bytes_uncompressed``. Stateless:
      with error feedback use :func:`uplink`.
    """
    if faults.error_feedback:
        raise ValueError("apply_faults: error feedback keeps client state; use uplink()")
    updates, weights, _, metrics = _transmit(faults, updates, weights, index, key, None)
    return updates, weights, metrics


def uplink(faults: Faults, updates, weights: jax.Array, cohort: Cohort, key: jax.Array,
           residuals=None):
    """:func:`apply_faults` for the cohort, with error feedback when ``residuals`` (the
    population's e_i, leading axis K) is given.

    Returns:
      (updates the server receives, weights, new residuals or None, metrics); with error
      feedback the metrics add ``residual_norm``, the mean ||e_i|| over the clients that
      sent.
    """
    if residuals is None:
        if faults.error_feedback:
            raise ValueError("uplink: error_feedback=True but the state has no residuals")
        updates, weights, metrics = apply_faults(faults, updates, weights, cohort.index,
                                                 key)
        return updates, weights, None, metrics
    rows = client_state.gather(residuals, cohort)
    updates, weights, new_rows, metrics = _transmit(faults, updates, weights, cohort.index,
                                                    key, rows)
    sent = weights > 0
    norms = jax.vmap(lambda r: jnp.sqrt(sum(jnp.sum(jnp.square(a))
                                            for a in jax.tree.leaves(r))))(new_rows)
    metrics["residual_norm"] = (jnp.sum(jnp.where(sent, norms, 0.0))
                                / jnp.maximum(jnp.sum(sent), 1))
    return updates, weights, client_state.scatter(residuals, cohort, new_rows,
                                                  keep=~sent), metrics


def attackers_of(faults: Faults, index: jax.Array):
    """(bool[C] which cohort slots are Byzantine, or None; metrics)."""
    if faults.attackers is None:
        return None, {}
    bad = faults.attackers[index]
    return bad, {"attackers_in_cohort": jnp.sum(bad)}


def corrupt_updates(faults: Faults, updates, bad, key: jax.Array):
    """The attackers' (``bad``) updates rewritten by the update attack, if any. Per
    client except ``gaussian``, whose noise is drawn for the whole [C, ...] stack."""
    if bad is None or faults.attack not in UPDATE_ATTACKS:
        return updates
    C = bad.shape[0]
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

    return jax.tree.unflatten(treedef, [corrupt(u, k) for u, k in zip(leaves, keys)])


def report_weights(faults: Faults, weights: jax.Array, key: jax.Array):
    """Dropout: (weights with the dropped clients' set to 0, {"reporting_clients"})."""
    members = weights > 0                 # padding slots of a padded cohort weigh 0
    if faults.dropout > 0:
        C = weights.shape[0]
        reports = (jax.random.uniform(jax.random.fold_in(key, DROPOUT_STREAM), (C,))
                   >= faults.dropout)
        return (jnp.where(reports, weights, 0.0),
                {"reporting_clients": jnp.sum(reports & members)})
    return weights, {"reporting_clients": jnp.sum(members)}


def _transmit(faults: Faults, updates, weights, index, key, residual_rows):
    """Attack, dropout, then compression (of Delta_i + e_i when ``residual_rows`` is
    given). Returns (updates, weights, new residual rows or None, metrics)."""
    bad, metrics = attackers_of(faults, index)
    updates = corrupt_updates(faults, updates, bad, key)
    weights, more = report_weights(faults, weights, key)
    metrics.update(more)
    new_rows = None
    if faults.compressor is not None:
        if residual_rows is not None:                       # Delta_i + e_i
            updates = jax.tree.map(lambda u, e: u + e.astype(u.dtype), updates,
                                   residual_rows)
        wanted = updates
        updates, bits = faults.compressor.apply(updates,
                                                jax.random.fold_in(key, COMPRESS_STREAM))
        if residual_rows is not None:                       # e_i <- what was not sent
            new_rows = jax.tree.map(jnp.subtract, wanted, updates)
        _, raw_bits = identity().apply(updates, key)
        sent = (weights > 0).astype(jnp.float32)
        metrics["upload_bytes"] = jnp.sum(sent * bits) / 8.0
        metrics["upload_bytes_uncompressed"] = jnp.sum(sent * raw_bits) / 8.0
    return updates, weights, new_rows, metrics
