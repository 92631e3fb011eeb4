#!/usr/bin/env python
"""Scale-out measurements (issue 11), part one: whole-run compilation and cohort size.

Workload W (``benchmarks/throughput.py``): clients of 64 examples x 100 features, binary
logistic regression, 5 local epochs of batch 16, FedAvg with client SGD 0.1 and server
SGD 1; the engine as the CLI builds it (every core a JAX device, cohort sharded,
``chunk_size`` 64).

1. ``compile_rounds``: K rounds as one program (``core.build_rounds``) against K calls of
   the per-round program, from the same state, alternated block by block in one process
   (``--repeats`` pairs after a warm-up); ratio = median over pairs of t_loop / t_block.
   Population 1000 clients, cohorts of ``--cohorts`` (C = 100 is where the host round
   trip is a large share of a round).
2. Cohort size: clients/s of one round of C clients for C in ``--sizes`` (the population
   = the cohort), median of ``--rounds`` rounds after two warm-up rounds.

Not yet measured here (issue 11 asks for them): device counts 1-8, populations from mmap
storage, sweeps.

    python benchmarks/scaling.py                  # writes results/scaling.{json,md}
    python benchmarks/scaling.py --sizes 100,1000 --repeats 3 --out /tmp/scaling
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402
from dp_tradeoff import source_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def engine(num_clients: int):
    import jax
    import optax
    from fedjax_lite.algorithms import fedavg
    from fedjax_lite.core import EngineOptions, client_mesh
    from fedjax_lite.models import logistic_regression
    devices = jax.local_devices()
    opts = EngineOptions(chunk_size=64, mesh=client_mesh(devices) if len(devices) > 1
                         else None)
    model = logistic_regression(tp.DIM)
    alg = fedavg(model, client_optimizer=optax.sgd(tp.CLIENT_LR),
                 server_optimizer=optax.sgd(tp.SERVER_LR), local_epochs=tp.EPOCHS,
                 batch_size=tp.BATCH, engine=opts)
    return alg, alg.init(model.init(jax.random.key(0)))


def population(num_clients: int):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    from fedjax_lite.core import client_mesh
    x, y, n = tp.make_data(num_clients)
    devices = jax.local_devices()
    where = (NamedSharding(client_mesh(devices), PartitionSpec()) if len(devices) > 1
             else devices[0])
    return jax.device_put({"x": x, "y": y, "n": n}, where)


def compile_rounds_part(args) -> list[dict]:
    import jax
    from fedjax_lite.core import build_round, build_rounds, round_key
    K = args.block
    out = []
    pop = population(1000)
    for C in args.cohorts:
        alg, state0 = engine(1000)
        one = build_round(alg, num_clients=1000, clients_per_round=C)
        round_fn = jax.jit(one)
        block_fn = jax.jit(build_rounds(one, K))
        root = jax.random.key(1)

        def loop(state, start):
            for r in range(start, start + K):
                state, m = round_fn(state, pop, round_key(root, r))
            jax.block_until_ready(state)
            return state

        def block(state, start):
            state, m = block_fn(state, pop, root, start)
            jax.block_until_ready(state)
            return state

        loop(state0, 0), block(state0, 0)                    # compile + warm up
        pairs = []
        for rep in range(args.repeats):
            times = {}
            for name, fn in ((("loop", loop), ("block", block)) if rep % 2 == 0
                             else (("block", block), ("loop", loop))):
                t = time.perf_counter()
                fn(state0, K * (rep + 1))
                times[name] = time.perf_counter() - t
            pairs.append(times)
        ratio = statistics.median(p["loop"] / p["block"] for p in pairs)
        row = {"cohort": C, "population": 1000, "rounds_per_block": K,
               "loop_rounds_per_s": K / statistics.median(p["loop"] for p in pairs),
               "block_rounds_per_s": K / statistics.median(p["block"] for p in pairs),
               "speedup_median": ratio,
               "speedup_range": [min(p["loop"] / p["block"] for p in pairs),
                                 max(p["loop"] / p["block"] for p in pairs)]}
        print(row, flush=True)
        out.append(row)
    return out


def cohort_size_part(args) -> list[dict]:
    import gc
    import jax
    from fedjax_lite.core import build_round, round_key
    out = []
    for C in args.sizes:
        pop = population(C)
        alg, state = engine(C)
        f = jax.jit(build_round(alg, num_clients=C, clients_per_round=C))
        t = time.perf_counter()
        state, _ = f(state, pop, round_key(jax.random.key(1), 0))
        jax.block_until_ready(state)
        first = time.perf_counter() - t
        # one more untimed round: the state now comes back placed by the program, which
        # the second call compiles for once more
        state, _ = f(state, pop, round_key(jax.random.key(1), 1))
        jax.block_until_ready(state)
        times = []
        for r in range(2, args.rounds + 2):
            t = time.perf_counter()
            state, _ = f(state, pop, round_key(jax.random.key(1), r))
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t)
        row = {"cohort": C, "round_s_median": statistics.median(times),
               "clients_per_s": C / statistics.median(times),
               "first_round_s_with_compile": first, "peak_rss_mb": tp.rss_mb()}
        print(row, flush=True)
        out.append(row)
        del pop, state, f
        gc.collect()
    return out


PARTS = ("compile_rounds", "cohort_size", "storage", "devices", "mmap", "layout")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="which parts to (re)measure; the others keep their last results "
                         "in scaling.json (each part records its own git commit)")
    ap.add_argument("--cohorts", default="100,1000")
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--sizes", default="100,1000,10000,100000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--storage-cohorts", default="1000,10000")
    ap.add_argument("--storage-rounds", type=int, default=8)
    ap.add_argument("--device-counts", default="1,2,4,8")
    ap.add_argument("--device-cohorts", default="1000,10000")
    ap.add_argument("--device-repeats", type=int, default=2)
    ap.add_argument("--mmap-sizes", default="10000,100000,1000000")
    ap.add_argument("--mmap-cohort", type=int, default=1000)
    ap.add_argument("--mmap-rounds", type=int, default=5)
    ap.add_argument("--mmap-folder", default="/tmp/fedjax_lite_scaling_mmap")
    ap.add_argument("--layout-cohorts", default="100000")
    ap.add_argument("--out", default=str(REPO / "results"))
    args = ap.parse_args(argv)
    ints = lambda v: [int(x) for x in v.split(",") if x]
    args.cohorts, args.sizes = ints(args.cohorts), ints(args.sizes)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {PARTS}")
    from fedjax_lite.experiment.host import configure_host
    configure_host()
    import scaling_parts as sp
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scaling.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if "compile_rounds" in res and "runs" not in res:     # part one's layout: one run
        first = {k: res.pop(k) for k in ("source", "machine", "wall_s", "args")
                 if k in res}
        res["runs"] = {k: first for k in ("compile_rounds", "cohort_size") if k in res}
    res.setdefault("runs", {})
    source, machine = source_state(), tp.machine_info()
    measure = {
        "compile_rounds": lambda: compile_rounds_part(args),
        "cohort_size": lambda: cohort_size_part(args),
        "storage": lambda: sp.storage_part(ints(args.storage_cohorts), args.storage_rounds),
        "devices": lambda: sp.devices_part(ints(args.device_counts),
                                           ints(args.device_cohorts), args.rounds,
                                           args.device_repeats),
        "mmap": lambda: sp.mmap_part(ints(args.mmap_sizes), args.mmap_cohort,
                                     args.mmap_rounds, args.mmap_folder),
        "layout": lambda: sp.layout_part(ints(args.layout_cohorts), args.rounds)}
    for part in parts:
        t0 = time.time()
        res[part] = measure[part]()
        res["runs"][part] = {"source": source, "machine": machine,
                             "wall_s": time.time() - t0, "args": vars(args)}
        path.write_text(json.dumps(res, indent=1))      # after every part: nothing lost
    import scaling_report
    scaling_report.write(res, out)


if __name__ == "__main__":
    main()
