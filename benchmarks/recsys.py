#!/usr/bin/env python
"""Throughput of federated recommendation rounds: FCF on synthetic ratings.

Workloads (issue 9, "Speed"):
  large   the 100 000-user synthetic population: 10 000 items, 10 000 000 ratings
          (~100 per user before the default 80/20 per-user split, so ~80 training ratings
          per user), MF with k = 32; rounds of 1 000 users sampled without replacement.
  ml100k  the ml-100k-shaped default of ``synthetic_ratings`` (943 users, 1682 items,
          100 000 ratings); rounds over the whole population (943 users).

Both run ``fcf`` with ``sparse_mean`` (item_aggregation raters), 1 local epoch, batch
16, client SGD lr 0.05, server SGD lr 1, the config's default ``weighting: examples``
(user u weighs n_u, its training ratings; ``fcf()`` itself defaults to uniform) -- built
from a parsed config by ``experiment.build_recsys`` with
``experiment.builders.engine_options`` (chunk_size auto, every CPU core a device) and
compiled as ``experiment.runner`` does, the population replicated on the devices.

Implementations, interleaved round by round in one process (the order alternates):
  engine    the compiled round ``jax.jit(build_round(fcf ...))``: sampling, gather of
            the cohort's private factors, chunked/vmapped local training sharded over
            the devices, sparse per-item mean, server step, scatter -- one call.
  per_user  a Python loop over the cohort, one jitted call per user's whole local
            training (written here independently: ``lax.fori_loop`` over the user's
            ceil(n/16) steps, the model's ``local_loss``, the same optax client
            optimizer, the user's data sliced to a power-of-two bucket >= n so only a
            handful of programs compile), each writing the user's item-row deltas and
            new private factors into a donated on-device buffer; then ONE jitted call
            does the per-item aggregation (``jax.ops.segment_sum``, independent of
            ``core.sparse``), the server step and the scatter of the private factors.
            It draws each user's epoch order with ``core.shuffle.epoch_orders`` from
            the same per-user key as the engine, so one round from the same state and
            round key must give the same new item table (checked: ``check``).

Metrics: users/s = cohort size / median round wall time (``--rounds`` timed rounds after
``--warmup`` ones; the engine is compiled first, ahead of time, as the runner does);
ratio = median over the interleaved round pairs of t_per_user / t_engine (> 1: the
engine is faster); compile times; peak RSS (``ru_maxrss``, and /proc's VmRSS / VmHWM) at
each stage of the measuring process (the data are generated in another child process and
handed over in an .npz, so the peak is loading + JAX + rounds); population bytes
resident on the devices. ml100k adds a padding probe: the engine round with every row
padded to 2x and 4x the population's longest user (same result, more padded slots).

    python benchmarks/recsys.py                        # both workloads (~3-5 min, 2 cores)
    python benchmarks/recsys.py --users 10000 --ratings 1000000 --items 2000 \\
        --cohort 200 --rounds 3 --warmup 1 --out /tmp/recsys   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_pressure, machine_info, rss_mb, run_child  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

LOCAL_EPOCHS, BATCH, CLIENT_LR, SERVER_LR = 1, 16, 0.05, 1.0


def workload_config(users: int, items: int, ratings: int, dim: int, cohort: int,
                    seed: int, micro_cohort: int | None = None) -> dict:
    """The raw config (as a YAML file would give it) of the measured run."""
    return {
        **({"engine": {"micro_cohort": micro_cohort}} if micro_cohort else {}),
        "seed": seed, "rounds": 1,
        "data": {"kind": "synthetic_ratings", "num_users": users, "num_items": items,
                 "num_ratings": ratings},
        "model": {"kind": "matrix_factorization", "dim": dim},
        "algorithm": {"name": "fcf", "clients_per_round": cohort,
                      "local_epochs": LOCAL_EPOCHS, "batch_size": BATCH,
                      "client_optimizer": {"name": "sgd", "learning_rate": CLIENT_LR},
                      "server_optimizer": {"name": "sgd", "learning_rate": SERVER_LR}},
    }


def proc_status_mb(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (this process image's own peak, unlike ru_maxrss,
    which on Linux also counts the parent's RSS at fork) from /proc/self/status."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError):
        pass
    return None


def device_bytes(tree) -> int:
    """Bytes of ``tree``'s arrays over all their device shards (replicas count)."""
    import jax
    return sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards)


# ---- the per-user jitted loop ----------------------------------------------------------
def per_user_parts(model, client_tx, server_tx, num_users: int, cohort: int, N: int):
    """``prepare(key) -> (index, keys)``, ``user(buf, c, ...)``, ``finish(...)``."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax

    from fedjax_lite.core.round import client_keys
    from fedjax_lite.core.sampling import sample_cohort
    from fedjax_lite.core.shuffle import epoch_orders
    E, B, I = LOCAL_EPOCHS, BATCH, model.num_items

    @jax.jit
    def prepare(key):
        # the cohort and per-user keys the engine's round derives from the round key
        # (core.round.build_round, then algorithms.fcf.apply)
        sample_key, train_key = jax.random.split(key)
        index = sample_cohort(sample_key, num_users, cohort)
        _, train_key = jax.random.split(train_key)
        return index, client_keys(train_key, index)

    def new_buffer(dim, device):
        # committed to the device like everything else the loop passes, so ``user``
        # compiles once per bucket (an uncommitted buffer is another signature)
        return jax.device_put(
            {"item": np.zeros((cohort, N, dim), np.float32),
             "item_bias": np.zeros((cohort, N), np.float32),
             "mu": np.zeros((cohort,), np.float32), "user": np.zeros((cohort, dim), np.float32),
             "user_bias": np.zeros((cohort,), np.float32)}, device)

    @partial(jax.jit, static_argnames="bucket", donate_argnums=0)
    def user(buf, c, params, private, population, index, keys, *, bucket):
        """User index[c]'s whole local training; its deltas go to row c of ``buf``."""
        u = index[c]
        items = lax.dynamic_slice(population["x"], (u, 0), (1, bucket))[0]
        ratings = lax.dynamic_slice(population["y"], (u, 0), (1, bucket))[0]
        n = population["n"][u]
        order = epoch_orders(keys[c][None], n[None], bucket, E)[0]          # [E, bucket]
        rows = {"item": params["item"][items], "item_bias": params["item_bias"][items]}
        local = {"user": private["user"][u], "user_bias": private["user_bias"][u],
                 **rows, "mu": params["mu"]}
        steps = (n + B - 1) // B
        grad = jax.grad(model.local_loss, has_aux=True)

        def step(s, carry):
            p, opt = carry
            pos = (s % steps) * B + jnp.arange(B)
            real = pos < n
            slots = jnp.where(real, order[s // steps][jnp.minimum(pos, bucket - 1)], 0)
            g, _ = grad(p, slots, ratings[slots], real)
            updates, opt = client_tx.update(g, opt, p)
            return optax.apply_updates(p, updates), opt

        local, _ = lax.fori_loop(0, E * steps, step, (local, client_tx.init(local)))
        pad = lambda a: jnp.pad(a, [(0, N - bucket)] + [(0, 0)] * (a.ndim - 1))
        new = {"item": pad(local["item"] - rows["item"]),
               "item_bias": pad(local["item_bias"] - rows["item_bias"]),
               "mu": local["mu"] - params["mu"], "user": local["user"],
               "user_bias": local["user_bias"]}
        return jax.tree.map(lambda b, v: b.at[c].set(v), buf, new)

    @jax.jit
    def finish(buf, params, opt_state, private, population, index):
        """Per-item weighted mean over the users that rated each item (weights n_u, the
        config's default ``weighting: examples``), server SGD, private scatter -- the
        sparse aggregation written with segment sums."""
        n = population["n"][index]
        w = n.astype(jnp.float32)                     # weighting: examples (n_u)
        real = jnp.arange(N)[None, :] < n[:, None]                              # [C, N]
        seg = jnp.where(real, population["x"][index], I).reshape(-1)          # I = drop
        slot_w = jnp.where(real, w[:, None], 0.0)
        raters_w = jax.ops.segment_sum(slot_w.reshape(-1), seg, I + 1)[:I]
        safe = jnp.where(raters_w > 0, raters_w, 1.0)
        summed = lambda v: jax.ops.segment_sum(
            (v * slot_w.reshape(slot_w.shape + (1,) * (v.ndim - 2))).reshape(
                (-1,) + v.shape[2:]), seg, I + 1)[:I]
        delta = {"item": summed(buf["item"]) / safe[:, None],
                 "item_bias": summed(buf["item_bias"]) / safe,
                 "mu": jnp.sum(w * buf["mu"]) / jnp.sum(w)}
        updates, opt_state = server_tx.update(jax.tree.map(jnp.negative, delta),
                                              opt_state, params)
        private = {"user": private["user"].at[index].set(buf["user"]),
                   "user_bias": private["user_bias"].at[index].set(buf["user_bias"])}
        return optax.apply_updates(params, updates), opt_state, private

    return prepare, new_buffer, user, finish


def _cache_size(jitted) -> int | None:
    """Programs compiled so far by a jitted function (None if JAX does not say)."""
    try:
        return int(jitted._cache_size())
    except (AttributeError, TypeError):
        return None


def bucket_of(n: int, N: int) -> int:
    return min(max(16, 1 << max(int(n) - 1, 0).bit_length()), N)


# ---- one workload, in its own process ----------------------------------------------------
def run_workload(raw: dict, data_path: str, args) -> dict:
    from fedjax_lite.experiment.host import configure_host
    configure_host()                              # as the CLI does, before importing jax
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from fedjax_lite.core import build_round, round_key
    from fedjax_lite.data.ratings import Ratings
    from fedjax_lite.experiment import build_recsys, config as cfg
    from fedjax_lite.experiment.builders import build_optimizer, engine_options

    info: dict = {"loadavg_start": os.getloadavg()}
    stage: dict = {}

    def mark(name):
        stage[name] = {"peak_rss_mb": round(rss_mb(), 1),
                       "vm_hwm_mb": proc_status_mb("VmHWM"),
                       "current_rss_mb": proc_status_mb("VmRSS")}

    mark("start")
    config = cfg.parse(raw)
    with np.load(data_path) as z:
        train = Ratings(z["item"], z["rating"], z["n"], z["user_ids"], int(z["num_items"]),
                        tuple(float(s) for s in z["scale"]))
    mark("data_loaded")
    U, C, N = train.num_users, config.algorithm.clients_per_round, train.item.shape[1]
    engine = engine_options(config.engine, train.n)
    info["engine_options"] = {**engine._asdict(), "mesh": None if engine.mesh is None
                              else [str(d) for d in engine.mesh.devices]}
    init_key, run_key = jax.random.split(jax.random.key(config.seed))
    model = build_recsys.build_mf(config, train)
    algorithm = build_recsys.build_recommender(config, model, engine, train=train,
                                               init_key=init_key)     # the runner's builder
    state0 = algorithm.init(model.init_global(init_key))
    where = (NamedSharding(engine.mesh, PartitionSpec()) if engine.mesh is not None
             else jax.local_devices()[0])
    population = jax.device_put(train.arrays(), where)
    jax.block_until_ready(population)
    n_host = np.asarray(train.n)
    dev0 = jax.local_devices()[0]
    train_arrays = train.arrays() if args.padding_probe else None
    del train
    gc.collect()
    info.update(
        population_bytes_on_device=device_bytes(population),
        population_bytes_per_copy=sum(a.nbytes for a in jax.tree.leaves(population)),
        population_copies=len(population["x"].addressable_shards),
        item_table_bytes=device_bytes(state0.params),
        private_state_bytes=device_bytes(state0.private),
        padded_ratings_per_user=N)
    mark("population_on_device")

    t0 = time.perf_counter()
    round_fn = jax.jit(build_round(algorithm, num_clients=U, clients_per_round=C)).lower(
        state0, population, round_key(run_key, 0)).compile()
    info["engine_compile_s"] = time.perf_counter() - t0
    mark("engine_compiled")

    prepare, new_buffer, user, finish = per_user_parts(
        model, build_optimizer(config.algorithm.client_optimizer),
        build_optimizer(config.algorithm.server_optimizer), U, C, N)
    server_tx = build_optimizer(config.algorithm.server_optimizer)
    buckets = np.array([bucket_of(v, N) for v in n_host])

    def loop_round(lstate, key):
        params, opt_state, private, buf = lstate
        index, keys = jax.device_put(prepare(key), dev0)    # committed, like the probe's
        idx = np.asarray(index)
        for c in range(C):
            buf = user(buf, c, params, private, loop_population, index, keys,
                       bucket=int(buckets[idx[c]]))
        params, opt_state, private = finish(buf, params, opt_state, private,
                                            loop_population, index)
        return params, opt_state, private, buf

    def loop_start(state):
        params, private = jax.device_put((state.params, state.private), dev0)
        return (params, server_tx.init(params), private, new_buffer(model.dim, dev0))

    # ---- engine warm-up (its peak RSS is read before the loop compiles anything)
    eng = {"state": state0}
    times_eng_warm = []
    for r in range(args.warmup):
        t = time.perf_counter()
        eng["state"], m = round_fn(eng["state"], population, round_key(run_key, r))
        jax.block_until_ready(eng["state"])
        times_eng_warm.append(time.perf_counter() - t)
    info["engine_warmup_s"] = times_eng_warm
    mark("engine_warm")
    # the loop's single-device population: from the engine's replicated one (its device-0
    # replica), made only now so that the engine's peak above does not include it
    loop_population = jax.device_put(population, dev0)
    jax.block_until_ready(loop_population)
    info["loop_population_bytes"] = device_bytes(loop_population)
    mark("loop_population_on_device")

    # ---- the loop's programs: one per bucket size present (compiled here, not timed)
    t0 = time.perf_counter()
    lst = loop_start(state0)
    probe_index = np.zeros(C, np.int32)
    probe_keys = jax.device_put(prepare(round_key(run_key, 0))[1], dev0)
    for b in sorted(set(buckets.tolist())):
        probe_index[0] = int(np.flatnonzero(buckets == b)[0])
        buf = user(lst[3], 0, lst[0], lst[2], loop_population,
                   jax.device_put(probe_index, dev0), probe_keys, bucket=b)
        lst = (*lst[:3], buf)
    jax.block_until_ready(finish(lst[3], lst[0], lst[1], lst[2], loop_population,
                                 jax.device_put(probe_index, dev0)))
    compiled_before = _cache_size(user)
    info["per_user_compile_s"] = time.perf_counter() - t0
    info["per_user_buckets"] = sorted(set(buckets.tolist()))
    mark("per_user_compiled")

    # ---- check: one round from the same state and round key
    key = round_key(run_key, 0)
    s_eng, _ = round_fn(state0, population, key)
    s_loop = loop_round(loop_start(state0), key)
    jax.block_until_ready((s_eng, s_loop))
    index = np.asarray(prepare(key)[0])
    check = {}
    for name in ("item", "item_bias", "mu"):
        a, b = np.asarray(s_eng.params[name], np.float64), np.asarray(s_loop[0][name],
                                                                       np.float64)
        before = np.asarray(state0.params[name], np.float64)
        moved = float(np.max(np.abs(a - before)))
        check[name] = {"max_abs_diff": float(np.max(np.abs(a - b))),
                       "max_abs_change_in_round": moved}
    for name in ("user", "user_bias"):
        a = np.asarray(s_eng.private[name], np.float64)[index]
        b = np.asarray(s_loop[2][name], np.float64)[index]
        moved = float(np.max(np.abs(a - np.asarray(state0.private[name])[index])))
        check["private_" + name] = {"max_abs_diff": float(np.max(np.abs(a - b))),
                                    "max_abs_change_in_round": moved}
    untouched = np.setdiff1d(np.arange(U), index)
    check["private_rows_outside_cohort_unchanged"] = bool(
        np.array_equal(np.asarray(s_eng.private["user"])[untouched],
                       np.asarray(state0.private["user"])[untouched]))
    worst = max(v["max_abs_diff"] / max(v["max_abs_change_in_round"], 1e-30)
                for k, v in check.items() if isinstance(v, dict))
    check["worst_diff_relative_to_change"] = worst
    check["passed"] = bool(worst < args.check_tol
                           and check["private_rows_outside_cohort_unchanged"])
    info["check"] = check
    del s_eng, s_loop
    mark("checked")

    # ---- interleaved timing
    lst = loop_start(eng["state"])
    for r in range(args.warmup):                                 # loop warm-up rounds
        lst = loop_round(lst, round_key(run_key, r))
        jax.block_until_ready(lst)
    t_eng, t_loop = [], []
    for i in range(args.rounds):
        r = args.warmup + i
        key = round_key(run_key, r)

        def run_engine():
            t = time.perf_counter()
            eng["state"], eng["m"] = round_fn(eng["state"], population, key)
            jax.block_until_ready(eng["state"])
            t_eng.append(time.perf_counter() - t)

        def run_loop():
            nonlocal lst
            t = time.perf_counter()
            lst = loop_round(lst, key)
            jax.block_until_ready(lst)
            t_loop.append(time.perf_counter() - t)

        for f in ((run_engine, run_loop) if i % 2 == 0 else (run_loop, run_engine)):
            f()
        print(f"  round {r}: engine {t_eng[-1] * 1e3:8.1f} ms  per_user "
              f"{t_loop[-1] * 1e3:8.1f} ms", file=sys.stderr, flush=True)
    mark("end")
    info["per_user_compiles_after_warmup"] = (
        None if compiled_before is None else _cache_size(user) - compiled_before)
    if args.padding_probe:
        info["padding_probe"] = padding_probe(round_fn, eng["state"], train_arrays, where,
                                              algorithm, U, C, run_key, args)
        mark("after_padding_probe")
    ratios = [b / a for a, b in zip(t_eng, t_loop)]
    med_e, med_l = statistics.median(t_eng), statistics.median(t_loop)
    info.update(
        users=U, cohort=C, num_items=model.num_items, dim=model.dim,
        train_ratings=int(n_host.sum()), mean_train_ratings_per_user=float(n_host.mean()),
        median_train_ratings_per_user=float(np.median(n_host)),
        max_train_ratings_per_user=int(n_host.max()),
        engine_times_s=t_eng, per_user_times_s=t_loop,
        engine_median_s=med_e, per_user_median_s=med_l,
        engine_users_per_s=C / med_e, per_user_users_per_s=C / med_l,
        engine_users_per_s_best=C / min(t_eng), per_user_users_per_s_best=C / min(t_loop),
        ratio_engine_over_per_user=statistics.median(ratios),
        ratio_min=min(ratios), ratio_max=max(ratios),
        final_train_loss=float(eng["m"]["train_loss"]),
        stages=stage, peak_rss_mb=rss_mb(),
        engine_peak_rss_mb=stage["engine_warm"]["peak_rss_mb"],
        loadavg_end=os.getloadavg(), cpu_pressure=cpu_pressure(),
        jax_version=jax.__version__, devices=[str(d) for d in jax.devices()])
    return info


def padding_probe(round_fn, state, arrays: dict, where, algorithm, U: int, C: int,
                  run_key, args) -> dict:
    """Engine round time vs the population's padded length: the same users and ratings
    with the rows padded by zeros to f x N (f in ``--padding-probe``), interleaved round
    by round. The result must not change (padding slots are masked); if the time grows
    with N, the round does work proportional to the padded length, not to the ratings."""
    import jax
    from fedjax_lite.core import build_round, round_key
    N = arrays["x"].shape[1]
    factors = [1] + [int(f) for f in args.padding_probe.split(",") if f and int(f) > 1]
    variants = {}
    for f in factors:
        if f == 1:
            pop = jax.device_put(arrays, where)
            fn = round_fn
        else:
            pad = lambda a: np.pad(a, ((0, 0), (0, (f - 1) * N)))
            pop = jax.device_put({"x": pad(arrays["x"]), "y": pad(arrays["y"]),
                                  "n": arrays["n"]}, where)
            fn = jax.jit(build_round(algorithm, num_clients=U, clients_per_round=C)).lower(
                state, pop, round_key(run_key, 0)).compile()
        variants[f] = (fn, pop)
    times = {f: [] for f in factors}
    out = {}
    for r in range(args.warmup + args.rounds):
        for f in (factors if r % 2 == 0 else factors[::-1]):
            fn, pop = variants[f]
            t = time.perf_counter()
            new, _ = fn(state, pop, round_key(run_key, 1000 + r))
            jax.block_until_ready(new)
            if r >= args.warmup:
                times[f].append(time.perf_counter() - t)
            if r == 0:
                out[f] = np.asarray(new.params["item"])
    return {"padded_length": {str(f): f * N for f in factors},
            "median_s": {str(f): statistics.median(times[f]) for f in factors},
            "times_s": {str(f): times[f] for f in factors},
            "ratio_to_unpadded": {str(f): statistics.median(times[f]) /
                                  statistics.median(times[1]) for f in factors},
            "max_abs_diff_item_table_vs_unpadded": {
                str(f): float(np.max(np.abs(out[f] - out[1]))) for f in factors}}


# ---- driver ----------------------------------------------------------------------------
def make_data(raw: dict, path: str) -> dict:
    """Generates the workload's ratings as the CLI does and stores the training split
    (runs in its own process, so the measuring process never held the generator's
    temporaries)."""
    from fedjax_lite.experiment.host import configure_host
    configure_host()
    from fedjax_lite.experiment import build_recsys, config as cfg
    t0 = time.perf_counter()
    data = build_recsys.build_ratings_data(cfg.parse(raw))
    train, split = data.train, data.split
    gen_s = time.perf_counter() - t0
    np.savez(path, item=train.item, rating=train.rating, n=train.n, user_ids=train.user_ids,
             num_items=np.int64(train.num_items), scale=np.asarray(train.scale))
    return {"generate_s": gen_s, "train_ratings": int(train.n.sum()),
            "test_ratings": int(split.test.n.sum()), "padded_shape": list(train.item.shape),
            "npz_bytes": os.path.getsize(path), "generator_peak_rss_mb": rss_mb()}


def fmt_table(results: list[dict]) -> str:
    head = ["workload", "users", "cohort", "items", "k", "engine users/s", "per-user users/s",
            "ratio (median)", "engine compile s", "peak RSS MB", "population MB on device",
            "check"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["workload"]] + ["error"] + [""] * (len(head) - 2))
            continue
        rows.append([r["workload"], f"{r['users']:,}", f"{r['cohort']:,}",
                     f"{r['num_items']:,}", r["dim"], f"{r['engine_users_per_s']:,.0f}",
                     f"{r['per_user_users_per_s']:,.0f}",
                     f"{r['ratio_engine_over_per_user']:.2f}x "
                     f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
                     f"{r['engine_compile_s']:.1f}", f"{r['engine_peak_rss_mb']:,.0f}",
                     f"{r['population_bytes_on_device'] / 2**20:,.0f}",
                     "ok" if r["check"]["passed"] else "FAILED"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="large,ml100k")
    ap.add_argument("--users", type=int, default=100_000, help="large: users")
    ap.add_argument("--items", type=int, default=10_000, help="large: items")
    ap.add_argument("--ratings", type=int, default=10_000_000, help="large: ratings (all)")
    ap.add_argument("--cohort", type=int, default=1000, help="large: users per round")
    ap.add_argument("--dim", type=int, default=32, help="MF dimension k (both workloads)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--micro-cohort", type=int, default=None,
                    help="large: engine.micro_cohort (users whose row updates exist at once)")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds per implementation")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds per implementation")
    ap.add_argument("--check-tol", type=float, default=1e-4,
                    help="max |engine - per_user| / max |change in the round| (check)")
    ap.add_argument("--out", default=str(REPO / "results"))
    ap.add_argument("--padding-probe", default="2,4",
                    help="ml100k: also time the engine round with the rows padded to "
                         "f x N for these f (empty: skip)")
    ap.add_argument("--one", nargs=3, metavar=("NAME", "CONFIG_JSON", "NPZ"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--make-data", nargs=2, metavar=("CONFIG_JSON", "NPZ"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.warmup < 1:
        ap.error("--rounds and --warmup must be >= 1")

    if args.make_data:
        print("RESULT " + json.dumps(make_data(json.loads(args.make_data[0]),
                                               args.make_data[1])), flush=True)
        return
    if args.one:
        res = run_workload(json.loads(args.one[1]), args.one[2], args)
        res["workload"] = args.one[0]
        print("RESULT " + json.dumps(res), flush=True)
        return

    # The parent stays small (no JAX, no data) until every child has run: on Linux a
    # child's ru_maxrss starts from the parent's RSS at fork.
    from fedjax_lite.experiment.host import configure_host
    configure_host()             # so the recorded devices / XLA_FLAGS are the children's
    specs = {
        "large": workload_config(args.users, args.items, args.ratings, args.dim,
                                 args.cohort, args.seed, args.micro_cohort),
        "ml100k": workload_config(943, 1682, 100_000, args.dim, 943, args.seed),
    }
    names = [s for s in args.workloads.split(",") if s]
    for s in names:
        if s not in specs:
            ap.error(f"--workloads: unknown {s!r}; choose from {sorted(specs)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    results, commands = [], []
    with tempfile.TemporaryDirectory(prefix="recsys_bench_") as tmp:
        for name in names:
            raw = specs[name]
            path = str(Path(tmp) / f"{name}.npz")
            data, err = run_child([sys.executable, os.path.abspath(__file__), "--make-data",
                                   json.dumps(raw), path])
            if data is None:
                print(f"{name}: data generation FAILED {err}", flush=True)
                results.append({"workload": name, "config": raw, "error": err})
                continue
            print(f"{name}: generated {data['train_ratings']:,} training ratings "
                  f"{tuple(data['padded_shape'])} in {data['generate_s']:.1f} s", flush=True)
            child = [sys.executable, os.path.abspath(__file__), "--one", name,
                     json.dumps(raw), str(path), "--rounds", str(args.rounds),
                     "--warmup", str(args.warmup), "--check-tol", str(args.check_tol),
                     "--padding-probe", args.padding_probe if name == "ml100k" else ""]
            commands.append(" ".join(os.path.relpath(a, REPO) if a.startswith(str(REPO))
                                     else a for a in child[1:4])
                            + " '<config json, see results[].config>' <npz> "
                            + " ".join(child[6:]))
            t0 = time.time()
            r, err = run_child(child)
            if r is None:
                print(f"{name}: FAILED {err}", flush=True)
                results.append({"workload": name, "config": raw, "data": data, "error": err})
                continue
            r.update(config=raw, data=data, process_wall_s=time.time() - t0)
            results.append(r)
            print(f"{name}: engine {r['engine_users_per_s']:,.0f} users/s, per-user loop "
                  f"{r['per_user_users_per_s']:,.0f} users/s, ratio "
                  f"{r['ratio_engine_over_per_user']:.2f}x, compile "
                  f"{r['engine_compile_s']:.1f} s, peak {r['engine_peak_rss_mb']:,.0f} MB, "
                  f"check {'ok' if r['check']['passed'] else 'FAILED'} "
                  f"(worst {r['check']['worst_diff_relative_to_change']:.1e})  "
                  f"[{r['process_wall_s']:.0f} s]", flush=True)
    txt = fmt_table(results)
    print()
    print(txt)
    doc = {
        "benchmark": "FCF round throughput on synthetic ratings (issue 9, Speed)",
        "machine": machine_info(),
        "command": " ".join([os.path.relpath(sys.executable, REPO) if
                             sys.executable.startswith(str(REPO)) else "python",
                             os.path.relpath(os.path.abspath(__file__), REPO)]
                            + (sys.argv[1:] if argv is None else list(argv))),
        "child_commands": commands,
        "workload": {
            "algorithm": "fcf (private user factors, sparse_mean with item_aggregation "
                         "raters, weighting examples: the config default)",
            "model": "biased MF, l2 0.02, init_scale 0.1",
            "local_epochs": LOCAL_EPOCHS, "batch_size": BATCH,
            "client_optimizer": f"sgd(lr={CLIENT_LR})",
            "server_optimizer": f"sgd(lr={SERVER_LR})",
            "data": "synthetic_ratings, random per-user 80/20 split (the config default); "
                    "training split only",
        },
        "method": {
            "users_per_s": "cohort / median round wall time over --rounds timed rounds "
                           "after --warmup untimed ones; engine and per_user alternate "
                           "round by round (order alternating) in one process",
            "ratio": "median over round pairs of t_per_user / t_engine",
            "rounds": args.rounds, "warmup": args.warmup,
            "peak_rss": "ru_maxrss of the measuring child; engine_peak_rss_mb is read "
                        "after the engine's compile and warm-up rounds, before the "
                        "per-user loop compiles or copies anything else; the data are "
                        "generated in the parent",
            "population_bytes_on_device": "item + rating + n arrays over every device "
                                          "shard (the engine's population is replicated "
                                          "on every device)",
            "check": "one round from the same state and round key: max |engine - per_user|"
                     " of every new global table and the cohort's private rows, divided by "
                     "the largest change of that table in the round",
        },
        "results": results,
        "table": txt,
        "total_wall_s": time.time() - t_start,
    }
    (out / "recsys_throughput.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out / 'recsys_throughput.json'} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
