"""A sweep's comparison: ``comparison.md``, ``comparison.json`` and ``curves.png`` in the
sweep folder, with :mod:`.compare`'s table and plot (one line per configuration, mean +-
std over its seeds; the best configuration by the final value of the first eval metric).
Members that stopped early are listed and left out of the means and the best."""

from __future__ import annotations

import os

import numpy as np

from fedjax_lite.experiment.compare import (LOWER_IS_BETTER, _epsilon, _mean_std,
                                            _metric_names, markdown_table, plot_comparison)
from fedjax_lite.experiment.outputs import read_metrics, write_json


def write_report(out_dir: str, members: list, summaries: dict, units: list) -> dict:
    """Writes the comparison files; returns the comparison document."""
    results: dict[str, list[dict]] = {}
    for m in members:
        summary = summaries[m.name]
        path = os.path.join(out_dir, "members", m.name, "metrics.jsonl")
        rows = read_metrics(path) if os.path.exists(path) else []
        results.setdefault(m.label, []).append(
            {"seed": m.config.seed, "summary": summary, "rows": rows, "name": m.name})
    metrics = _metric_names(results)
    table = [_table_row(label, runs, metrics) for label, runs in results.items()]
    best = _best(table, metrics)
    stopped = {r["name"]: r["summary"]["stopped"] for runs in results.values()
               for r in runs if r["summary"].get("stopped")}
    seeds = sorted({m.config.seed for m in members})
    doc = {"configurations": list(results), "seeds": seeds,
           "members": [m.name for m in members], "rounds": members[0].config.rounds,
           "groups": units, "metrics": metrics, "table": table, "best": best,
           "stopped": stopped,
           "curves": {label: [{"seed": r["seed"], "round": [row["round"] for row in r["rows"]],
                               **{k: [row.get(k) for row in r["rows"]] for k in metrics}}
                              for r in runs if not r["summary"].get("stopped")]
                      for label, runs in results.items()}}
    doc["curves"] = {k: v for k, v in doc["curves"].items() if v}
    write_json(os.path.join(out_dir, "comparison.json"), doc)
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write(report_markdown(doc))
    if doc["curves"] and metrics:
        plot_comparison(os.path.join(out_dir, "curves.png"), doc)
    return doc


def _table_row(label: str, runs: list[dict], metrics: list[str]) -> dict:
    kept = [r for r in runs if not r["summary"].get("stopped")]
    row = {"method": label, "seeds": [r["seed"] for r in runs],
           "stopped": len(runs) - len(kept)}
    for name in metrics:
        mean, std = _mean_std([r["summary"]["final"].get(name) for r in kept])
        row[f"final_{name}_mean"], row[f"final_{name}_std"] = mean, std
    mean_of = lambda key: float(np.mean([r["summary"].get(key) or 0 for r in kept])) \
        if kept else 0.0
    return {**row, "rounds_to_target": [None] * len(runs),
            "wall_s_mean": mean_of("wall_s"), "compile_s_mean": mean_of("compile_s"),
            "clients_per_s_mean": mean_of("clients_per_s"), "epsilon": _epsilon(kept)}


def _best(table: list[dict], metrics: list[str]) -> dict | None:
    if not metrics:
        return None
    metric = metrics[0]
    candidates = [r for r in table if not r["stopped"]
                  and r.get(f"final_{metric}_mean") is not None]
    if not candidates:
        return None
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    row = min(candidates, key=lambda r: sign * r[f"final_{metric}_mean"])
    return {"configuration": row["method"], "metric": metric,
            "mean": row[f"final_{metric}_mean"], "std": row[f"final_{metric}_std"],
            "seeds": row["seeds"],
            "lower_is_better": metric in LOWER_IS_BETTER}


def report_markdown(doc: dict) -> str:
    seeds = max((len(r["seeds"]) for r in doc["table"]), default=1)
    table = markdown_table(doc["table"], None, seeds, doc["metrics"] or ["eval_loss"])
    table = table.replace("| method |", "| configuration |", 1)
    lines = [table]
    best = doc["best"]
    if best is not None:
        lines.append(f"best configuration: **{best['configuration']}** (final "
                     f"{best['metric']} {best['mean']:.4f} ± {best['std']:.4f} over seeds "
                     f"{', '.join(map(str, best['seeds']))}; "
                     f"{'lower' if best['lower_is_better'] else 'higher'} is better)\n")
    vmapped = [u for u in doc["groups"] if u["vmapped"]]
    alone = [u for u in doc["groups"] if not u["vmapped"]]
    lines.append(f"{len(doc['members'])} members: {len(vmapped)} vmapped program(s) of "
                 f"{', '.join(str(len(u['members'])) for u in vmapped) or '-'} members, "
                 f"{len(alone)} run alone\n")
    for u in alone:
        lines.append(f"- run alone: {u['members'][0]} ({u['note']})\n")
    for name, s in doc["stopped"].items():
        lines.append(f"- stopped: {name}: {s['error']}\n")
    return "".join(lines)


__all__ = ["report_markdown", "write_report"]
