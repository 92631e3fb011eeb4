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
import sys

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


def scope_keys(raw: dict, algorithms: list[str],
               aggregators: list[str] | None) -> tuple[dict, list[str]]:
    """The base config's method-specific keys (``algorithm.mu``, ``aggregator.trim``, ...)
    apply to the compared methods that take them and are dropped for the others. A key
    that neither a compared method nor the base's own method takes is an error.

    Returns (the base with the keys its own algorithm/aggregator does not take removed --
    what validates the shared settings --, notes on what is dropped for which methods)."""
    base, notes = copy.deepcopy(raw), []
    sections = [("algorithm", algorithms, cfg.ALGORITHM_ONLY_KEYS, "fedavg")]
    if aggregators:
        sections.append(("aggregator", aggregators, cfg.AGGREGATOR_KEYS, "mean"))
    for section, names, only, default in sections:
        given = base.get(section)
        if not isinstance(given, dict):
            continue
        own = given.get("name", default)
        for key, owners in only.items():
            if key not in given:
                continue
            takers = [n for n in names if n in owners]
            if not takers and own not in owners:
                raise cfg.ConfigError(
                    f"config key '{section}.{key}' applies only to {section}.name in "
                    f"({', '.join(owners)}); none of the compared {section}s "
                    f"({', '.join(names)}) takes it")
            others = [n for n in names if n not in owners]
            if others:
                notes.append(f"{section}.{key} (for {', '.join(others)})")
            if own not in owners:
                given.pop(key)
    return base, notes


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
    base, _ = scope_keys(raw, algorithms, aggregators)
    base_seed = cfg.parse(base).seed
    from fedjax_lite.experiment.config_checks import (check_config_cohort,
                                                      check_population_memory)
    runs = []
    for algorithm in algorithms:
        for aggregator in (aggregators or [None]):
            label = algorithm if aggregator is None else f"{algorithm}+{aggregator}"
            for k in range(seeds):
                r = method_raw(raw, algorithm, aggregator)
                r["seed"] = base_seed + k
                try:
                    config = cfg.parse(r)
                    check_config_cohort(config)        # krum / multi_krum vs the cohort
                    check_population_memory(config)    # before any run writes anything
                    runs.append((label, k, config))
                except cfg.ConfigError as e:
                    raise cfg.ConfigError(f"{label}: {e}") from None
    return runs


def _finished(folder: str, config: cfg.Config) -> dict | None:
    """The summary of a run in ``folder`` that completed ``config`` (same resolved
    config, all rounds), else None."""
    import json
    try:
        with open(os.path.join(folder, "summary.json")) as f:
            summary = json.load(f)
        saved = cfg.to_dict(cfg.parse(cfg.load_raw(os.path.join(folder, "config.yaml"))))
    except (OSError, ValueError, cfg.ConfigError):
        return None
    done = summary.get("rounds") == config.rounds and (summary.get("final") or {}).get(
        "round") == config.rounds
    return summary if done and saved == cfg.to_dict(config) else None


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
            target_accuracy: float | None = None, progress: bool = True,
            interrupts=None, resume: bool = False) -> dict:
    """Runs every method and seed (``plan``) and writes the comparison. ``resume``: runs
    that finished (their summary.json says so) are read, not rerun; unfinished ones
    continue from their checkpoints; missing ones start."""
    from fedjax_lite.experiment.runner import run

    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise cfg.ConfigError(f"--target-accuracy must be in (0, 1], got {target_accuracy:g}")
    runs = plan(raw, algorithms, aggregators, seeds)
    notes = scope_keys(raw, algorithms, aggregators)[1]
    if notes:
        print("fedjax-lite compare: method-specific keys dropped where they do not apply: "
              + "; ".join(notes), file=sys.stderr)
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for label, k, config in runs:
        folder = os.path.join(out_dir, label, f"seed{k}")
        if progress:
            print(f"== {label}, seed {config.seed}", file=sys.stderr, flush=True)
        summary = _finished(folder, config) if resume else None
        if summary is None:
            holds_run = os.path.isdir(os.path.join(folder, "checkpoints"))
            summary = run(config, folder, progress=progress, interrupts=interrupts,
                          resume=resume and holds_run)
        elif progress:
            print(f"   finished earlier: {folder}", file=sys.stderr, flush=True)
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
            "compile_s_mean": float(np.mean([r["summary"].get("compile_s") or 0
                                             for r in seed_runs])),
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
        doc["per_user_vs_local_only"] = per_user_vs_local_only(out_dir, results)
    write_json(os.path.join(out_dir, "comparison.json"), doc)
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write(markdown_table(table, target_accuracy, seeds, metrics))
        if doc.get("per_user_vs_local_only"):
            from fedjax_lite.experiment.compare_recsys import per_user_markdown
            f.write("\n" + per_user_markdown(doc["per_user_vs_local_only"]))
    plot_comparison(os.path.join(out_dir, "comparison.png"), doc)
    if doc.get("per_user_vs_local_only"):
        from fedjax_lite.experiment.compare_recsys import plot_per_user
        plot_per_user(os.path.join(out_dir, "per_user.png"), out_dir, results)
    return doc


# the evaluation metrics a comparison reports, in this order, when the runs have them
REPORTED = ("eval_accuracy", "eval_rmse", "eval_mae", "eval_hr10", "eval_ndcg10",
            "eval_hr10_full", "eval_ndcg10_full", "eval_loss",
            "eval_personal_accuracy")         # ditto's personal models (n/a for others)
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
          "eval_ndcg10_full": "NDCG@10 full",
          "eval_personal_accuracy": "final personal accuracy"}


def markdown_table(table: list[dict], target: float | None, seeds: int,
                   metrics: list[str] = ("eval_accuracy", "eval_loss")) -> str:
    first = f" (mean ± std, {seeds} seed{'s' * (seeds > 1)})"
    head = (["method"] + [_LABEL.get(m, m) + (first if i == 0 else "")
                          for i, m in enumerate(metrics)]
            + [f"rounds to {target:g} accuracy" if target is not None else "rounds to target",
               "wall s (training + evaluation)", "compile s", "clients/s", "epsilon"])
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
            + [to_target, f"{row['wall_s_mean']:.1f}", f"{row.get('compile_s_mean', 0):.1f}",
               f"{row['clients_per_s_mean']:,.0f}",
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
    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    for i, (label, seed_curves) in enumerate(doc["curves"].items()):
        for ax, key in zip(axes, shown):
            rounds = seed_curves[0]["round"]
            values = np.array([[np.nan if v is None else v for v in c[key]]
                               for c in seed_curves if c["round"] == rounds], float)
            mean = np.nanmean(values, 0)
            # overlapping methods stay distinguishable: colour, dash and marker all vary
            line, = ax.plot(rounds, mean, label=label, ls=styles[i % len(styles)],
                            marker=markers[i % len(markers)], markersize=4,
                            markevery=max(1, len(rounds) // 8))
            if len(values) > 1:
                ax.fill_between(rounds, np.nanmin(values, 0), np.nanmax(values, 0),
                                color=line.get_color(), alpha=0.2)
    for ax, key in zip(axes, shown):
        ax.set_ylabel(_LABEL.get(key, key).replace("final ", ""))
    if doc.get("target_accuracy") is not None and shown[0] == "eval_accuracy":
        axes[0].axhline(doc["target_accuracy"], color="gray", ls=":", lw=1,
                        label=f"target {doc['target_accuracy']:g}")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("mean over seeds; band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
