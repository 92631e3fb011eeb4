"""Secure aggregation with dropouts (SecAgg) and its sparse-graph variant (SecAgg+).

Papers:
  * Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth,
    "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017
    (the honest-but-curious protocol of its Figure 4: AdvertiseKeys, ShareKeys,
    MaskedInputCollection, Unmasking);
  * Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure Single-Server Aggregation with
    (Poly)Logarithmic Overhead", CCS 2020 (SecAgg+: masks only between neighbours in a
    sparse random graph);
  * McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
    Models", ICLR 2018 (DP-FedAvg's Gaussian mechanism, used by ``dp_secure_mean``).

The protocol, per round, with C slots and the survivors U = {i : weight_i > 0}. Client i
encodes its update as integers mod R = 2^r (``fixed_point``; r leaves room for the sum of C
encodings) and uploads

    y_i = enc(x_i) + PRG(b_i) + sum_{j in N(i), j > i} PRG(s_ij)
                              - sum_{j in N(i), j < i} PRG(s_ij)      (mod R)

where b_i is i's self-mask seed, s_ij the seed i shares with neighbour j and N(i) its
neighbours: all other slots (SecAgg) or, with ``neighbors=k``, the k nearest slots on a
random cycle, k/2 on each side: a sparse k-regular graph as SecAgg+ asks for (the Harary
graph H_{k,C} with randomly permuted vertices; Bell et al.'s analysis is for random
graphs with given parameters, so take this as the practical variant, not their theorem's
graph). The server sums y_i over U. If |U| < ``min_survivors`` it aborts and releases
nothing. Otherwise it removes sum_{i in U} PRG(b_i) (b_i rebuilt from survivors' shares)
and, for each dropped d and each surviving neighbour j of d, the mask of pair (d, j) that
j added, with its sign (d's key rebuilt from shares). What is left is
sum_{i in U} enc(x_i) mod R, the exact integer sum, which is decoded to the mean.

Simulated faithfully: the fixed-point encoding, every pairwise and self mask (expanded
from per-pair and per-client seeds by the JAX PRG, a stand-in for AES-CTR), the signs,
the modular arithmetic, the server's removal of self masks and orphaned pair masks, the
abort, the graph, and the bytes each client sends (named constants below). The uploads
have exactly the distribution they have in the protocol: each is uniform mod R.
Not simulated: the cryptography. Pair seeds are derived from the round key with
``fold_in(min(i, j), max(i, j))`` in place of Diffie-Hellman key agreement; shares are
not encrypted and Shamir sharing is not run: whenever |U| >= ``min_survivors`` the
server is assumed to reconstruct what it needs when enough holders of the shares survive:
|U| >= ``min_survivors`` (SecAgg), and in SecAgg+ also a majority of the k neighbours of
every survivor and of every dropped client with a surviving neighbour (else the round
aborts). Every weight-0 slot (dropout or padding) counts as a client
that took part in key agreement and dropped before uploading its masked input; dropouts
during Unmasking, and the signatures and consistency round of the actively secure
version, are out of scope. Everything derives from the round key, so this simulation
protects nothing; it reproduces what the server computes and sees.

Threat model (of the protocol simulated): an honest-but-curious server that follows the
protocol learns only sum_{i in U} x_i, and only when |U| >= ``min_survivors``; with fewer
survivors the round aborts (``min_survivors`` = 1 would let it see a lone survivor's
update). Bonawitz et al. also tolerate the server colluding with fewer than threshold
clients; Bell et al.'s guarantees hold with high probability over the random graph, for
bounded dropout and corruption rates. The neighbouring relation of
differential privacy is not this module's business, except for ``dp_secure_mean``:
there, under add/remove-one-client neighbours, one client changes the decoded sum by at
most S_eff in L2 (see that function), and the server's Gaussian noise makes the RELEASED
update DP (McMahan et al. 2018). The server adds that noise itself after unmasking: SecAgg
hides each update from the server, DP protects the released model; the server is trusted
to add the noise (distributed noise, added by clients, is not simulated).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lite.core.aggregators import Aggregator, flatten_updates, reporting_metrics
from fedjax_lite.privacy.clipping import clip_rows
from fedjax_lite.privacy.fixed_point import (check_bits, check_clip, decode_mean, encode,
                                             modulus_bits, modulus_mask)

# Stream constants folded into the round's aggregation key.
SECAGG_ROUNDING_STREAM = 0x53415244   # "SARD": stochastic rounding of the encodings
SECAGG_PROTOCOL_STREAM = 0x53415054   # "SAPT": keys of the protocol (below)
SECAGG_GRAPH_STREAM = 0x53414752      # "SAGR": the random cycle of SecAgg+
SECAGG_PAIR_STREAM = 0x53415053       # "SAPS": pair seeds s_ij (Diffie-Hellman stand-in)
SECAGG_SELF_STREAM = 0x53415342       # "SASB": self-mask seeds b_i
DP_NOISE_STREAM = 0x44504E53          # "DPNS": the Gaussian noise (dp_gaussian's stream)

# Bytes a client sends, for ``secagg_protocol_bytes_per_client``.
PUBLIC_KEY_BYTES = 32     # an X25519 public key (RFC 7748); AdvertiseKeys sends two
SHARE_BYTES = 32          # a Shamir share of a 32-byte secret (X25519 key or PRG seed b)
CLIENT_ID_BYTES = 4       # a client index, as a uint32
AEAD_OVERHEAD_BYTES = 28  # AES-GCM: 12-byte nonce + 16-byte tag (NIST SP 800-38D)
# ShareKeys: per neighbour, Enc(u || v || share of s_u^SK || share of b_u) (Bonawitz et al.)
SHARE_MESSAGE_BYTES = 2 * CLIENT_ID_BYTES + 2 * SHARE_BYTES + AEAD_OVERHEAD_BYTES


def default_min_survivors(cohort_size: int) -> int:
    """The threshold used when none is configured: a majority of the C slots."""
    return int(cohort_size) // 2 + 1


def check_graph(neighbors: int | None, cohort_size: int) -> None:
    """ValueError unless ``neighbors`` is None (all pairs) or an even k, 2 <= k < C."""
    if neighbors is None:
        return
    if not (isinstance(neighbors, int) and not isinstance(neighbors, bool)
            and neighbors >= 2 and neighbors % 2 == 0 and neighbors < cohort_size):
        bound = "" if cohort_size == math.inf else f" < cohort size {cohort_size}"
        raise ValueError(f"aggregator.neighbors must be null (all pairs) or an even integer "
                         f"k >= 2{bound}, got {neighbors!r}")


def check_min_survivors(min_survivors: int, cohort_size: int) -> None:
    """ValueError unless 1 <= ``min_survivors`` <= C (1 lets a lone survivor's update be
    seen by the server: it is the 'sum')."""
    if not (isinstance(min_survivors, int) and not isinstance(min_survivors, bool)
            and 1 <= min_survivors <= cohort_size):
        bound = "" if cohort_size == math.inf else f" <= cohort size {cohort_size}"
        raise ValueError(f"aggregator.min_survivors must be an integer >= 1{bound}, got "
                         f"{min_survivors!r}")


def _degree(num_clients: int, neighbors: int | None) -> int:
    return num_clients - 1 if neighbors is None else neighbors


def _cycle(key: jax.Array, num_clients: int, neighbors: int | None):
    """(order, offsets): ``order[p]`` is the slot at position p of the cycle; i's
    neighbours are order[(pos_i + o) % C] for o in offsets. All pairs: the identity cycle
    and every offset 1..C-1; SecAgg+: a random cycle, offsets +-1..+-k/2."""
    if neighbors is None:
        return jnp.arange(num_clients, dtype=jnp.int32), list(range(1, num_clients))
    half = neighbors // 2
    order = jax.random.permutation(jax.random.fold_in(key, SECAGG_GRAPH_STREAM),
                                   num_clients).astype(jnp.int32)
    return order, list(range(1, half + 1)) + [num_clients - o for o in range(1, half + 1)]


def neighbor_slots(key: jax.Array, num_clients: int, neighbors: int | None) -> jax.Array:
    """int32[C, deg]: the neighbours of every slot in the graph ``secure_sum`` builds from
    the same ``key`` (the aggregators pass ``fold_in(key, SECAGG_PROTOCOL_STREAM)``). For
    inspection and tests; the protocol itself never builds this table."""
    order, offsets = _cycle(key, num_clients, neighbors)
    pos = jnp.zeros(num_clients, jnp.int32).at[order].set(jnp.arange(num_clients))
    return order[(pos[:, None] + jnp.asarray(offsets, jnp.int32)[None, :]) % num_clients]


class SecureSum(NamedTuple):
    uploads: jax.Array   # uint32[C, D]: y_i, what each survivor sends (0 rows: dropped)
    total: jax.Array     # uint32[D]: the server's unmasked sum mod 2^r (0 if aborted)
    aborted: jax.Array   # bool[]: fewer than min_survivors survivors


def secure_sum(encoded: jax.Array, reporting: jax.Array, key: jax.Array, *,
               modulus_bits: int, min_survivors: int,
               neighbors: int | None = None) -> SecureSum:
    """One round of the protocol (module docstring) on ``encoded`` uint32[C, D] < 2^r,
    survivors ``reporting`` bool[C]. Memory O(C D): one scan step per neighbour offset,
    each expanding the C masks of that offset (no [C, C, D] tensor, even for all pairs)."""
    num_clients, dim = encoded.shape
    check_graph(neighbors, num_clients)
    check_min_survivors(min_survivors, num_clients)
    wrap = modulus_mask(modulus_bits)
    reporting = jnp.asarray(reporting, bool)
    slots = jnp.arange(num_clients, dtype=jnp.int32)
    order, offsets = _cycle(key, num_clients, neighbors)
    pos = jnp.zeros(num_clients, jnp.int32).at[order].set(slots)
    pair_root = jax.random.fold_in(key, SECAGG_PAIR_STREAM)
    expand = jax.vmap(lambda k: jax.random.bits(k, (dim,), jnp.uint32))   # the PRG

    def pair_seed(i, j):   # s_ij = s_ji: what Diffie-Hellman agreement would give i and j
        return jax.random.fold_in(jax.random.fold_in(pair_root, jnp.minimum(i, j)),
                                  jnp.maximum(i, j))

    def offset_step(carry, offset):
        masks, orphans, alive = carry
        nbr = order[(pos + offset) % num_clients]          # each slot's neighbour j
        alive = alive + reporting[nbr].astype(jnp.int32)   # surviving neighbours
        stream = expand(jax.vmap(pair_seed)(slots, nbr))   # PRG(s_ij), [C, D]
        term = jnp.where((nbr > slots)[:, None], stream, jnp.uint32(0) - stream)
        # masks[i]: what client i adds to its upload. orphans[d]: d's own terms towards
        # surviving neighbours; if d dropped, the server regenerates these from d's
        # reconstructed key: each is minus the term the neighbour added for d.
        orphans = orphans + jnp.where(reporting[nbr][:, None], term, jnp.uint32(0))
        return (masks + term, orphans, alive), None

    zeros = jnp.zeros((num_clients, dim), jnp.uint32)
    (pair_masks, orphans, alive), _ = jax.lax.scan(
        offset_step, (zeros, zeros, jnp.zeros(num_clients, jnp.int32)),
        jnp.asarray(offsets, jnp.int32))
    self_masks = expand(jax.vmap(jax.random.fold_in, (None, 0))(
        jax.random.fold_in(key, SECAGG_SELF_STREAM), slots))
    uploads = jnp.where(reporting[:, None], (encoded + self_masks + pair_masks) & wrap,
                        jnp.uint32(0))

    # Server. Sums mod 2^32 wrap, and 2^r divides 2^32: reducing at the end is exact.
    count = jnp.sum(reporting.astype(jnp.int32))
    aborted = count < min_survivors
    if neighbors is not None:
        # SecAgg+: a client's secrets are shared among its k neighbours only, with
        # threshold k // 2 + 1. The server needs b_i of every survivor and s_d of every
        # dropped client with a surviving neighbour; if fewer than the threshold of their
        # neighbours survive it cannot rebuild them and must abort (else a survivor whose
        # neighbours all dropped would be unmasked by its self-mask alone).
        needed = reporting | (alive > 0)
        aborted = aborted | jnp.any(needed & (alive < share_threshold(neighbors)))
    masked_sum = jnp.sum(uploads, axis=0, dtype=jnp.uint32)
    self_sum = jnp.sum(jnp.where(reporting[:, None], self_masks, jnp.uint32(0)), axis=0,
                       dtype=jnp.uint32)
    orphan_sum = jnp.sum(jnp.where(reporting[:, None], jnp.uint32(0), orphans), axis=0,
                         dtype=jnp.uint32)
    total = (masked_sum - self_sum + orphan_sum) & wrap
    return SecureSum(uploads, jnp.where(aborted, jnp.uint32(0), total), aborted)


def share_threshold(neighbors: int) -> int:
    """SecAgg+'s per-neighbourhood Shamir threshold: a majority of a client's k
    neighbours."""
    return int(neighbors) // 2 + 1


def protocol_bytes_per_client(num_clients: int, num_reporting, dim: int, bits: int,
                              neighbors: int | None, aborted=False) -> jax.Array:
    """float32: mean over the C slots of the bytes each sends in the four rounds of
    Bonawitz et al. Every slot: AdvertiseKeys (2 public keys) and ShareKeys (one
    encrypted message per neighbour). Survivors: MaskedInputCollection (r D / 8) and,
    unless the round aborted, Unmasking (one share per neighbour). O(C) per client for
    all pairs, O(k) for SecAgg+ (plus r D / 8, with r growing like log C)."""
    degree = _degree(num_clients, neighbors)
    r = modulus_bits(bits, num_clients)
    everyone = 2 * PUBLIC_KEY_BYTES + degree * SHARE_MESSAGE_BYTES
    unmasking = jnp.where(aborted, 0.0, degree * SHARE_BYTES)
    survivor = r * dim / 8.0 + unmasking
    per_slot = everyone + jnp.asarray(num_reporting, jnp.float32) * survivor / num_clients
    return jnp.asarray(per_slot, jnp.float32)


def _secure_round(rows, mask, m, key, clip, bits, min_survivors, neighbors):
    """Encode ``rows`` [C, D] in [-clip, clip], run the protocol, decode the mean over
    survivors (0 if aborted). Returns (mean float32[D], aborted, metrics)."""
    num_clients, dim = rows.shape
    check_bits(bits, num_clients)
    check_graph(neighbors, num_clients)
    check_min_survivors(min_survivors, num_clients)
    r = modulus_bits(bits, num_clients)
    encoded = encode(rows, jax.random.fold_in(key, SECAGG_ROUNDING_STREAM), clip, bits)
    result = secure_sum(encoded, mask, jax.random.fold_in(key, SECAGG_PROTOCOL_STREAM),
                        modulus_bits=r, min_survivors=min_survivors, neighbors=neighbors)
    released = ~result.aborted & (m > 0)
    mean = jnp.where(released, decode_mean(result.total, m, clip, bits), 0.0)
    metrics = {
        **reporting_metrics(m),
        "secagg_aborted": result.aborted.astype(jnp.float32),
        "secagg_bytes_per_client": jnp.asarray(r * dim / 8.0, jnp.float32),
        "secagg_protocol_bytes_per_client": protocol_bytes_per_client(
            num_clients, m, dim, bits, neighbors, result.aborted),
    }
    return mean, result.aborted, metrics


def _check_static(bits, min_survivors, neighbors) -> None:
    """What can be checked before the cohort size is known (the rest at trace time)."""
    check_bits(bits, 1)
    check_min_survivors(min_survivors, math.inf)
    check_graph(neighbors, math.inf)


def _stateless_init(params_like):
    del params_like
    return ()


def secure_mean(clip_value: float, bits: int = 16, *, min_survivors: int,
                neighbors: int | None = None) -> Aggregator:
    """The unweighted mean of the survivors' updates through secure aggregation.

    Each survivor's update (all leaves, flattened) is clipped per coordinate to
    [-c, c] (c = ``clip_value``; NaN -> 0, +-inf -> +-c), encoded with ``bits`` bits and
    unbiased stochastic rounding, and masked; the server unmasks the exact sum and decodes
    it into the mean over the survivors. Weights only say who reported. The round aborts
    (zero delta) with fewer than ``min_survivors`` survivors (``default_min_survivors(C)``
    is a majority); ``neighbors``: None = all pairs (SecAgg), even k = SecAgg+.

    Metrics (float32 scalars): ``num_reporting``, ``no_client_reported``,
    ``secagg_aborted``, ``secagg_bytes_per_client`` (the masked upload, r D / 8),
    ``secagg_protocol_bytes_per_client`` (all four rounds, see
    ``protocol_bytes_per_client``), ``secagg_clipped_fraction`` (survivors' coordinates
    that were out of range or NaN; a diagnostic computed from plaintext updates).
    """
    c = check_clip("secure_mean: clip_value", clip_value)
    _check_static(bits, min_survivors, neighbors)

    def apply(deltas, weights, state, key):
        flat, mask, m, unravel = flatten_updates(deltas, weights)
        mean, _, metrics = _secure_round(flat, mask, m, key, c, bits, min_survivors,
                                         neighbors)
        altered = mask[:, None] & ~(jnp.abs(flat) <= c)          # NaN compares False
        metrics["secagg_clipped_fraction"] = (
            jnp.sum(altered) / jnp.maximum(m * flat.shape[1], 1)).astype(jnp.float32)
        return unravel(mean.astype(flat.dtype)), state, metrics

    return Aggregator(_stateless_init, apply)


def sensitivity_bound(clip_norm: float, bits: int, dim: int) -> float:
    """S_eff = S + sqrt(D) 2S / (2^bits - 1): the L2 norm of a decoded, stochastically
    rounded vector whose L2 norm before rounding was <= S (each coordinate moves by less
    than one grid step 2S / (2^bits - 1))."""
    return clip_norm + math.sqrt(dim) * 2.0 * clip_norm / (2 ** bits - 1)


def dp_secure_mean(clip_norm: float, noise_multiplier: float, expected_clients: float,
                   bits: int, *, min_survivors: int,
                   neighbors: int | None = None) -> Aggregator:
    """DP-FedAvg (McMahan et al. 2018) on top of secure aggregation:

        Delta = (sum_{i in U} dec(enc(clip(Delta_i, S))) + N(0, (z S_eff)^2 I)) / m,

    with S = ``clip_norm`` (whole-update L2 clip by ``clip_rows``: NaN/inf rows send
    zero), each coordinate encoded in [-S, S] with ``bits`` bits, the sum unmasked by the
    server (which sees only that sum), then Gaussian noise and the FIXED denominator
    m = ``expected_clients``. Rounding can lengthen a clipped vector: a decoded one has L2
    norm <= S_eff = ``sensitivity_bound(S, bits, D)``, so scaling the noise by S_eff (not
    S) keeps the accounted noise multiplier at z = ``noise_multiplier`` under add/remove
    neighbours. The server adds the noise after unmasking (see the module docstring). An
    aborted round releases a zero delta and no noise; whether a round aborted (at least
    ``min_survivors`` reported or not) is released in the clear and is NOT covered by
    this accounting (like ``num_reporting``, it tells whether the count crossed the
    threshold).

    Metrics: as ``secure_mean`` (``secagg_clipped_fraction`` = survivors whose update was
    L2-clipped or non-finite), plus ``noise_std`` (z S_eff / m, per coordinate of the
    released mean) and ``clip_norm`` (S).
    """
    S = check_clip("dp_secure_mean: clip_norm", clip_norm)
    z, denom = float(noise_multiplier), float(expected_clients)
    if not (math.isfinite(z) and z >= 0):
        raise ValueError(f"dp_secure_mean: noise_multiplier must be finite and >= 0, got "
                         f"{noise_multiplier!r}")
    if not (math.isfinite(denom) and denom > 0):
        raise ValueError(f"dp_secure_mean: expected_clients must be finite and > 0, got "
                         f"{expected_clients!r}")
    _check_static(bits, min_survivors, neighbors)

    def apply(deltas, weights, state, key):
        flat, mask, m, unravel = flatten_updates(deltas, weights)
        clipped = clip_rows(flat.astype(jnp.float32), mask, S)
        mean, aborted, metrics = _secure_round(clipped.rows, mask, m, key, S, bits,
                                               min_survivors, neighbors)
        s_eff = sensitivity_bound(S, bits, flat.shape[1])
        noise = jax.random.normal(jax.random.fold_in(key, DP_NOISE_STREAM), mean.shape,
                                  jnp.float32) * jnp.float32(z * s_eff)
        total = mean * m.astype(jnp.float32) + noise
        out = jnp.where(aborted, 0.0, total / jnp.float32(denom))
        metrics["secagg_clipped_fraction"] = (
            jnp.sum(clipped.clipped | clipped.nonfinite) / jnp.maximum(m, 1)).astype(
            jnp.float32)
        metrics["noise_std"] = jnp.asarray(z * s_eff / denom, jnp.float32)
        metrics["clip_norm"] = jnp.asarray(S, jnp.float32)
        return unravel(out.astype(flat.dtype)), state, metrics

    return Aggregator(_stateless_init, apply, private=True)


__all__ = ["SecureSum", "check_bits", "check_graph", "check_min_survivors",
           "default_min_survivors", "dp_secure_mean", "encode", "modulus_bits", "neighbor_slots",
           "protocol_bytes_per_client", "secure_mean", "secure_sum", "sensitivity_bound"]
