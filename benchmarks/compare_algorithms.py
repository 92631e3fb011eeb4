#!/usr/bin/env python
"""Algorithm comparison: convergence on Synthetic(alpha, beta) and round throughput.

Part 1 -- convergence (``fedjax_lite.experiment.compare.compare``, in this process):
  FedAvg, FedProx (mu = 1), SCAFFOLD, FedAdam, FedYogi on Synthetic(1,1) and Synthetic(0,0)
  of Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020), with the
  paper's synthetic setup (configs/compare_synthetic.yaml: 30 clients, 10 per round,
  multinomial logistic regression 60 -> 10, E = 20, batch 10, client SGD lr 0.01, 200
  rounds, 80/20 split). FedAdam / FedYogi server learning rates are first picked from
  Reddi et al.'s grid on a tuning seed that is not one of the reported seeds ("sweep").
  A straggler variant (the paper's Fig. 1 setting: 90% of each cohort are stragglers
  running E_k ~ U{1..E} epochs) compares FedAvg (drops stragglers), FedProx mu = 0 and
  FedProx mu = 1 (both aggregate the stragglers' partial work).

  Every run goes to a temporary folder; only comparison.{md,json,png} and each run's
  metrics.jsonl are copied to results/compare/<dataset>/.

Part 2 -- throughput: one round of every algorithm on workload W of
  benchmarks/throughput.py (C clients x 64 examples x 100 features, binary logistic
  regression, 5 local epochs of batch 16, full participation), built from a parsed config
  through ``experiment.builders.build_algorithm`` exactly as the CLI builds it, each
  (algorithm, C) in a fresh subprocess; clients/s = C / median round time and the ratio
  to FedAvg.

    python benchmarks/compare_algorithms.py                 # everything (~20 min, 2 cores)
    python benchmarks/compare_algorithms.py --parts throughput --sizes 1000
    python benchmarks/compare_algorithms.py --quick --out /tmp/cmp   # smoke test (~2 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "compare_synthetic.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (workload W, machine_info, rss; imports no JAX)

DATASETS = {  # name -> data overrides (Li et al. Sec. 5.1)
    "synthetic_1_1": {"alpha": 1.0, "beta": 1.0, "iid": False},
    "synthetic_0_0": {"alpha": 0.0, "beta": 0.0, "iid": False},
}
CONVERGENCE_ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedadam", "fedyogi")
FEDPROX_MU = 1.0                       # the paper's best mu on the synthetic data
FEDOPT = {"fedadam": "adam", "fedyogi": "yogi"}
# Reddi et al. (ICLR 2021), App. D: server lr grid 10^{-3, -2.5, ..., 1}, tau (= optax
# eps) 10^{-5..-1}; we search the middle of the lr grid at tau = 1e-3, b1 0.9, b2 0.99.
SWEEP_LRS = (0.01, 0.0316, 0.1)
FEDOPT_EPS = 1e-3
SMOOTH = 10                            # rounds, for the local train loss panel
TUNING_SEED = 10                       # not a reported seed (reported: 0, 1, ...)
STRAGGLER_FRACTION = 0.9

THROUGHPUT_ALGORITHMS = ("fedavg", "fedsgd", "fedprox", "scaffold", "fednova", "fedadam",
                         "fedyogi")


# ---- configs ----------------------------------------------------------------------------
def base_raw(rounds: int | None = None) -> dict:
    from fedjax_lite.experiment import config as cfg
    raw = cfg.load_raw(str(BASE_CONFIG))
    if rounds is not None:
        raw["rounds"] = rounds
    return raw


def dataset_raw(raw: dict, dataset: str) -> dict:
    raw = copy.deepcopy(raw)
    raw["data"] = {**raw["data"], **DATASETS[dataset]}
    return raw


def variant_raw(raw: dict, algorithm: str, *, fedopt_lr: dict | None = None,
                stragglers: str | None = None) -> dict:
    """``raw`` for one method: the algorithm name, FedProx's mu, a FedOpt server
    optimizer with its learning rate, or a straggler setting."""
    raw = copy.deepcopy(raw)
    algo = raw.setdefault("algorithm", {})
    algo["name"] = algorithm
    if algorithm in FEDOPT:
        algo["server_optimizer"] = {"name": FEDOPT[algorithm],
                                    "learning_rate": (fedopt_lr or {}).get(algorithm, 0.01),
                                    "b1": 0.9, "b2": 0.99, "eps": FEDOPT_EPS}
    if algorithm == "fedprox":
        algo["mu"] = FEDPROX_MU
    if stragglers is not None:  # FedAvg's straggler rule = fedprox, mu 0, drop stragglers
        algo["name"] = "fedprox"
        algo["straggler_fraction"] = STRAGGLER_FRACTION
        algo["mu"] = {"fedavg_drop": 0.0, "fedprox_mu0": 0.0, "fedprox_mu1": 1.0}[stragglers]
        algo["drop_stragglers"] = stragglers == "fedavg_drop"
    return raw


# ---- convergence ------------------------------------------------------------------------
def run_group(methods: list[tuple[str, str, dict]], tmp: str, out: Path, *, seeds: int,
              target: float | None, title: str) -> dict:
    """Runs each (label, algorithm, raw) with ``compare()`` into ``tmp``, merges their
    comparison docs under the labels, writes comparison.{md,json,png} and every run's
    metrics.jsonl to ``out``. One compare() call per method: compare() swaps the algorithm
    name into a shared base config, so per-method server optimizers (FedAdam's and
    FedYogi's learning rates) and straggler settings need their own base config."""
    from fedjax_lite.experiment.compare import compare, markdown_table, plot_comparison
    from fedjax_lite.experiment.outputs import write_json
    docs = {}
    for label, algorithm, raw in methods:
        d = os.path.join(tmp, label)
        t0 = time.time()
        print(f"--- {title}: {label} ({algorithm}), {seeds} seed(s)", flush=True)
        doc = compare(raw, d, algorithms=[algorithm], seeds=seeds, target_accuracy=target,
                      progress=False)
        docs[label] = (algorithm, doc, d, time.time() - t0)
        row = doc["table"][0]
        print(f"    final eval accuracy {row['final_eval_accuracy_mean']:.4f} ± "
              f"{row['final_eval_accuracy_std']:.4f}  [{time.time() - t0:.0f} s]", flush=True)
    first = next(iter(docs.values()))[1]
    table, curves = [], {}
    out.mkdir(parents=True, exist_ok=True)
    for label, (algorithm, doc, d, _) in docs.items():
        row = dict(doc["table"][0])
        row["method"] = label
        table.append(row)
        curves[label] = doc["curves"][algorithm]
        for k in range(seeds):
            src = os.path.join(d, algorithm, f"seed{k}", "metrics.jsonl")
            shutil.copy(src, out / f"{label}.seed{k}.metrics.jsonl")
    merged = {"algorithms": [m[1] for m in methods], "labels": [m[0] for m in methods],
              "aggregators": None, "seeds": seeds, "target_accuracy": target,
              "rounds": first["rounds"], "table": table, "curves": curves,
              "configs": {label: raw for label, _, raw in methods},
              "note": "merged from one compare() call per method (see "
                      "benchmarks/compare_algorithms.py)"}
    write_json(str(out / "comparison.json"), merged)
    (out / "comparison.md").write_text(markdown_table(table, target, seeds))
    plot_comparison(str(out / "comparison.png"), merged)
    return merged


def stability(out: Path, label: str, seeds: int, rounds: int) -> dict:
    """Numbers the paper's curves show qualitatively, from the copied metrics.jsonl:
    best accuracy, last-half oscillation of eval accuracy/loss, final local train loss."""
    per_seed = []
    for k in range(seeds):
        rows = [json.loads(l) for l in open(out / f"{label}.seed{k}.metrics.jsonl")]
        late = [r for r in rows if r["round"] > rounds // 2]
        acc = np.array([r["eval_accuracy"] for r in late])
        loss = np.array([r["eval_loss"] for r in late])
        per_seed.append({
            "best_eval_accuracy": max(r["eval_accuracy"] for r in rows),
            "late_acc_mean_abs_change": float(np.mean(np.abs(np.diff(acc)))) if len(acc) > 1
            else None,
            "late_acc_min": float(acc.min()), "late_loss_max": float(loss.max()),
            "final_train_loss": rows[-1]["train_loss"],
            "final_eval_accuracy": rows[-1]["eval_accuracy"],
        })
    summary = {k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]}
    summary["final_eval_accuracy_per_seed"] = [s["final_eval_accuracy"] for s in per_seed]
    return summary


def sweep_fedopt(raw: dict, tmp: str, out: Path, rounds: int) -> dict:
    """Server lr of FedAdam / FedYogi from SWEEP_LRS on Synthetic(1,1), TUNING_SEED:
    the lr with the best mean eval accuracy over the last 20% of rounds."""
    from fedjax_lite.experiment.compare import compare
    raw = dataset_raw(raw, "synthetic_1_1")
    raw["seed"] = TUNING_SEED
    raw["rounds"] = rounds
    res, chosen = {}, {}
    for algorithm in FEDOPT:
        res[algorithm] = {}
        for lr in SWEEP_LRS:
            r = variant_raw(raw, algorithm, fedopt_lr={algorithm: lr})
            doc = compare(r, os.path.join(tmp, f"{algorithm}_{lr}"), algorithms=[algorithm],
                          seeds=1, progress=False)
            acc = doc["curves"][algorithm][0]["eval_accuracy"]
            tail = acc[-max(1, len(acc) // 5):]
            res[algorithm][str(lr)] = {"late_mean_eval_accuracy": float(np.mean(tail)),
                                      "final_eval_accuracy": acc[-1],
                                      "final_eval_loss": doc["curves"][algorithm][0]["eval_loss"][-1]}
            print(f"    sweep {algorithm} lr={lr:<7g} late-mean acc "
                  f"{np.mean(tail):.4f}  final {acc[-1]:.4f}", flush=True)
        chosen[algorithm] = float(max(SWEEP_LRS, key=lambda lr: res[algorithm][str(lr)]
                                      ["late_mean_eval_accuracy"]))
    doc = {"dataset": "synthetic_1_1", "seed": TUNING_SEED, "rounds": rounds,
           "grid_learning_rate": list(SWEEP_LRS), "eps": FEDOPT_EPS, "b1": 0.9, "b2": 0.99,
           "criterion": "mean eval accuracy over the last 20% of rounds",
           "results": res, "chosen": chosen}
    out.mkdir(parents=True, exist_ok=True)
    (out / "fedopt_lr_sweep.json").write_text(json.dumps(doc, indent=2) + "\n")
    return chosen


def summary_table(groups: dict[str, dict], extra: dict[str, dict]) -> str:
    head = ["dataset", "method", "final acc (mean ± std)", "per seed", "best acc (seed mean)",
            "final eval loss",
            "rounds to target", "late acc |Δ|/round", "late acc min", "late loss max",
            "final local train loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, doc in groups.items():
        target = doc["target_accuracy"]
        for row in doc["table"]:
            s = extra[name][row["method"]]
            got = [r for r in row["rounds_to_target"] if r is not None]
            reach = ("not reached" if not got else f"{np.mean(got):.0f}" if
                     len(got) == len(row["rounds_to_target"]) else
                     f"{np.mean(got):.0f} ({len(got)}/{len(row['rounds_to_target'])})")
            lines.append("| " + " | ".join([
                name, row["method"],
                f"{row['final_eval_accuracy_mean']:.4f} ± {row['final_eval_accuracy_std']:.4f}",
                " / ".join(f"{a:.3f}" for a in s["final_eval_accuracy_per_seed"]),
                f"{s['best_eval_accuracy']:.4f}",
                f"{row['final_eval_loss_mean']:.3f} ± {row['final_eval_loss_std']:.3f}",
                f"{reach} (≥{target:g})", f"{s['late_acc_mean_abs_change']:.4f}",
                f"{s['late_acc_min']:.4f}", f"{s['late_loss_max']:.3f}",
                f"{s['final_train_loss']:.4f}"]) + " |")
    return "\n".join(lines) + "\n"


def plot_overview(groups: dict[str, dict], out: Path, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(groups), 3, figsize=(15, 3.6 * len(groups)), squeeze=False)
    for i, (name, doc) in enumerate(groups.items()):
        d = out / name
        for label, seed_curves in doc["curves"].items():
            rounds = seed_curves[0]["round"]
            for j, key in enumerate(("eval_accuracy", "eval_loss")):
                v = np.array([c[key] for c in seed_curves], float)
                line, = axes[i, j].plot(rounds, v.mean(0), label=label, lw=1.2)
                if len(v) > 1:
                    axes[i, j].fill_between(rounds, v.min(0), v.max(0),
                                            color=line.get_color(), alpha=0.15)
            tl = [[json.loads(l)["train_loss"] for l in open(d / f"{label}.seed{k}.metrics.jsonl")]
                  for k in range(len(seed_curves))]
            tl = np.nanmean(np.array([[np.nan if x is None else x for x in t[1:]] for t in tl],
                                     float), 0)
            w = min(SMOOTH, len(tl))
            axes[i, 2].plot(rounds[w:], np.convolve(tl, np.ones(w) / w, "valid"), label=label,
                            lw=1.2)
        for j, ylab in enumerate(("eval accuracy", "eval loss (test split)",
                                  f"local train loss ({SMOOTH}-round moving mean)")):
            axes[i, j].set_title(f"{name}: {ylab}", fontsize=9)
            axes[i, j].set_xlabel("round")
            axes[i, j].grid(alpha=0.3)
        axes[i, 1].set_yscale("log")
        axes[i, 2].set_yscale("log")
        axes[i, 0].legend(fontsize=7)
    fig.suptitle("mean over seeds; band = min..max over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def convergence(args, out: Path) -> dict:
    raw = base_raw(args.rounds)
    rounds = raw["rounds"]
    tmp = tempfile.mkdtemp(prefix="fedjax_compare_")
    t_start = time.time()
    try:
        if "sweep" in args.parts:
            print(f"== FedAdam/FedYogi server lr sweep {SWEEP_LRS} (Synthetic(1,1), seed "
                  f"{TUNING_SEED})", flush=True)
            fedopt_lr = sweep_fedopt(raw, os.path.join(tmp, "sweep"), out, args.sweep_rounds
                                     or rounds)
        else:
            prev = out / "fedopt_lr_sweep.json"
            fedopt_lr = (json.loads(prev.read_text())["chosen"] if prev.exists()
                         else {a: 0.01 for a in FEDOPT})
        print(f"FedOpt server learning rates: {fedopt_lr}", flush=True)
        groups = {}
        if "convergence" in args.parts:
            for name in DATASETS:
                r = dataset_raw(raw, name)
                methods = [(a, a, variant_raw(r, a, fedopt_lr=fedopt_lr))
                           for a in CONVERGENCE_ALGORITHMS]
                groups[name] = run_group(methods, os.path.join(tmp, name), out / name,
                                         seeds=args.seeds, target=args.target, title=name)
        if "stragglers" in args.parts:
            name = "synthetic_1_1_stragglers90"
            r = dataset_raw(raw, "synthetic_1_1")
            # fedavg_drop: stragglers get weight 0 (FedAvg's rule in the paper); the
            # fedprox variants aggregate the stragglers' partial work
            methods = [(key, "fedprox", variant_raw(r, "fedprox", stragglers=key))
                       for key in ("fedavg_drop", "fedprox_mu0", "fedprox_mu1")]
            groups[name] = run_group(methods, os.path.join(tmp, name), out / name,
                                     seeds=args.seeds, target=args.target, title=name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not groups:
        return {}
    return report(args, out, groups, rounds, fedopt_lr, time.time() - t_start)


def report(args, out: Path, groups: dict, rounds: int, fedopt_lr: dict, wall_s) -> dict:
    """convergence.{md,json,png} from the groups' comparison docs and copied metrics."""
    extra = {name: {row["method"]: stability(out / name, row["method"], args.seeds, rounds)
                    for row in doc["table"]} for name, doc in groups.items()}
    txt = summary_table(groups, extra)
    print()
    print(txt)
    plot_overview(groups, out, out / "convergence.png")
    doc = {"benchmark": "convergence of FL algorithms on Synthetic(alpha, beta)",
           "machine": tp.machine_info(), "base_config": str(BASE_CONFIG.relative_to(REPO)),
           "rounds": rounds, "seeds": list(range(args.seeds)), "fedprox_mu": FEDPROX_MU,
           "fedopt_server": {a: {"name": FEDOPT[a], "learning_rate": fedopt_lr[a], "b1": 0.9,
                                 "b2": 0.99, "eps": FEDOPT_EPS} for a in FEDOPT},
           "straggler_fraction": STRAGGLER_FRACTION, "target_accuracy": args.target,
           "late_window": f"rounds {rounds // 2 + 1}..{rounds}",
           "summary": {name: [{**row, **extra[name][row["method"]]} for row in doc["table"]]
                       for name, doc in groups.items()},
           "table": txt, "wall_s": wall_s}
    (out / "convergence.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "convergence.md").write_text(txt)
    return doc


# ---- throughput -------------------------------------------------------------------------
def throughput_config(algorithm: str, C: int):
    """Workload W as a parsed Config, names resolved as the CLI resolves them."""
    from fedjax_lite.experiment import config as cfg
    from fedjax_lite.experiment.compare import method_raw
    raw = {"seed": 0,
           "data": {"kind": "synthetic_logistic", "num_clients": C,
                    "num_features": tp.DIM},            # unused: W's data is made below
           "model": {"kind": "logistic_regression"},
           "algorithm": {"name": "fedavg", "clients_per_round": C,
                         "local_epochs": tp.EPOCHS, "batch_size": tp.BATCH,
                         "client_optimizer": {"name": "sgd", "learning_rate": tp.CLIENT_LR},
                         "server_optimizer": {"name": "sgd", "learning_rate": tp.SERVER_LR}},
           "engine": {"chunk_size": "auto", "devices": "auto"}}
    raw = method_raw(raw, algorithm, None)   # FedOpt names get their own server optimizer
    if algorithm == "fedprox":
        raw["algorithm"]["mu"] = FEDPROX_MU
    return cfg.parse(raw)


def run_one(algorithm: str, C: int, args) -> dict:
    import gc

    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from fedjax_lite.core import build_round
    from fedjax_lite.experiment import config as cfg
    from fedjax_lite.experiment.builders import build_algorithm, build_model, engine_options

    config = throughput_config(algorithm, C)
    x, y, n = tp.make_data(C)
    info: dict = {"algorithm": algorithm, "C": C, "loadavg_start": os.getloadavg(),
                  "config_algorithm": cfg.to_dict(config)["algorithm"]}
    model = build_model(config, (tp.DIM,))
    engine = engine_options(config.engine)
    info["engine"] = {"chunk_size": engine.chunk_size, "unroll": engine.unroll,
                      "devices": None if engine.mesh is None
                      else [str(d) for d in engine.mesh.devices]}
    alg = build_algorithm(config, model, engine, num_clients=C)
    round_fn = jax.jit(build_round(alg, num_clients=C, clients_per_round=C))
    state = alg.init(model.init(jax.random.key(0)))
    where = (NamedSharding(engine.mesh, PartitionSpec()) if engine.mesh is not None
             else jax.local_devices()[0])
    population = jax.device_put({"x": x, "y": y, "n": n}, where)
    jax.block_until_ready(population)
    del x
    gc.collect()
    root = jax.random.key(1)
    times = []
    for r in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        state, metrics = round_fn(state, population, jax.random.fold_in(root, r))
        jax.block_until_ready(state)
        dt = time.perf_counter() - t0
        if r == 0:
            info["first_call_s"] = dt
        if r >= args.warmup:
            times.append(dt)
    med = statistics.median(times)
    info.update(times_s=times, median_s=med, min_s=min(times), clients_per_s=C / med,
                clients_per_s_best=C / min(times),
                final_train_loss=float(metrics["train_loss"]),
                state_mb=sum(a.nbytes for a in jax.tree.leaves(state)) / 2**20,
                peak_rss_mb=tp.rss_mb(), loadavg_end=os.getloadavg(),
                cpu_pressure=tp.cpu_pressure())
    return info


def throughput(args, out: Path) -> dict:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    algorithms = [a for a in args.algorithms.split(",") if a]
    results, t_start = [], time.time()
    for C in sizes:
        for algorithm in algorithms:
            t0 = time.time()
            argv = [sys.executable, os.path.abspath(__file__), "--one", algorithm, str(C),
                    "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
            r, err = tp.run_child(argv)
            if r is None:
                print(f"{algorithm:9s} C={C:6d}: FAILED " + err.replace("\n", " / "))
                results.append({"algorithm": algorithm, "C": C, "error": err})
                continue
            r["process_wall_s"] = time.time() - t0
            results.append(r)
            print(f"{algorithm:9s} C={C:6d}: {r['clients_per_s']:>10,.0f} clients/s  median "
                  f"{r['median_s'] * 1e3:8.2f} ms  min {r['min_s'] * 1e3:8.2f} ms  first "
                  f"{r['first_call_s']:5.1f} s  peak {r['peak_rss_mb']:5.0f} MB  load "
                  f"{r['loadavg_end'][0]:.1f}  [{r['process_wall_s']:.0f} s]", flush=True)
    by = {(r["algorithm"], r["C"]): r for r in results}
    for r in results:
        base = by.get(("fedavg", r["C"]))
        if "error" not in r and base and "error" not in base:
            r["ratio_to_fedavg"] = r["clients_per_s"] / base["clients_per_s"]
            r["meets_target"] = r["ratio_to_fedavg"] >= 1 / 1.5
    txt = throughput_table(results, sizes, algorithms)
    print()
    print(txt)
    doc = {"benchmark": "throughput of one round per algorithm, workload W",
           "machine": tp.machine_info(),
           "workload": {"name": "W", "examples_per_client": tp.N_EX, "features": tp.DIM,
                        "model": "binary logistic regression", "local_epochs": tp.EPOCHS,
                        "batch_size": tp.BATCH, "client_optimizer": f"sgd({tp.CLIENT_LR})",
                        "server_optimizer": "sgd(1.0); fedadam/fedyogi: their config "
                                            "defaults (lr 0.01, b1 0.9, b2 0.99, eps 1e-3)",
                        "fedprox_mu": FEDPROX_MU, "participation": "full (cohort = population)",
                        "scaffold": "population-sized control variates c_i gathered and "
                                    "scattered inside the jitted round (no buffer donation)",
                        "fedsgd": "one full-batch gradient per client (no local epochs)"},
           "method": {"metric": "clients_per_s = C / median round time (training, "
                               "aggregation, server step; no compile, no evaluation)",
                      "repeats": args.repeats, "warmup_rounds": args.warmup,
                      "build": "experiment.builders.build_algorithm from a parsed config "
                               "(names resolved as the CLI does); fresh subprocess per "
                               "(algorithm, C); engine as the CLI runs it (every core a "
                               "device, chunk_size auto = 64)",
                      "target": "ratio_to_fedavg >= 1/1.5 (within 1.5x of FedAvg)"},
           "results": results, "table": txt, "total_wall_s": time.time() - t_start}
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput_algorithms.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot_throughput(results, sizes, algorithms, out / "throughput_algorithms.png")
    return doc


def throughput_table(results, sizes, algorithms) -> str:
    by = {(r["algorithm"], r["C"]): r for r in results}
    head = ["algorithm"]
    for c in sizes:
        head += [f"C={c} clients/s", f"C={c} ms/round", f"C={c} vs FedAvg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in algorithms:
        row = [a]
        for c in sizes:
            r = by.get((a, c))
            if r is None or "error" in r:
                row += ["error" if r else "-", "-", "-"]
                continue
            ratio = r.get("ratio_to_fedavg")
            mark = "" if ratio is None or ratio >= 1 / 1.5 else " ✗"
            row += [f"{r['clients_per_s']:,.0f}", f"{r['median_s'] * 1e3:.1f}",
                    "-" if ratio is None else f"{ratio:.2f}{mark}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_throughput(results, sizes, algorithms, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / len(sizes)
    by = {(r["algorithm"], r["C"]): r for r in results if "error" not in r}
    for i, c in enumerate(sizes):
        vals = [by[(a, c)]["clients_per_s"] if (a, c) in by else 0 for a in algorithms]
        ax.bar(np.arange(len(algorithms)) + (i - (len(sizes) - 1) / 2) * width, vals, width,
               label=f"C={c}")
        if ("fedavg", c) in by:
            ax.axhline(by[("fedavg", c)]["clients_per_s"] / 1.5, color=f"C{i}", ls=":", lw=1)
    ax.set_xticks(np.arange(len(algorithms)))
    ax.set_xticklabels(algorithms)
    ax.set_yscale("log")
    ax.set_ylabel("clients / s (median round)")
    ax.set_title("one round per algorithm, workload W, CPU (dotted: FedAvg / 1.5)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- driver -----------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="sweep,convergence,stragglers,throughput",
                    help="comma-separated subset of sweep,convergence,stragglers,throughput; "
                         "or 'summarize': rebuild convergence.{md,json,png} from --out")
    ap.add_argument("--out", default=str(REPO / "results" / "compare"))
    ap.add_argument("--seeds", type=int, default=2, help="seeds per method (0, 1, ...)")
    ap.add_argument("--rounds", type=int, default=None, help="default: the config's (200)")
    ap.add_argument("--sweep-rounds", type=int, default=None, help="default: --rounds")
    ap.add_argument("--target", type=float, default=0.75,
                    help="eval accuracy for 'rounds to target'")
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--algorithms", default=",".join(THROUGHPUT_ALGORITHMS),
                    help="throughput: algorithms (fedavg first: the ratio's reference)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds (compile + warm-up)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 10 rounds, 1 seed, C=200, 3 timed rounds")
    ap.add_argument("--one", nargs=2, metavar=("ALGORITHM", "C"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    if args.quick:
        args.rounds, args.seeds, args.sizes, args.repeats = args.rounds or 10, 1, "200", 3
    if args.repeats < 5 and not (args.quick or args.one):
        ap.error("--repeats must be >= 5 (median of >= 5 rounds)")

    # as the CLI does, before JAX is imported: every CPU core a device, glibc heap kept
    from fedjax_lite.experiment.host import configure_host
    configure_host()
    if args.one:
        res = run_one(args.one[0], int(args.one[1]), args)
        print("RESULT " + json.dumps(res), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.parts == ["summarize"]:   # rebuild convergence.* from the outputs in --out
        names = [*DATASETS, "synthetic_1_1_stragglers90"]
        groups = {n: json.loads((out / n / "comparison.json").read_text()) for n in names
                  if (out / n / "comparison.json").exists()}
        prev = json.loads((out / "convergence.json").read_text())
        args.seeds, args.target = len(prev["seeds"]), prev["target_accuracy"]
        report(args, out, groups, prev["rounds"],
               {a: v["learning_rate"] for a, v in prev["fedopt_server"].items()},
               prev["wall_s"])
        return
    if {"sweep", "convergence", "stragglers"} & set(args.parts):
        convergence(args, out)
        print(f"[convergence parts: {time.time() - t0:.0f} s]", flush=True)
    if "throughput" in args.parts:
        t1 = time.time()
        throughput(args, out)
        print(f"[throughput: {time.time() - t1:.0f} s]", flush=True)
    print(f"wrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
