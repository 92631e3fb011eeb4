"""A 27-member sweep as ONE vmapped program vs the same 27 runs one after another.

Workload: FedProx on synthetic_logistic (1000 clients, ~50 examples x 20 features each),
100 clients per round, 20 rounds, evaluation every 5, checkpoints every 10; the grid is
client learning rate {0.01, 0.03, 0.1} x mu {0, 0.1, 1} x seeds {0, 1, 2} with a fixed
data seed, so all 27 members share one population (``fedjax-lite sweep``'s one program).

Both sides run in this process, end to end (data, compiling, rounds, evaluations,
checkpoints, every output file): ``sweep(...)`` once, and ``runner.run`` for each of the
27 member configs. The persistent compilation cache is on, as the CLI has it, in a fresh
folder: repetition 1 compiles everything (the sequential runs compile one program pair
per (lr, mu) -- the rates are constants of a run's program -- and load it from the cache
for the other two seeds; the sweep compiles one program for all 27), repetition 2 finds
every program in the cache. The order alternates between repetitions. Reported per
repetition: end-to-end seconds, the same without compiling (end to end minus the
summaries' compile_s), the rounds alone (train_s), and the ratios sequential / sweep.
Every member's final eval loss is compared between the two sides.

    python benchmarks/sweep.py [--reps 2] [--out results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from fedjax_lite.experiment.host import configure_host

configure_host()            # every core a JAX device, before jax is imported
os.environ["FEDJAX_LITE_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="sweep_bench_cc_")

import jax  # noqa: E402

from fedjax_lite.experiment.host import enable_compile_cache  # noqa: E402
from fedjax_lite.experiment.outputs import read_metrics  # noqa: E402
from fedjax_lite.experiment.runner import run  # noqa: E402
from fedjax_lite.experiment.sweep import plan, sweep  # noqa: E402

RAW = {"seed": 0, "rounds": 20, "eval_every": 5, "checkpoint_every": 10,
       "data": {"kind": "synthetic_logistic", "num_clients": 1000, "num_features": 20,
                "mean_examples": 50, "seed": 0},
       "algorithm": {"name": "fedprox", "clients_per_round": 100, "local_epochs": 1,
                     "batch_size": 16}}
GRID = ["algorithm.client_optimizer.learning_rate=0.01,0.03,0.1", "algorithm.mu=0,0.1,1"]
SEEDS = "0,1,2"


def run_sweep(folder: str) -> dict:
    t = time.perf_counter()
    doc = sweep(RAW, folder, grids=GRID, seeds=SEEDS, progress=False)
    total = time.perf_counter() - t
    s = json.load(open(os.path.join(folder, "members", doc["members"][0], "summary.json")))
    programs = [g for g in doc["groups"] if g["vmapped"]]
    return {"end_to_end_s": total, "compile_s": s["sweep"]["program_compile_s"],
            "train_s": s["sweep"]["program_train_s"], "programs": len(programs),
            "members": len(doc["members"]),
            "final_eval_loss": {n: read_metrics(os.path.join(folder, "members", n,
                                                             "metrics.jsonl"))[-1]["eval_loss"]
                                for n in doc["members"]}}


def run_sequential(folder: str) -> dict:
    members = plan(RAW, GRID, SEEDS)
    t = time.perf_counter()
    compile_s = train_s = 0.0
    finals = {}
    for m in members:
        summary = run(m.config, os.path.join(folder, m.name), progress=False)
        compile_s += summary["compile_s"]
        train_s += summary["train_s"]
        finals[m.name] = summary["final"]["eval_loss"]
    total = time.perf_counter() - t
    return {"end_to_end_s": total, "compile_s": compile_s, "train_s": train_s,
            "programs": len(members), "members": len(members), "final_eval_loss": finals}


def machine() -> dict:
    from throughput import cpu_model      # (benchmarks/ is on sys.path: the script's dir)
    model = cpu_model()
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
            "git_commit": git("rev-parse", "HEAD").strip(),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip()),
            "load_average_at_start": os.getloadavg()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..",
                                                  "results"))
    args = ap.parse_args(argv)
    enable_compile_cache(True)
    info = machine()
    reps = []
    for rep in range(args.reps):
        order = ("sweep", "sequential") if rep % 2 == 0 else ("sequential", "sweep")
        got = {}
        for side in order:
            folder = tempfile.mkdtemp(prefix=f"sweep_bench_{side}_")
            got[side] = (run_sweep if side == "sweep" else run_sequential)(folder)
            print(f"rep {rep + 1} {side}: {got[side]['end_to_end_s']:.1f} s end to end",
                  file=sys.stderr, flush=True)
        sw, sq = got["sweep"], got["sequential"]
        rel = max(abs(sw["final_eval_loss"][n] - v) / abs(v)
                  for n, v in sq["final_eval_loss"].items())
        no_compile = lambda r: r["end_to_end_s"] - r["compile_s"]
        reps.append({
            "rep": rep + 1, "order": list(order),
            "compile_cache": "cold (fresh folder)" if rep == 0 else "warm",
            "sweep": {k: v for k, v in sw.items() if k != "final_eval_loss"},
            "sequential": {k: v for k, v in sq.items() if k != "final_eval_loss"},
            "speedup_end_to_end": sq["end_to_end_s"] / sw["end_to_end_s"],
            "speedup_without_compile": no_compile(sq) / no_compile(sw),
            "speedup_rounds_only": sq["train_s"] / sw["train_s"],
            "max_rel_diff_final_eval_loss": rel})
    info["load_average_at_end"] = os.getloadavg()    # other processes share the cores
    doc = {"benchmark": "sweep", "workload": {"config": RAW, "grid": GRID, "seeds": SEEDS,
                                              "members": 27},
           "machine": info, "reps": reps, "target_speedup_end_to_end": 5.0}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    md = markdown(doc)
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(md)
    print(md)


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        "# Sweep: 27 members as one vmapped program vs 27 sequential runs\n",
        f"Machine: {m['cpu']}, {m['cores']} cores ({len(m['devices'])} JAX devices), "
        f"JAX {m['jax']}, Python {m['python']}, git {m['git_commit'][:10]}"
        f"{' (uncommitted changes)' if m['git_dirty'] else ''}; load average (1, 5, 15 "
        f"min) at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}, at "
        f"end {', '.join(f'{x:.1f}' for x in m['load_average_at_end'])} (other processes "
        "shared the cores).\n",
        "Workload: FedProx, synthetic_logistic 1000 clients, 100 per round, 20 rounds; "
        "client lr {0.01, 0.03, 0.1} x mu {0, 0.1, 1} x seeds {0, 1, 2}, data.seed 0. "
        "Same process, order alternated per repetition, persistent compilation cache on "
        "(fresh folder at repetition 1).\n",
        "| rep | cache | order | sweep s (end to end) | sequential s | speedup | "
        "without compile: sweep s / sequential s / speedup | rounds only: sweep s / "
        "sequential s / speedup | compile: sweep s / sequential s | max rel diff of final "
        "eval loss |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["reps"]:
        sw, sq = r["sweep"], r["sequential"]
        nc = lambda x: x["end_to_end_s"] - x["compile_s"]
        lines.append(
            f"| {r['rep']} | {r['compile_cache']} | {' then '.join(r['order'])} | "
            f"{sw['end_to_end_s']:.1f} | {sq['end_to_end_s']:.1f} | "
            f"**{r['speedup_end_to_end']:.1f}x** | {nc(sw):.1f} / {nc(sq):.1f} / "
            f"{r['speedup_without_compile']:.2f}x | {sw['train_s']:.2f} / {sq['train_s']:.2f}"
            f" / {r['speedup_rounds_only']:.2f}x | {sw['compile_s']:.1f} / "
            f"{sq['compile_s']:.1f} | {r['max_rel_diff_final_eval_loss']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
