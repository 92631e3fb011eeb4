"""What happens in one round, as one pure, jit-compilable function.

    round_fn(state, population, key) -> (state, metrics)

1. sample (:class:`Sampling`): ``fixed`` -- ``clients_per_round`` population rows,
   uniformly without replacement; ``poisson`` -- every row independently with rate
   q = clients_per_round / K, padded to a static bound; ``epochs`` -- each row once per
   epoch. The key depends only on (seed, round): every algorithm sees the same cohorts;
2. ``algorithm.apply(state, cohort, key)``: local training for every cohort client
   (:func:`map_cohort` runs the algorithm's chunk function over cache-sized chunks of
   the cohort, each chunk gathering its own rows of the device-resident population, the
   chunks optionally sharded over devices with ``jax.shard_map`` or ``jax.pmap``;
   :func:`fedjax_lite.core.micro.map_reduce_cohort` instead runs the cohort in
   micro-cohorts with a running sum), aggregation and the server optimizer step.

Algorithms (``fedjax_lite.algorithms``) build the ``(init, apply)`` pair; this module
owns sampling, chunking and sharding, so they are the same for all of them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from fedjax_lite.core.shuffle import epoch_orders_lanes

State = Any
CLIENT_AXIS = "clients"


class Cohort(NamedTuple):
    """A round's cohort: rows ``index`` of the population.

    population: ``{'x': float32[P, N, ...], 'y': int32[P, N], 'n': int32[P]}``, the
    device-resident population (P = K) or, with host storage, just the cohort's rows
    gathered on the host (P = C);
    index: int32[C] sampled population rows (what client keys, client state and attackers
    are indexed by); mask: bool[C], False for padding slots (Poisson and epoch sampling
    pad the cohort to a static size; a padding slot's index is a valid row, but it trains
    nothing, weighs 0 and must never be scattered back);
    n: int32[C] the rows' example counts, 0 for padding slots;
    rows: int32[C] where each member's data sits in ``population`` (None: at ``index``);
    size: the population's size K when ``population`` holds only the cohort.
    """
    population: dict
    index: jax.Array
    n: jax.Array
    mask: jax.Array
    rows: jax.Array | None = None
    size: int | None = None

    @property
    def data_rows(self) -> jax.Array:
        """int32[C]: the members' rows of ``population``."""
        return self.index if self.rows is None else self.rows

    @property
    def num_clients(self) -> int:
        """K, the population's size (static)."""
        return self.population["n"].shape[0] if self.size is None else self.size


class FederatedAlgorithm(NamedTuple):
    """``init(params) -> state`` (state has a ``.params`` field) and
    ``apply(state, cohort, key) -> (state, metrics)`` (traceable, one round)."""
    init: Callable[[Any], State]
    apply: Callable[[State, Cohort, jax.Array], tuple[State, dict]]


class EngineOptions(NamedTuple):
    """Speed knobs; results do not depend on them beyond float reassociation.

    chunk_size: clients trained together (vmapped); chunks run one after another
      (``lax.map``), so on CPUs a chunk's working set stays in cache. None = the whole
      cohort at once (what a GPU wants).
    unroll: unroll factor of the local step scan.
    mesh: a 1-D ``Mesh`` with axis ``'clients'``: the cohort is split over its devices
      (``jax.shard_map``); the population must be replicated on them.
    group_by_size: clients of similar example counts share a chunk (the cohort is sorted
      by count and cut into chunks, the chunks dealt round-robin over the devices, the
      results put back in cohort order),
      so chunks of small clients skip the step slots only large clients need. Worth it on
      skewed populations; on equal-sized clients it changes nothing.
    backend: how the cohort is split over ``mesh``'s devices: ``shard_map`` (the
      cohort's arrays sharded along the client axis) or ``pmap`` (reshaped to
      [devices, per_device, ...] and mapped by the classic ``jax.pmap``, for parity with
      code written for it). Both run the same per-device function on the same clients.
    population_sharded: the population's rows are split over ``mesh``'s devices (leading
      axis sharded, ``PartitionSpec('clients')``) instead of replicated on each: every
      chunk's rows are then gathered where they live and delivered to the device that
      trains them (a masked local gather and ``psum_scatter``: exact, since every row
      comes from exactly one device). Needs ``shard_map``.
    micro_cohort: None, or how many clients' updates are materialized at once: the
      algorithms that support it (the FedAvg family, with a linear aggregator) run the
      cohort in micro-cohorts of this many clients and keep a running weighted sum
      (:mod:`fedjax_lite.core.micro`); :func:`map_cohort` itself ignores it.
    """
    chunk_size: int | None = 64
    unroll: int = 4
    mesh: Mesh | None = None
    group_by_size: bool = True
    backend: str = "shard_map"
    micro_cohort: int | None = None
    population_sharded: bool = False


BACKENDS = ("shard_map", "pmap")


def make_cohort(population: dict, index: jax.Array, mask: jax.Array | None = None, *,
                rows: jax.Array | None = None, size: int | None = None) -> Cohort:
    """The cohort of population rows ``index``; ``mask`` (default: all True) marks real
    members. ``rows``/``size``: ``population`` holds only the cohort's data, member c's
    at ``rows[c]``, of a population of ``size`` clients (host storage)."""
    index = index.astype(jnp.int32)
    mask = jnp.ones(index.shape, bool) if mask is None else jnp.asarray(mask, bool)
    at = index if rows is None else rows.astype(jnp.int32)
    return Cohort(population, index, jnp.where(mask, population["n"][at], 0), mask,
                  None if rows is None else at, size)


def _chunking(num: int, chunk_size: int | None, shards: int) -> tuple[int, int]:
    """(chunks per shard, chunk size) covering ``num`` clients with the least padding."""
    per_shard = -(-num // shards)
    if chunk_size is None or chunk_size >= per_shard:
        return 1, per_shard
    chunks = -(-per_shard // chunk_size)
    return chunks, -(-per_shard // chunks)


def map_cohort(chunk_fn: Callable, cohort: Cohort, per_client: tuple,
               options: EngineOptions):
    """Runs ``chunk_fn(x, y, n, *per_client)`` over the cohort, a chunk at a time.

    ``chunk_fn`` receives a chunk's clients (leading axis K): x [K, N, ...], y [K, N],
    n int[K] and the matching slices of ``per_client`` (pytrees with leading axis C),
    and returns a pytree with leading axis K. Each chunk gathers its own population
    rows, so the cohort's data is never copied as a whole. The cohort is padded to whole
    chunks (and shards) with clients of n = 0 whose results are dropped, so ``chunk_fn``
    compiles once; a client with n = 0 takes no step.

    Returns the concatenated outputs, leading axis C (cohort order).
    """
    if options.backend not in BACKENDS:
        raise ValueError(f"engine backend must be one of {BACKENDS}, got {options.backend!r}")
    C = cohort.index.shape[0]
    shards = 1 if options.mesh is None else options.mesh.devices.size
    chunks, K = _chunking(C, options.chunk_size, shards)
    padded = shards * chunks * K
    pad = lambda a: jnp.concatenate([a, jnp.repeat(a[:1], padded - C, axis=0)])
    index = pad(cohort.data_rows)
    counts = pad(cohort.n)
    valid = jnp.arange(padded) < C
    per_client = jax.tree.map(pad, per_client)
    grouped = options.group_by_size and shards * chunks > 1
    if grouped:
        # Largest first, cut into chunks of K; chunk c goes to shard c % shards, so each
        # chunk holds clients of similar size and every device gets a mix of chunks.
        by_size = jnp.argsort(-jnp.where(valid, counts, -1), stable=True)
        perm = by_size.reshape(chunks, shards, K).transpose(1, 0, 2).reshape(-1)
        index, counts, valid, per_client = jax.tree.map(
            lambda a: a[perm], (index, counts, valid, per_client))

    sharded_rows = options.population_sharded and options.mesh is not None

    def run(population, index, counts, valid, per_client, all_index=None):
        def one_chunk(c):
            sl = lambda a: lax.dynamic_slice_in_dim(a, c * K, K)
            n = jnp.where(sl(valid), sl(counts), 0)
            if all_index is None:
                rows = sl(index)
                take = lambda a: jnp.take(a, rows, axis=0, mode="clip")
                x, y = take(population["x"]), take(population["y"])
            else:
                x, y = _gather_sharded_rows(population, all_index, c, shards, chunks, K)
            return chunk_fn(x, y, n, *jax.tree.map(sl, per_client))

        if chunks == 1:
            return one_chunk(0)
        out = lax.map(one_chunk, jnp.arange(chunks))
        return jax.tree.map(lambda o: o.reshape(chunks * K, *o.shape[2:]), out)

    if sharded_rows and options.backend != "shard_map":
        raise ValueError("a sharded population needs the shard_map backend")
    if options.mesh is None:
        out = run(cohort.population, index, counts, valid, per_client)
    elif sharded_rows:
        spec = PartitionSpec(CLIENT_AXIS)
        out = jax.shard_map(run, mesh=options.mesh,
                            in_specs=(spec, spec, spec, spec, spec, PartitionSpec()),
                            out_specs=spec, check_vma=False)(
            cohort.population, index, counts, valid, per_client, index)
    elif options.backend == "pmap":
        # The classic per-device map: shard s holds padded rows [s*chunks*K, (s+1)*...),
        # exactly the rows shard_map gives device s; the population is broadcast.
        split = lambda a: a.reshape(shards, chunks * K, *a.shape[1:])
        out = jax.pmap(run, axis_name=CLIENT_AXIS, in_axes=(None, 0, 0, 0, 0),
                       devices=list(options.mesh.devices.flat))(
            cohort.population, *jax.tree.map(split, (index, counts, valid, per_client)))
        out = jax.tree.map(lambda o: o.reshape(padded, *o.shape[2:]), out)
    else:
        # check_vma=False: with the default, grad w.r.t. the replicated server params
        # inside shard_map is summed over devices (../shared/PLATFORM.md); here every
        # value is computed per device and nothing relies on implicit collectives.
        spec = PartitionSpec(CLIENT_AXIS)
        out = jax.shard_map(run, mesh=options.mesh,
                            in_specs=(PartitionSpec(), spec, spec, spec, spec),
                            out_specs=spec, check_vma=False)(
            cohort.population, index, counts, valid, per_client)
    if grouped:
        out = jax.tree.map(lambda o: o[jnp.argsort(perm)], out)
    return jax.tree.map(lambda o: o[:C], out)


def _gather_sharded_rows(population: dict, all_index: jax.Array, c, shards: int,
                         chunks: int, K: int):
    """Inside ``shard_map`` over a population sharded by rows: chunk ``c``'s (x, y) for
    this device. Every device looks up, among the rows it holds, those of chunk c of
    every device (zeros where another device holds the row) and ``psum_scatter`` hands
    each device the sum for its own chunk -- its rows exactly (x + 0 = x)."""
    local = population["n"].shape[0]
    me = lax.axis_index(CLIENT_AXIS)
    rows = lax.dynamic_index_in_dim(all_index.reshape(shards, chunks, K), c, axis=1,
                                    keepdims=False)                       # [D, K]
    rel = rows - me * local
    mine = (rel >= 0) & (rel < local)

    def gather(a):
        got = jnp.take(a, jnp.clip(rel, 0, local - 1).reshape(-1), axis=0)
        got = got.reshape(rows.shape + a.shape[1:])
        got = jnp.where(mine.reshape(mine.shape + (1,) * (a.ndim - 1)), got,
                        jnp.zeros((), a.dtype))
        return lax.psum_scatter(got, CLIENT_AXIS, scatter_dimension=0, tiled=False)

    return gather(population["x"]), gather(population["y"])


def local_training_chunk(train_fn: Callable, *, local_epochs: int) -> Callable:
    """Wraps ``train_fn(x, y, n, orders, *rest)`` into a chunk function for
    :func:`map_cohort` whose first per-client input is the clients' PRNG keys: each
    chunk draws its clients' per-epoch example orders (``core.shuffle``) from them."""

    def chunk_fn(x, y, n, keys, *rest):
        orders = epoch_orders_lanes(keys, n, x.shape[1], local_epochs)
        return train_fn(x, y, n, orders, *rest)

    return chunk_fn


def client_keys(key: jax.Array, index: jax.Array) -> jax.Array:
    """One key per client, from the round key and the client's population row, so a
    client's randomness does not depend on its position in the cohort."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


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


def round_key(root: jax.Array, round_num) -> jax.Array:
    return jax.random.fold_in(root, round_num)


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


def build_round(algorithm: FederatedAlgorithm, *, num_clients: int,
                clients_per_round: int, sampling: Sampling = Sampling()) -> Callable:
    """The round function on a device-resident population (not yet jitted: callers
    jit, shard or scan it): :func:`build_sampler`'s cohort, then ``algorithm.apply``.
    Its metrics gain the sampler's ``cohort_size`` / ``sampling_overflow``."""
    sample = build_sampler(num_clients=num_clients, clients_per_round=clients_per_round,
                           sampling=sampling)

    def round_fn(state, population: dict, key: jax.Array):
        index, mask, extra = sample(getattr(state, "round", None), key)
        _, train_key = jax.random.split(key)
        # size: a sharded population may carry empty rows past K (device divisibility)
        cohort = make_cohort(population, index, mask, size=num_clients)
        state, metrics = algorithm.apply(state, cohort, train_key)
        return state, {**metrics, **extra}

    return round_fn


def build_cohort_round(algorithm: FederatedAlgorithm, *, num_clients: int) -> Callable:
    """The round on a cohort whose data the host gathered (``data.storage`` host or
    mmap): ``round_fn(state, data, sampled, key)`` where ``sampled = (index, mask,
    extra)`` is :func:`build_sampler`'s output for this round's key and ``data`` holds
    the members' rows, member c's at ``rows[c]`` (``sampled`` + ``rows`` travel as
    ``(index, mask, extra, rows)``). Computes exactly what :func:`build_round` computes
    on the whole population."""

    def round_fn(state, data: dict, sampled, key: jax.Array):
        index, mask, extra, rows = sampled
        _, train_key = jax.random.split(key)
        cohort = make_cohort(data, index, mask, rows=rows, size=num_clients)
        state, metrics = algorithm.apply(state, cohort, train_key)
        return state, {**metrics, **extra}

    return round_fn


def build_rounds(round_fn: Callable, num_rounds: int) -> Callable:
    """``num_rounds`` consecutive rounds as ONE program (``engine.compile_rounds``): a
    ``lax.scan`` whose round r draws its key on the device as the host loop does,
    ``round_key(root, r)``, so the states equal the per-round loop's.

    ``rounds_fn(state, population, root, start) -> (state, metrics)``: rounds start ..
    start + num_rounds - 1; every metric gains a leading axis of num_rounds."""
    if not (isinstance(num_rounds, int) and num_rounds >= 1):
        raise ValueError(f"num_rounds must be a positive int, got {num_rounds!r}")

    def rounds_fn(state, population: dict, root: jax.Array, start):
        def body(st, r):
            return round_fn(st, population, round_key(root, r))
        return lax.scan(body, state, start + jnp.arange(num_rounds, dtype=jnp.int32))

    return rounds_fn


def client_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) with axis ``'clients'``."""
    import numpy as np
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(devices), (CLIENT_AXIS,))
