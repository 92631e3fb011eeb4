"""What happens in one round, as one pure, jit-compilable function.

    round_fn(state, population, key) -> (state, metrics)

1. sample: ``clients_per_round`` population rows, uniformly without replacement, from a
   key that depends only on (seed, round) -- every algorithm sees the same cohorts;
2. gather: the cohort's rows of the device-resident population (array indexing);
3. ``algorithm.apply``: local training for every cohort client (one client's code,
   vmapped over cache-sized chunks of clients by :func:`map_clients`), aggregation and
   the server optimizer step.

Algorithms (``fedjax_lite.algorithms``) build the ``(init, apply)`` pair; this module
owns sampling, gathering and the client map, so they stay the same for all of them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_lite.core.shuffle import epoch_orders

State = Any


class Cohort(NamedTuple):
    """A cohort's data, leading axis = client. ``index`` = rows in the population."""
    x: jax.Array      # float32[C, N, ...]
    y: jax.Array      # int32[C, N]
    n: jax.Array      # int32[C]
    index: jax.Array  # int32[C]


class FederatedAlgorithm(NamedTuple):
    """``init(params) -> state`` (state has a ``.params`` field) and
    ``apply(state, cohort, key) -> (state, metrics)`` (traceable, one round)."""
    init: Callable[[Any], State]
    apply: Callable[[State, Cohort, jax.Array], tuple[State, dict]]


class EngineOptions(NamedTuple):
    """Speed knobs that never change results beyond float reassociation.

    chunk_size: clients vmapped together; chunks run one after another (``lax.map``).
      Small chunks keep the working set in cache on CPUs; None = the whole cohort at
      once (what a GPU wants).
    unroll: unroll factor of the local step scan.
    """
    chunk_size: int | None = 16
    unroll: int = 4


def map_chunks(chunk_fn: Callable, args: tuple, chunk_size: int | None):
    """Applies ``chunk_fn`` (written for a batch of clients, leading axis) to ``args``
    ``chunk_size`` clients at a time, the chunks one after another inside the program
    (``lax.map``), and concatenates the results. None = one chunk.

    A last partial chunk is filled with copies of client 0 whose results are dropped,
    so ``chunk_fn`` is compiled once.
    """
    num = jax.tree.leaves(args)[0].shape[0]
    if chunk_size is None or chunk_size >= num:
        return chunk_fn(*args)
    chunks = -(-num // chunk_size)
    fill = chunks * chunk_size - num
    pad = lambda a: jnp.concatenate([a, jnp.repeat(a[:1], fill, axis=0)]) if fill else a
    stacked = jax.tree.map(lambda a: pad(a).reshape(chunks, chunk_size, *a.shape[1:]), args)
    out = lax.map(lambda a: chunk_fn(*a), stacked)
    return jax.tree.map(lambda o: o.reshape(chunks * chunk_size, *o.shape[2:])[:num], out)


def map_clients(fn: Callable, args: tuple, chunk_size: int | None):
    """Applies ``fn`` (written for ONE client) to every client of ``args`` (leading
    axis): ``jax.vmap(fn)(*args)``, evaluated ``chunk_size`` clients at a time."""
    return map_chunks(jax.vmap(fn), args, chunk_size)


def map_local_training(fn: Callable, x: jax.Array, y: jax.Array, n: jax.Array,
                       keys: jax.Array, extra: tuple, *, local_epochs: int,
                       chunk_size: int | None):
    """Runs ``fn(x, y, n, orders, *extra)`` (ONE client's local training) for every
    client, drawing each client's per-epoch example orders from its key. The orders are
    computed per chunk, for the chunk's clients together (see ``core.shuffle``)."""

    def chunk_fn(x, y, n, keys, *extra):
        orders = epoch_orders(keys, n, x.shape[1], local_epochs)
        return jax.vmap(fn)(x, y, n, orders, *extra)

    return map_chunks(chunk_fn, (x, y, n, keys, *extra), chunk_size)


def client_keys(key: jax.Array, index: jax.Array) -> jax.Array:
    """One key per client, from the round key and the client's population row, so a
    client's randomness does not depend on its position in the cohort."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


def sample_cohort(key: jax.Array, num_clients: int, clients_per_round: int) -> jax.Array:
    """int32[C]: uniform sample without replacement of population rows."""
    return jax.random.choice(key, num_clients, (clients_per_round,), replace=False)


def gather_cohort(population: dict, index: jax.Array) -> Cohort:
    return Cohort(population["x"][index], population["y"][index], population["n"][index],
                  index.astype(jnp.int32))


def round_key(root: jax.Array, round_num) -> jax.Array:
    return jax.random.fold_in(root, round_num)


def build_round(algorithm: FederatedAlgorithm, *, num_clients: int,
                clients_per_round: int) -> Callable:
    """The round function (not yet jitted: callers jit, shard or scan it)."""
    if not 0 < clients_per_round <= num_clients:
        raise ValueError(f"clients_per_round={clients_per_round} must be in "
                         f"[1, {num_clients}] (the population size)")

    def round_fn(state, population: dict, key: jax.Array):
        sample_key, train_key = jax.random.split(key)
        index = sample_cohort(sample_key, num_clients, clients_per_round)
        cohort = gather_cohort(population, index)
        return algorithm.apply(state, cohort, train_key)

    return round_fn
