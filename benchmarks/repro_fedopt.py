#!/usr/bin/env python
"""Reproduction 4 (issue 12): adaptive server optimizers, Reddi et al., "Adaptive Federated
Optimization", ICLR 2021: FedAdam, FedYogi, FedAdagrad and FedAvgM vs FedAvg, each at the
best point of a small grid of client x server learning rates, on the 8x8 digits under
Dirichlet(0.1) label skew with the CNN (configs/repro_fedopt_digits.yaml).

Protocol (as Reddi et al., with a much smaller grid): every grid point runs on a tuning
seed (0); a method's best point is the one with the highest mean test accuracy over the
last 10% of rounds (Reddi et al. average the last 100 rounds); the best points are then
rerun on fresh seeds (1, 2, ...) -- those runs are what the table reports, so the
selection does not flatter the reported numbers. The data (partition) is the same for
every seed (``data.seed``); a seed changes init, cohorts and shuffles.

    python benchmarks/repro_fedopt.py [--seeds 2] [--quick] [--out DIR]
"""

from __future__ import annotations

import numpy as np

from repro_common import (REPO, band, command_line, final, late_change, load_config, pm,
                          Recorder, run_variant, with_keys)

CLIENT_LRS = (0.03, 0.1)
EPS = 1e-3                      # tau in Reddi et al.
METHODS = {   # name -> (legend, optax server optimizer, its fixed keys, server lr grid)
    "fedavg": ("FedAvg (server SGD)", "sgd", {}, (0.3, 1.0, 3.0, 10.0)),
    "fedavgm": ("FedAvgM (server SGD, momentum 0.9)", "sgd", {"momentum": 0.9},
                (0.1, 0.3, 1.0, 3.0)),
    # optax's adagrad divides by sqrt(v + eps) from v_0 = initial_accumulator_value:
    # v_0 = tau^2, eps = 3 tau^2 is within 16% of Reddi et al.'s sqrt(v) + tau (v_-1 = tau^2)
    "fedadagrad": ("FedAdagrad (τ=1e-3)", "adagrad",
                   {"initial_accumulator_value": EPS ** 2, "eps": 3 * EPS ** 2},
                   (0.003, 0.01, 0.03, 0.1)),
    "fedadam": ("FedAdam (β=0.9, 0.99, τ=1e-3)", "adam", {"b1": 0.9, "b2": 0.99, "eps": EPS},
                (0.003, 0.01, 0.03, 0.1)),
    "fedyogi": ("FedYogi (β=0.9, 0.99, τ=1e-3)", "yogi", {"b1": 0.9, "b2": 0.99, "eps": EPS},
                (0.003, 0.01, 0.03, 0.1)),
}
COLORS = {"fedavg": "tab:red", "fedavgm": "tab:orange", "fedadagrad": "tab:blue",
          "fedadam": "tab:green", "fedyogi": "tab:purple"}
TUNING_SEED = 0


def variant(base: dict, m: str, client_lr: float, server_lr: float, seed: int) -> dict:
    _, opt, fixed, _ = METHODS[m]
    return with_keys(base, seed=seed, algorithm={
        "name": m, "client_optimizer": {"name": "sgd", "learning_rate": client_lr},
        "server_optimizer": {"name": opt, "learning_rate": server_lr, **fixed}})


def late_mean(v: dict) -> float:
    """Mean over seeds of the mean test accuracy over the last 10% of the rows."""
    vals = []
    for c in v["curves"]:
        acc = c["eval_accuracy"]
        vals.append(float(np.mean(acc[-max(1, len(acc) // 10):])))
    return float(np.mean(vals))


def run(args) -> dict:
    quick = args.quick
    rec = Recorder("repro_fedopt", args.out, quick, args.argv)
    base = load_config("repro_fedopt_digits.yaml")
    if quick:     # one device: a smoke test compiles ~2x faster
        base = with_keys(base, engine={"devices": 1})
    base = with_keys(base, rounds=args.rounds or (3 if quick else base["rounds"]))
    seeds = args.seeds or (1 if quick else 2)
    methods = ["fedavg", "fedadam"] if quick else list(METHODS)
    client_lrs = CLIENT_LRS[1:] if quick else CLIENT_LRS
    grid, best = {}, {}
    for m in methods:
        server_lrs = METHODS[m][3][1:2] if quick else METHODS[m][3]
        for clr in client_lrs:
            for slr in server_lrs:
                v = run_variant(variant(base, m, clr, slr, TUNING_SEED), rec.tmp,
                                f"tune {m} client lr {clr:g} server lr {slr:g}", seeds=1,
                                log=rec.log)
                v.update(client_lr=clr, server_lr=slr, late_mean_accuracy=late_mean(v))
                grid[f"{m}|{clr:g}|{slr:g}"] = v
        pick = max((v for k, v in grid.items() if k.startswith(m + "|")),
                   key=lambda v: v["late_mean_accuracy"])
        best[m] = {"client_lr": pick["client_lr"], "server_lr": pick["server_lr"],
                   "tuning_late_mean_accuracy": pick["late_mean_accuracy"],
                   "at_grid_edge": pick["server_lr"] in (min(METHODS[m][3]),
                                                         max(METHODS[m][3]))}
    final_runs = {}
    for m in methods:
        b = best[m]
        raw = variant(base, m, b["client_lr"], b["server_lr"], TUNING_SEED + 1)
        final_runs[m] = run_variant(raw, rec.tmp, f"best {m} on seeds "
                                    f"{TUNING_SEED + 1}..{TUNING_SEED + seeds}",
                                    seeds=seeds, log=rec.log)
        final_runs[m]["late_mean_accuracy"] = late_mean(final_runs[m])
    doc = {"seeds": seeds, "tuning_seed": TUNING_SEED, "rounds": base["rounds"],
           "methods": methods, "client_lrs": list(client_lrs),
           "server_lrs": {m: list(METHODS[m][3]) for m in methods}, "best": best,
           "table": [{"method": m, **best[m], "final_accuracy": final(final_runs[m]),
                      "final_loss": final(final_runs[m], "eval_loss"),
                      "late_mean_accuracy": final_runs[m]["late_mean_accuracy"]}
                     for m in methods],
           "grid": grid, "final_runs": final_runs}
    return rec.finish(doc, render(doc, rec.out))


def render(doc: dict, out) -> str:
    methods, client_lrs = doc["methods"], doc["client_lrs"]
    for r in doc["table"]:
        r["osc"] = late_change(doc["final_runs"][r["method"]], "eval_accuracy")
    plot(out / "curves.png", doc["final_runs"], doc["best"], methods, doc["seeds"])
    plot_grid(out / "grid.png", doc["grid"], methods, client_lrs)
    return markdown(doc["table"], doc["grid"], methods, client_lrs, doc["seeds"],
                    doc["rounds"])


def markdown(table, grid, methods, client_lrs, seeds, rounds) -> str:
    fedavg = next((r for r in table if r["method"] == "fedavg"), None)
    lines = [f"Best grid point per method (chosen on tuning seed {TUNING_SEED} by mean test "
             f"accuracy over the last 10% of {rounds} rounds), then rerun on {seeds} fresh "
             "seed(s): those runs are reported (mean ± std).", "",
             "'osc': mean |round-to-round change| of the test accuracy over the second "
             "half.", "",
             "| method | client lr | server lr | final test acc | last-10% mean acc | "
             "vs FedAvg | final loss | osc |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(table, key=lambda r: -r["late_mean_accuracy"]):
        diff = (f"{r['late_mean_accuracy'] - fedavg['late_mean_accuracy']:+.3f}"
                if fedavg else "-")
        edge = " (grid edge)" if r["at_grid_edge"] else ""
        lines.append(f"| {r['method']} | {r['client_lr']:g} | {r['server_lr']:g}{edge} | "
                     f"{pm(*r['final_accuracy'])} | {r['late_mean_accuracy']:.3f} | {diff} | "
                     f"{pm(*r['final_loss'])} | {r['osc']:.4f} |")
    lines += ["", f"The grid (tuning seed {TUNING_SEED}; last-10% mean test accuracy):", "",
              "| method | " + " | ".join(f"client lr {c:g}" for c in client_lrs) + " |",
              "|---|" + "---|" * len(client_lrs)]
    for m in methods:
        cells = []
        for c in client_lrs:
            pts = [v for k, v in grid.items() if k.startswith(f"{m}|{c:g}|")]
            cells.append(", ".join(f"{v['server_lr']:g}: {v['late_mean_accuracy']:.3f}"
                                   for v in pts))
        lines.append(f"| {m} (server lr: acc) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path, runs, best, methods, seeds) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for s, m in enumerate(methods):
        label = (f"{METHODS[m][0]}; client lr {best[m]['client_lr']:g}, server lr "
                 f"{best[m]['server_lr']:g}")
        for ax, key in zip(axes, ("eval_accuracy", "eval_loss")):
            band(ax, runs[m], key, label=label, style=s, color=COLORS[m])
    axes[0].set_ylabel("test accuracy (fraction)")
    axes[1].set_ylabel("held-out loss (cross-entropy, nats)")
    axes[0].set_ylim(0.3, 1.0)
    for ax in axes:
        ax.set_xlabel("communication round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Adaptive server optimizers (Reddi et al. 2021), best grid point each: CNN "
                 "on 8x8 digits, Dirichlet(0.1), 20 clients, 5 per round, E=1, B=10\n"
                 f"mean over {seeds} fresh seed(s)"
                 + (", band = min..max" if seeds > 1 else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_grid(path, grid, methods, client_lrs) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.4),
                             sharey=True, squeeze=False)
    for ax, m in zip(axes[0], methods):
        for i, c in enumerate(client_lrs):
            pts = sorted((v["server_lr"], v["late_mean_accuracy"]) for k, v in grid.items()
                         if k.startswith(f"{m}|{c:g}|"))
            ax.plot(*zip(*pts), marker="os"[i % 2], ls=["-", "--"][i % 2],
                    label=f"client lr {c:g}")
        ax.set_xscale("log")
        ax.set_title(METHODS[m][0].split(" (")[0], fontsize=9)
        ax.set_xlabel("server learning rate (log)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"mean test accuracy, last 10% of rounds\n(tuning seed {TUNING_SEED})",
                          fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Learning-rate grid of each method", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    return command_line(__doc__, argv, run, render,
                        quick_help="3 rounds, 2 methods, 1 grid point",
                        seeds_help="fresh seeds (default 2; quick 1)",
                        rounds_help="default: the config's (150)",
                        out=REPO / "results" / "repro_fedopt")


if __name__ == "__main__":
    main()
