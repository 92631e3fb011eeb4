"""``fedjax-lite compare``: every (algorithm, aggregator) on identical data and cohorts.

For each seed, every combination gets the same data (generated or split from the seed)
and the same cohort sequence (cohorts are drawn from a key that depends only on the seed
and the round, never on the algorithm), so differences are the methods' own. Every run is
an ordinary ``run`` folder under ``DIR/<method>/seed<k>/``; the summary goes to
``comparison.md``, ``comparison.json`` and ``comparison.png``.
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np

from fedjax_lite.experiment import config as cfg
from fedjax_lite.experiment.outputs import read_metrics, write_json


def method_raw(raw: dict, algorithm: str, aggregator: str | None) -> dict:
    """``raw`` with the algorithm (and aggregator) swapped in; keys that only the base
    config's own algorithm/aggregator take are dropped, and a FedOpt name gets its own
    server optimizer unless the base already names that optimizer."""
    raw = copy.deepcopy(raw)
    algo = dict(raw.get("algorithm") or {})
    algo["name"] = algorithm
    for key, owners in cfg.ALGORITHM_ONLY_KEYS.items():
        if algorithm not in owners:
            algo.pop(key, None)
    expected = cfg.SERVER_OPTIMIZER_OF.get(algorithm)
    server = algo.get("server_optimizer")
    if expected is not None and isinstance(server, dict) and server.get("name") != expected.name:
        algo.pop("server_optimizer")
    raw["algorithm"] = algo
    if algorithm in cfg.RECOMMENDATION_BASELINES:   # non-federated: nothing to aggregate
        raw["aggregator"] = {"name": "mean"}
        raw.pop("privacy", None)
        aggregator = None
    if aggregator is not None:
        agg = dict(raw.get("aggregator") or {})
        agg["name"] = aggregator
        for key, owners in cfg.AGGREGATOR_KEYS.items():
            if aggregator not in owners:
                agg.pop(key, None)
        raw["aggregator"] = agg
        if aggregator not in cfg.DP_AGGREGATORS:     # the privacy section is theirs alone
            raw.pop("privacy", None)
    return raw


def plan(raw: dict, algorithms: list[str], aggregators: list[str] | None,
         seeds: int) -> list[tuple[str, int, cfg.Config]]:
    """Every (method label, seed, validated config); raises ConfigError before any run."""
    if seeds < 1:
        raise cfg.ConfigError(f"--seeds must be >= 1, got {seeds}")
    if not algorithms:
        raise cfg.ConfigError("--algorithms: name at least one algorithm")
    for name in algorithms:
        if name not in cfg.ALGORITHMS:
            raise cfg.ConfigError(f"--algorithms: unknown algorithm {name!r}; allowed: "
                                  f"{', '.join(cfg.ALGORITHMS)}")
    for name in aggregators or []:
        if name not in cfg.AGGREGATORS:
            raise cfg.ConfigError(f"--aggregators: unknown aggregator {name!r}; allowed: "
                                  f"{', '.join(cfg.AGGREGATORS)}")
    base_seed = cfg.parse(raw).seed
    runs = []
    for algorithm in algorithms:
        for aggregator in (aggregators or [None]):
            label = algorithm if aggregator is None else f"{algorithm}+{aggregator}"
            for k in range(seeds):
                r = method_raw(raw, algorithm, aggregator)
                r["seed"] = base_seed + k
                try:
                    runs.append((label, k, cfg.parse(r)))
                except cfg.ConfigError as e:
                    raise cfg.ConfigError(f"{label}: {e}") from None
    return runs


def rounds_to_target(rows: list[dict], target: float | None) -> int | None:
    if target is None:
        return None
    for row in rows:
        if row.get("eval_accuracy") is not None and row["eval_accuracy"] >= target:
            return row["round"]
    return None


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def compare(raw: dict, out_dir: str, *, algorithms: list[str],
            aggregators: list[str] | None = None, seeds: int = 1,
            target_accuracy: float | None = None, progress: bool = True) -> dict:
    from fedjax_lite.experiment.runner import run

    runs = plan(raw, algorithms, aggregators, seeds)
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for label, k, config in runs:
        folder = os.path.join(out_dir, label, f"seed{k}")
        if progress:
            print(f"== {label}, seed {config.seed}", flush=True)
        summary = run(config, folder, progress=progress)
        rows = read_metrics(os.path.join(folder, "metrics.jsonl"))
        results.setdefault(label, []).append({
            "seed": config.seed, "summary": summary, "rows": rows,
            "rounds_to_target": rounds_to_target(rows, target_accuracy)})

    metrics = _metric_names(results)
    table = []
    for label, seed_runs in results.items():
        reached = [r["rounds_to_target"] for r in seed_runs]
        row = {"method": label, "seeds": [r["seed"] for r in seed_runs]}
        for name in metrics:
            mean, std = _mean_std([r["summary"]["final"].get(name) for r in seed_runs])
            row[f"final_{name}_mean"], row[f"final_{name}_std"] = mean, std
        table.append({
            **row, "rounds_to_target": reached,
            "wall_s_mean": float(np.mean([r["summary"]["wall_s"] for r in seed_runs])),
            "clients_per_s_mean": float(np.mean([r["summary"]["clients_per_s"] or 0
                                                 for r in seed_runs])),
            # DP runs: epsilon spent (the same for every seed: it depends on the config)
            "epsilon": _epsilon(seed_runs),
        })
    doc = {"algorithms": algorithms, "aggregators": aggregators, "seeds": seeds,
           "target_accuracy": target_accuracy, "rounds": runs[0][2].rounds,
           "metrics": metrics, "table": table,
           "curves": {label: [{"seed": r["seed"],
                               "round": [row["round"] for row in r["rows"]],
                               **{name: [row.get(name) for row in r["rows"]]
                                  for name in metrics}}
                              for r in seed_runs]
                      for label, seed_runs in results.items()}}
    if "local_only" in results and len(results) > 1:
        from fedjax_lite.experiment.compare_recsys import per_user_vs_local_only
        doc["per_user_vs_local_only"] = per_user_vs_local_only(out_dir, results, runs)
    write_json(os.path.join(out_dir, "comparison.json"), doc)
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write(markdown_table(table, target_accuracy, seeds, metrics))
        if doc.get("per_user_vs_local_only"):
            from fedjax_lite.experiment.compare_recsys import per_user_markdown
            f.write("\n" + per_user_markdown(doc["per_user_vs_local_only"]))
    plot_comparison(os.path.join(out_dir, "comparison.png"), doc)
    if doc.get("per_user_vs_local_only"):
        from fedjax_lite.experiment.compare_recsys import plot_per_user
        plot_per_user(os.path.join(out_dir, "per_user.png"), out_dir, results, runs)
    return doc


# the evaluation metrics a comparison reports, in this order, when the runs have them
REPORTED = ("eval_accuracy", "eval_rmse", "eval_mae", "eval_hr10", "eval_ndcg10",
            "eval_hr10_full", "eval_ndcg10_full", "eval_loss")
LOWER_IS_BETTER = ("eval_rmse", "eval_mae", "eval_loss")


def _metric_names(results: dict) -> list[str]:
    present = {k for seed_runs in results.values() for r in seed_runs
               for k, v in r["summary"]["final"].items() if v is not None}
    return [k for k in REPORTED if k in present]


def _epsilon(seed_runs: list[dict]) -> float | None:
    eps = [(r["summary"].get("privacy") or {}).get("epsilon") for r in seed_runs]
    eps = [e for e in eps if e is not None]
    return max(eps) if eps else None


def _pm(mean, std, digits=4) -> str:
    return "n/a" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


_LABEL = {"eval_accuracy": "final eval accuracy", "eval_loss": "final eval loss",
          "eval_rmse": "final RMSE", "eval_mae": "final MAE", "eval_hr10": "HR@10",
          "eval_ndcg10": "NDCG@10", "eval_hr10_full": "HR@10 full",
          "eval_ndcg10_full": "NDCG@10 full"}


def markdown_table(table: list[dict], target: float | None, seeds: int,
                   metrics: list[str] = ("eval_accuracy", "eval_loss")) -> str:
    first = f" (mean ± std, {seeds} seed{'s' * (seeds > 1)})"
    head = (["method"] + [_LABEL.get(m, m) + (first if i == 0 else "")
                          for i, m in enumerate(metrics)]
            + [f"rounds to {target:g} accuracy" if target is not None else "rounds to target",
               "wall s", "clients/s", "epsilon"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        reached = row["rounds_to_target"]
        if target is None:
            to_target = "-"
        else:
            got = [r for r in reached if r is not None]
            to_target = (f"{np.mean(got):.0f}" if len(got) == len(reached) else
                         f"{np.mean(got):.0f} ({len(got)}/{len(reached)} seeds)" if got
                         else "not reached")
        lines.append("| " + " | ".join(
            [row["method"]]
            + [_pm(row.get(f"final_{m}_mean"), row.get(f"final_{m}_std")) for m in metrics]
            + [to_target, f"{row['wall_s_mean']:.1f}", f"{row['clients_per_s_mean']:,.0f}",
               "-" if row.get("epsilon") is None else f"{row['epsilon']:.3g}"]) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(path: str, doc: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = doc.get("metrics") or ["eval_accuracy", "eval_loss"]
    shown = (metrics[:1] + [m for m in metrics[1:] if m in ("eval_loss", "eval_hr10_full",
                                                            "eval_mae")][:1])[:2]
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4), squeeze=False)
    axes = axes[0]
    for label, seed_curves in doc["curves"].items():
        for ax, key in zip(axes, shown):
            rounds = seed_curves[0]["round"]
            values = np.array([[np.nan if v is None else v for v in c[key]]
                               for c in seed_curves if c["round"] == rounds], float)
            mean = np.nanmean(values, 0)
            line, = ax.plot(rounds, mean, label=label)
            if len(values) > 1:
                ax.fill_between(rounds, np.nanmin(values, 0), np.nanmax(values, 0),
                                color=line.get_color(), alpha=0.2)
    for ax, key in zip(axes, shown):
        ax.set_ylabel(_LABEL.get(key, key).replace("final ", ""))
    if doc.get("target_accuracy") is not None and shown[0] == "eval_accuracy":
        axes[0].axhline(doc["target_accuracy"], color="gray", ls=":", lw=1)
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("mean over seeds; band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
