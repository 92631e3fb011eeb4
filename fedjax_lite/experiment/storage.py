"""``data.storage``: where the training population lives while a run trains.

- ``device``: on the device(s) for the whole run; a round samples and gathers its cohort
  inside the compiled program (:func:`fedjax_lite.core.build_round`).
- ``host``: in host memory. Round r's cohort is drawn by the same sampler on the device
  (:func:`fedjax_lite.core.sampling.build_sampler`: only the round number and key enter;
  32 rounds at a time), its rows are gathered on the host and transferred, and the round
  runs on just those rows (:func:`fedjax_lite.core.round.build_cohort_round`). While
  round r computes, a background thread gathers and transfers round r + 1's cohort
  (double buffering).
- ``mmap``: like host, but the population is read from ``.npy`` files, only the rows a
  round needs (:mod:`fedjax_lite.data.prepared`) -- ``data.prepared``, or
  ``OUT/prepared`` written on the first run -- so it may be larger than RAM; evaluation
  streams the test clients through the device in blocks.
- ``auto``: ``mmap`` when a prepared folder is given, else ``device`` when the
  population fits the device budget (:func:`device_budget`), else ``host``.

Population-sized client state follows the population (:class:`HostRounds`), Ditto's
personal models included (evaluated a block of clients at a time,
:func:`blocked_evaluate`). The recommenders in :data:`DEVICE_ONLY` evaluate from the
whole population and keep it on the device.

The cohort, its keys, client state and every computation are the same in all three, so
the trained models are identical (tested bitwise); mmap's blocked evaluation sums its
blocks in another order (equal to float rounding).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.core import client_state, round_key
from fedjax_lite.data import Population
from fedjax_lite.data import prepared as prep
from fedjax_lite.experiment import config as cfg

# recommenders whose evaluation reads the whole population (fcf reads stored factors)
DEVICE_ONLY = ("fedrecon", "centralized", "local_only")

# shares of memory a population may take when ``auto`` puts it on the device: on a CPU
# the "device" copy is a second copy in RAM (the host arrays stay alive for outputs)
DEVICE_SHARE, CPU_SHARE = 0.4, 0.25


def device_budget() -> int:
    """Bytes ``auto`` lets the population take on one device."""
    dev = jax.local_devices()[0]
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:                                  # backends without statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(DEVICE_SHARE * stats["bytes_limit"])
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 8 << 30
    return int(CPU_SHARE * ram)


def fingerprint(config: cfg.Config) -> dict:
    """What a prepared folder's arrays depend on: the data section (without the storage
    keys), the data seed and the resolved test split."""
    from fedjax_lite.experiment.builders import test_split
    data = dict(cfg.to_dict(config)["data"])
    for k in ("storage", "prepared", "seed"):
        data.pop(k, None)
    data["seed"] = config.data_seed
    if "test_split" in data:
        data["test_split"] = test_split(config)
    return data


def requested(config: cfg.Config) -> str:
    return getattr(config.data, "storage", "device")


def resolve(config: cfg.Config, train: Population | None) -> str:
    """The storage this run uses (``auto`` resolved; ``train`` None: not built yet)."""
    kind = requested(config)
    if kind != "auto":
        return kind
    if getattr(config.data, "prepared", None) or config.data.kind == "prepared":
        return "mmap"
    if (config.engine.compile_rounds > 1 or train is None
            or config.algorithm.name in DEVICE_ONLY):
        return "device"
    return "device" if prep.population_bytes(train) <= device_budget() else "host"


def load(config: cfg.Config, out_dir: str, build: Callable[[], tuple]) -> tuple:
    """(train, test) for an mmap run or a run from ``data.prepared``: the prepared
    folder's memory-mapped arrays (checked against the config's fingerprint), preparing
    ``OUT/prepared`` from ``build()`` on the first run when no folder is configured."""
    folder = getattr(config.data, "prepared", None)
    want = fingerprint(config)
    if config.data.kind == "prepared":       # the folder is the data: nothing to match
        folder, want = config.data.path, None
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"config key 'data.path': {folder} is not a folder")
    elif folder is None:
        folder = os.path.join(out_dir, "prepared")
        meta = prep.read_meta(folder)
        if meta is None or prep.fingerprint_mismatch(meta, want):
            _write(folder, build, want)
    elif not os.path.isdir(folder):
        raise FileNotFoundError(f"config key 'data.prepared': {folder} does not exist "
                                "(make it with `fedjax-lite prepare CONFIG --out DIR`)")
    train, test = prep.open_prepared(folder, want)
    if want is None:                # written outside the loaders: check the labels
        for name, pop in (("train", train), ("test", test)):
            prep.check_labels(pop, config.num_classes, os.path.join(folder, name))
    if requested(config) in ("device", "host"):          # read the files into memory
        train, test = (Population(np.asarray(p.x), np.asarray(p.y), p.n, p.client_ids)
                       for p in (train, test))
    return train, test


def _write(folder: str, build: Callable[[], tuple], want: dict) -> None:
    """Builds the (train, test) populations and writes them into ``folder``."""
    train, test = build()
    os.makedirs(folder, exist_ok=True)
    prep.write_prepared(folder, train, test, want)


def prepare(config: cfg.Config, folder: str) -> dict:
    """``fedjax-lite prepare``: writes the config's (train, test) populations into
    ``folder``; a folder already prepared from the same data is kept as it is, one
    prepared from other data is refused (ValueError), never overwritten."""
    from fedjax_lite.experiment.builders import build_data
    if config.data.kind == "prepared":
        raise ValueError(f"data.kind is 'prepared': {config.data.path} is prepared already")
    want = fingerprint(config)
    meta = prep.read_meta(folder)
    if meta is not None and (why := prep.fingerprint_mismatch(meta, want)):
        raise ValueError(f"{folder} already holds data prepared from another config "
                         f"({why}); choose another --out")
    if meta is None:
        _write(folder, lambda: build_data(config), want)
    train, test = prep.open_prepared(folder, want)
    return {"prepared": folder, "up_to_date": meta is not None,
            "train_clients": train.num_clients, "test_clients": test.num_clients,
            "bytes": prep.population_bytes(train) + prep.population_bytes(test)}


SHARD_BYTES = 64 << 20      # engine.population auto: shard populations above this


def shard_population(config: cfg.Config, train: Population, engine, recommender: bool
                     ) -> bool:
    """``engine.population`` resolved (ConfigError when ``sharded`` cannot apply)."""
    want = config.engine.population
    devices = 1 if engine.mesh is None else engine.mesh.devices.size
    if want == "replicated" or devices == 1:
        return False
    problem = ("the recommenders keep their population replicated" if recommender else
               "the pmap backend broadcasts the population" if engine.backend == "pmap"
               else None)
    if want == "sharded" and problem:
        raise cfg.ConfigError(f"config key 'engine.population': sharded is not available "
                              f"here: {problem}; use replicated or auto")
    if problem:
        return False
    return want == "sharded" or prep.population_bytes(train) > SHARD_BYTES


def put_sharded(train: Population, mesh) -> dict:
    """The population's arrays split by rows over ``mesh`` (empty rows appended up to a
    multiple of the device count; the sampler never draws them)."""
    from jax.sharding import NamedSharding, PartitionSpec
    from fedjax_lite.core.round import CLIENT_AXIS
    from fedjax_lite.experiment import distributed
    D = mesh.devices.size
    extra = -train.num_clients % D
    arrays = {k: np.asarray(v) for k, v in train.arrays().items()}
    if extra:
        arrays = {k: np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype)])
                  for k, v in arrays.items()}
    sharding = NamedSharding(mesh, PartitionSpec(CLIENT_AXIS))
    if jax.process_count() == 1:
        return jax.device_put(arrays, sharding)
    return distributed.replicate(arrays, sharding)


class HostRounds:
    """``step(state, r) -> (state, metrics)`` for a population kept on the host.

    ``sampler``: :func:`~fedjax_lite.core.sampling.build_sampler` (not jitted: it is run
    vmapped over ``SAMPLE_BLOCK`` rounds at a time, so drawing a cohort never waits in the
    device's queue behind the round being computed); ``cohort_round``: the compiled
    :func:`~fedjax_lite.core.round.build_cohort_round`; ``put``: host arrays to the
    devices the round runs on; ``jit``: how programs are compiled (the run's placement)."""

    SAMPLE_BLOCK = 32

    def __init__(self, train: Population, sampler: Callable, put: Callable,
                 root: jax.Array, rounds: int, jit: Callable = jax.jit):
        self.train, self.put = train, put
        self.arrays = train.arrays()        # {x, y, n}: in RAM, or read from files
        self.root, self.rounds = root, rounds
        self._sample_block = jit(jax.vmap(
            lambda r: sampler(r, round_key(root, r))))
        self._samples: dict = {}     # block number -> (index, mask, extra) on the host
        self.cohort_round = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fedjax-lite-cohort")
        self._pending: dict = {}
        self._full: dict = {}        # client-state fields, population-sized, on the host
        self._handed: dict = {}      # the objects last handed out in a state

    def fetch(self, r: int):
        """Round r's (data, sampled, key): drawn on the device, gathered on the host
        in ascending row order (sequential reads from the files), transferred."""
        key = round_key(self.root, r)
        b, j = divmod(r, self.SAMPLE_BLOCK)
        if b not in self._samples:
            self._samples = {b: jax.tree.map(np.asarray, self._sample_block(
                jnp.arange(b * self.SAMPLE_BLOCK, (b + 1) * self.SAMPLE_BLOCK,
                           dtype=jnp.int32)))}
        index, mask, extra = jax.tree.map(lambda a: a[j], self._samples[b])
        idx = index
        index, mask, extra = self.put((index, mask, extra))
        order = np.argsort(idx, kind="stable")
        rows = np.empty(len(idx), np.int32)
        rows[order] = np.arange(len(idx), dtype=np.int32)
        take = idx[order]
        data = {k: a[take] for k, a in self.arrays.items()}
        return self.put(data), (index, mask, extra, self.put(rows)), key, take, rows

    def _split(self, state, take: np.ndarray):
        """The state with every client-state field cut to the cohort's rows (in the
        gathered data's order); the full fields stay here, on the host."""
        fields = {}
        for name in client_state.FIELDS:
            value = getattr(state, name, None)
            if value is None:
                continue
            full = self._full.get(name)
            if full is None or value is not self._handed.get(name):
                # first round, or a state from elsewhere (init, a restored checkpoint)
                full = jax.tree.map(lambda a: np.array(a), value)
                self._full[name] = full
            fields[name] = self.put(jax.tree.map(lambda a: a[take], full))
        return state._replace(**fields) if fields else state

    def _merge(self, state, take: np.ndarray, rows: np.ndarray, mask: np.ndarray):
        """Writes the real members' new client-state rows back into the host copy and
        returns the state with the full fields again."""
        fields = {}
        at = rows[mask]                     # the real members' positions: distinct rows
        self._undo = []
        for name, full in self._full.items():
            new = getattr(state, name)
            for f, n in zip(jax.tree.leaves(full), jax.tree.leaves(new)):
                self._undo.append((f, take[at], f[take[at]]))
                f[take[at]] = np.asarray(n)[at]
            fields[name] = full
            self._handed[name] = full
        return state._replace(**fields) if fields else state

    def _take(self, r: int):
        pending = self._pending.pop(r, None)
        self._pending.clear()
        return pending.result() if pending is not None else self.fetch(r)

    def inputs(self, state, got):
        """(state cut to the cohort's client-state rows, data, sampled, key)."""
        data, sampled, key, take, _ = got
        return self._split(state, take), data, sampled, key

    def __call__(self, state, r: int):
        got = self._take(r)
        if r + 1 < self.rounds:                 # double buffering: the next cohort now
            self._pending[r + 1] = self._pool.submit(self.fetch, r + 1)
        new_state, metrics = self.cohort_round(*self.inputs(state, got))
        if self._full:                 # client state: only once the round has finished
            take, rows, mask = got[3], got[4], np.asarray(got[1][1])
            new_state = self._merge(new_state, take, rows, mask)
        return new_state, metrics

    def undo_last(self) -> None:
        """Puts back the client-state rows the last round wrote (the runner discards a
        round -- a Poisson overflow, a non-finite result -- and checkpoints the state
        before it, whose client-state fields are these host arrays)."""
        for f, at, old in reversed(getattr(self, "_undo", [])):
            f[at] = old
        self._undo = []

    def first(self, r: int):
        """Round r's inputs (to compile against), kept for round r."""
        got = self.fetch(r)
        done = self._pool.submit(lambda: got)
        self._pending[r] = done
        return got

    def close(self) -> None:
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


def blocked_evaluate(evaluate_sums: Callable, finish: Callable, test: Population,
                     put: Callable, block: int = 4096,
                     per_client_params: bool = False) -> Callable:
    """``evaluate(params)`` over a host (or memory-mapped) test population, ``block``
    clients at a time through one compiled program (the last block padded with empty
    clients, which count nowhere); sums accumulate in float64 on the host.
    ``per_client_params``: ``params`` holds one row per test client (personal models,
    population-sized on the host), sent a block of rows at a time with its clients."""
    K = test.num_clients
    block = max(1, min(block, K))
    compiled = {}

    def rows_of(a, s: int):
        stop = min(s + block, K)
        rows = np.asarray(a[s:stop])
        if stop - s < block:
            rows = np.concatenate([rows, np.zeros((block - (stop - s),) + rows.shape[1:],
                                                  rows.dtype)])
        return rows

    def take(s: int) -> dict:
        return put({k: rows_of(a, s) for k, a in (("x", test.x), ("y", test.y),
                                                  ("n", test.n))})

    def evaluate(params):
        total = None
        for s in range(0, K, block):
            data = take(s)
            p = put(jax.tree.map(lambda a: rows_of(a, s), params)) if per_client_params \
                else params
            if "fn" not in compiled:
                compiled["fn"] = jax.jit(evaluate_sums).lower(p, data).compile()
            sums = jax.tree.map(lambda v: np.asarray(v, np.float64),
                                compiled["fn"](p, data))
            total = sums if total is None else jax.tree.map(np.add, total, sums)
        return finish(total)

    return evaluate


__all__ = ["HostRounds", "blocked_evaluate", "device_budget", "fingerprint",
           "load", "prepare", "put_sharded", "requested", "resolve", "shard_population"]
