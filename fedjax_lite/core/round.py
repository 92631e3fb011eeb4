"""What happens in one round, as one pure, jit-compilable function.

    round_fn(state, population, key) -> (state, metrics)

1. sample (:mod:`fedjax_lite.core.sampling`): ``fixed`` -- ``clients_per_round`` rows,
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

from fedjax_lite.core.sampling import Sampling, build_sampler
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


def round_key(root: jax.Array, round_num) -> jax.Array:
    return jax.random.fold_in(root, round_num)


def build_round(algorithm: FederatedAlgorithm, *, num_clients: int,
                clients_per_round: int, sampling: Sampling = Sampling()) -> Callable:
    """The round function on a device-resident population (not yet jitted: callers
    jit, shard or scan it): :func:`build_sampler`'s cohort, then ``algorithm.apply``.
    Its metrics gain the sampler's ``cohort_size`` / ``sampling_overflow``."""
    sample = build_sampler(num_clients=num_clients, clients_per_round=clients_per_round,
                           sampling=sampling)

    def round_fn(state, population: dict, key: jax.Array):
        index, mask, extra = sample(getattr(state, "round", None), key)
        # size: a sharded population may carry empty rows past K (device divisibility)
        cohort = make_cohort(population, index, mask, size=num_clients)
        return _train(algorithm, state, cohort, key, extra)

    return round_fn


def _train(algorithm: FederatedAlgorithm, state, cohort: Cohort, key: jax.Array,
           extra: dict):
    """The round after sampling, wherever the cohort's data came from: the algorithm
    gets the second half of the round key's split (the sampler drew with the first)."""
    _, train_key = jax.random.split(key)
    state, metrics = algorithm.apply(state, cohort, train_key)
    return state, {**metrics, **extra}


def build_cohort_round(algorithm: FederatedAlgorithm, *, num_clients: int) -> Callable:
    """The round on a cohort whose data the host gathered (``data.storage`` host or
    mmap): ``round_fn(state, data, sampled, key)`` where ``sampled = (index, mask,
    extra)`` is :func:`build_sampler`'s output for this round's key and ``data`` holds
    the members' rows, member c's at ``rows[c]`` (``sampled`` + ``rows`` travel as
    ``(index, mask, extra, rows)``). Computes exactly what :func:`build_round` computes
    on the whole population."""

    def round_fn(state, data: dict, sampled, key: jax.Array):
        index, mask, extra, rows = sampled
        cohort = make_cohort(data, index, mask, rows=rows, size=num_clients)
        return _train(algorithm, state, cohort, key, extra)

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
