#!/usr/bin/env python
"""Round time on a skewed population: what grouping clients by size buys.

Real federated populations are skewed: in Synthetic(alpha, beta) of Li et al. (MLSys
2020, Sec. 5.1) client sizes are ``floor(lognormal(4, 2)) + 50`` -- the median client
has ~100 examples, the largest thousands. The engine pads every client to the largest,
so a naive vmapped round does the largest client's work for everyone. Two things in the
engine remove that padding work:

* a chunk runs only the step slots (and epochs) its own clients need (always on), and
* ``EngineOptions.group_by_size`` sorts the cohort by size so each chunk holds clients
  of similar size (on by default), and
* ``engine.chunk_size: auto`` picks small chunks (8) when sizes are skewed.

Measured here: grouped vs ungrouped, same engine, same chunk size.

Workload: FedAvg, multinomial logistic regression 60 -> 10, 20 local epochs of batch 10,
client SGD lr 0.01 (the paper's synthetic setup), fedprox_synthetic(1, 1) populations of
P clients, C sampled per round. For each (P, C) the same ``--rounds`` round keys are
timed (after one compile call) with grouping on and off in the same process,
interleaved; reported: median round time and clients/s, and the padding factor
(step slots a fully padded round would run / steps the clients really need).

    python benchmarks/skewed.py                         # writes results/skewed.json
    python benchmarks/skewed.py --cases 1000:100 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (machine_info; imports no JAX at module level)

REPO = Path(__file__).resolve().parents[1]
EPOCHS, BATCH, LR = 20, 10, 0.01


def padding_factor(n: np.ndarray, cohorts: list[np.ndarray]) -> float:
    """Step slots of fully padded rounds / steps the sampled clients need."""
    slots = -(-int(n.max()) // BATCH)
    need = sum(int(np.sum(-(-n[c] // BATCH))) for c in cohorts)
    return slots * sum(len(c) for c in cohorts) / need


def run_case(P: int, C: int, rounds: int, seed: int, chunk_size: int | None) -> dict:
    import jax
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    from fedjax_lite.algorithms import fedavg
    from fedjax_lite.core import EngineOptions, build_round, client_mesh, round_key
    from fedjax_lite.core.sampling import sample_cohort
    from fedjax_lite.data.synthetic import fedprox_synthetic
    from fedjax_lite.experiment.builders import auto_chunk_size
    from fedjax_lite.models import multinomial_logistic_regression

    pop = fedprox_synthetic(alpha=1.0, beta=1.0, num_clients=P, seed=seed)
    arrays = pop.arrays()
    model = multinomial_logistic_regression(arrays["x"].shape[-1], 10)
    mesh = client_mesh() if len(jax.devices()) > 1 else None
    where = NamedSharding(mesh, PartitionSpec()) if mesh else jax.devices()[0]
    population = jax.device_put(arrays, where)
    root = jax.random.key(seed)
    keys = [round_key(root, r) for r in range(rounds + 1)]
    variants = {}
    for name, group in (("grouped", True), ("ungrouped", False)):
        engine = EngineOptions(mesh=mesh, group_by_size=group,
                               chunk_size=chunk_size or auto_chunk_size(arrays["n"]))
        alg = fedavg(model, client_optimizer=optax.sgd(LR), server_optimizer=optax.sgd(1.0),
                     local_epochs=EPOCHS, batch_size=BATCH,
                     engine=engine)
        fn = jax.jit(build_round(alg, num_clients=P, clients_per_round=C))
        state = alg.init(model.init(jax.random.key(0)))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(state, population, keys[0]))
        variants[name] = (fn, state, time.perf_counter() - t0)
    times = {name: [] for name in variants}
    params = {}
    for r in range(1, rounds + 1):
        for name, (fn, state, _) in variants.items():
            t0 = time.perf_counter()
            new_state, _ = fn(state, population, keys[r])
            jax.block_until_ready(new_state)
            times[name].append(time.perf_counter() - t0)
            params[name] = new_state.params
    # The two orderings train the same clients: their models agree to float rounding.
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
               zip(jax.tree.leaves(params["grouped"]), jax.tree.leaves(params["ungrouped"])))
    cohorts = [np.asarray(sample_cohort(jax.random.split(k)[0], P, C)) for k in keys[1:]]
    n = arrays["n"]
    out = {"P": P, "C": C, "rounds": rounds, "chunk_size": engine.chunk_size, "max_examples": int(n.max()),
           "median_examples": float(np.median(n)), "padding_factor":
           padding_factor(n, cohorts), "max_abs_param_diff_grouped_vs_ungrouped": diff,
           "devices": len(jax.devices())}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"median_s": med, "min_s": min(ts), "clients_per_s": C / med,
                     "first_call_s": variants[name][2], "times_s": ts}
    out["speedup_grouped"] = out["ungrouped"]["median_s"] / out["grouped"]["median_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="30:10,1000:100,1000:1000",
                    help="comma-separated P:C (population:clients per round)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="clients per chunk (default: what engine.chunk_size: auto picks)")
    ap.add_argument("--out", default=str(REPO / "results" / "skewed.json"))
    args = ap.parse_args()
    from fedjax_lite.experiment.host import configure_host
    configure_host()                     # every core a device, as the CLI does
    results = []
    for case in args.cases.split(","):
        P, C = (int(v) for v in case.split(":"))
        r = run_case(P, C, args.rounds, args.seed, args.chunk_size)
        results.append(r)
        print(f"P={P:5d} C={C:5d} max n={r['max_examples']:5d} median n="
              f"{r['median_examples']:6.0f} padding x{r['padding_factor']:5.1f}: grouped "
              f"{r['grouped']['median_s'] * 1e3:8.1f} ms ({r['grouped']['clients_per_s']:8,.0f}"
              f" clients/s), ungrouped {r['ungrouped']['median_s'] * 1e3:8.1f} ms -> x"
              f"{r['speedup_grouped']:.2f}; max |param diff| "
              f"{r['max_abs_param_diff_grouped_vs_ungrouped']:.1e}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": tp.machine_info(), "epochs": EPOCHS,
                                          "batch_size": BATCH, "results": results},
                                         indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
