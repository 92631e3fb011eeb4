"""Which clients take part in a round (``algorithm.sampling``), drawn on the device.

``fixed``: C population rows uniformly without replacement; ``poisson``: every row
independently with rate q = C / K, padded to a static bound (:func:`poisson_bound`);
``epochs``: each row once per epoch of ceil(K / C) rounds. :func:`build_sampler` draws a
round's cohort from the round number and key alone, so the device-resident round
(:func:`fedjax_lite.core.round.build_round`) and a host that prefetches the next cohort
(``data.storage: host``) draw the same clients.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

def sample_cohort(key: jax.Array, num_clients: int, clients_per_round: int) -> jax.Array:
    """int32[C]: uniform sample without replacement of population rows (full
    participation: every row, in order)."""
    if clients_per_round == num_clients:
        return jnp.arange(num_clients, dtype=jnp.int32)
    return jax.random.choice(key, num_clients, (clients_per_round,),
                             replace=False).astype(jnp.int32)


def poisson_cohort(key: jax.Array, num_clients: int, rate: float,
                   bound: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Poisson sampling: every population row joins independently with probability
    ``rate``. Returns (index int32[bound], mask bool[bound], count): the sampled rows in
    ascending order, padded to the static ``bound`` with row 0 / mask False. When
    ``count > bound`` the cohort is truncated -- the caller must treat that round as
    failed (``sampling_overflow`` metric), never use it."""
    # 32-bit integers against floor(rate * 2^32): the realized rate is within 2^-32 below
    # ``rate`` (a float32 uniform would round it UP to a multiple of 2^-23)
    threshold = min(int(rate * 2.0 ** 32), 2 ** 32 - 1)
    joins = jax.random.bits(key, (num_clients,), jnp.uint32) < jnp.uint32(threshold)
    count = jnp.sum(joins, dtype=jnp.int32)
    index = jnp.nonzero(joins, size=bound, fill_value=0)[0].astype(jnp.int32)
    return index, jnp.arange(bound) < count, count


def epoch_cohort(key: jax.Array, round_num, num_clients: int,
                 clients_per_round: int) -> tuple[jax.Array, jax.Array]:
    """Epoch sampling: each epoch of ``ceil(K / C)`` rounds walks through a fresh random
    permutation of the population (from ``fold_in(key, epoch)``) in consecutive blocks
    of C, so every client takes part exactly once per epoch. The last block of an epoch
    is padded (mask False) when C does not divide K. Returns (index int32[C], mask)."""
    per_epoch = -(-num_clients // clients_per_round)
    epoch, block = round_num // per_epoch, round_num % per_epoch
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_clients)
    perm = jnp.concatenate([perm, jnp.zeros((per_epoch * clients_per_round - num_clients,),
                                            perm.dtype)])
    pos = block * clients_per_round + jnp.arange(clients_per_round)
    index = lax.dynamic_slice_in_dim(perm, block * clients_per_round, clients_per_round)
    return index.astype(jnp.int32), pos < num_clients


SAMPLINGS = ("fixed", "poisson", "epochs")
EPOCH_STREAM = 0x45504F43   # "EPOC": the permutation key of epoch sampling


class Sampling(NamedTuple):
    """How a round's cohort is drawn (``algorithm.sampling``).

    kind: ``fixed`` (C clients uniformly without replacement), ``poisson`` (each client
      independently with rate C / K; the cohort is padded to ``bound`` slots) or
      ``epochs`` (each client once per epoch of ceil(K / C) rounds).
    bound: static cohort size for ``poisson`` (see :func:`poisson_bound`).
    key: the run's root key for ``epochs`` (the permutation of epoch e comes from it and
      e only); rounds are numbered by ``state.round``.
    """
    kind: str = "fixed"
    bound: int | None = None
    key: jax.Array | None = None


def _binomial_upper_tails(num_clients: int, rate: float):
    """float64 array over[b] = P(Binomial(K, rate) > b), b = 0..K, from the exact pmf."""
    import math
    import numpy as np
    k = np.arange(num_clients + 1, dtype=np.float64)
    lg = np.vectorize(math.lgamma)
    log_pmf = (lg(num_clients + 1.0) - lg(k + 1) - lg(num_clients - k + 1)
               + k * math.log(rate) + (num_clients - k) * math.log1p(-rate))
    pmf = np.exp(log_pmf - log_pmf.max())
    pmf /= pmf.sum()
    upper = np.cumsum(pmf[::-1])[::-1]          # upper[b] = P(X >= b)
    return np.append(upper[1:], 0.0)


def poisson_bound(num_clients: int, rate: float, tail: float = 1e-12) -> tuple[int, float]:
    """The smallest static cohort size b with P(Binomial(K, rate) > b) <= ``tail``, and
    that probability."""
    import numpy as np
    if rate >= 1.0:
        return num_clients, 0.0
    over = _binomial_upper_tails(num_clients, rate)
    b = max(int(np.argmax(over <= tail)), 1)
    return b, float(over[b])


def poisson_bound_tail(num_clients: int, rate: float, bound: int) -> float:
    """P(Binomial(K, rate) > bound): the per-round probability that a Poisson draw does
    not fit a cohort of ``bound`` slots."""
    if rate >= 1.0 or bound >= num_clients:
        return 0.0
    return float(_binomial_upper_tails(num_clients, rate)[bound])


def build_sampler(*, num_clients: int, clients_per_round: int,
                  sampling: Sampling = Sampling()) -> Callable:
    """``sample(round_num, key) -> (index, mask, extra)``: round ``round_num``'s cohort
    (``key`` = the round's key; the round trains with the other half of its split).
    ``extra``: ``cohort_size`` (real members) and, for Poisson sampling,
    ``sampling_overflow`` (1 when the draw exceeded the static bound: the round's result
    must be discarded). Only the round number and the key enter, so a host can draw
    round r + 1's cohort while round r computes (host storage)."""
    if not 0 < clients_per_round <= num_clients:
        raise ValueError(f"clients_per_round={clients_per_round} must be in "
                         f"[1, {num_clients}] (the population size)")
    if sampling.kind not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling.kind!r}")
    if sampling.kind == "poisson" and not (sampling.bound and sampling.bound >= 1):
        raise ValueError("poisson sampling needs a static cohort bound >= 1")
    if sampling.kind == "epochs" and sampling.key is None:
        raise ValueError("epoch sampling needs the run's root key")
    rate = clients_per_round / num_clients

    def sample(round_num, key: jax.Array):
        sample_key, _ = jax.random.split(key)
        extra = {}
        if sampling.kind == "poisson":
            index, mask, count = poisson_cohort(sample_key, num_clients, rate, sampling.bound)
            extra["sampling_overflow"] = (count > sampling.bound).astype(jnp.float32)
        elif sampling.kind == "epochs":
            index, mask = epoch_cohort(jax.random.fold_in(sampling.key, EPOCH_STREAM),
                                       round_num, num_clients, clients_per_round)
            count = jnp.sum(mask, dtype=jnp.int32)
        else:
            index = sample_cohort(sample_key, num_clients, clients_per_round)
            mask, count = jnp.ones(index.shape, bool), jnp.asarray(clients_per_round,
                                                                  jnp.int32)
        return index, mask, {"cohort_size": count.astype(jnp.float32), **extra}

    return sample
