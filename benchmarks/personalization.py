#!/usr/bin/env python
"""Personalization for every model: Ditto's personal models vs FedAvg's global model on
the 8x8 digits under Dirichlet label skew, for multinomial logistic regression, the MLP
and the CNN.

Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021: personal models v_k trained on F_k(v) + lam/2 ||v - w||^2
beside the global model w. Their claims checked here, qualitatively (their data sets --
FEMNIST, Fashion-MNIST, Vehicle, ... -- are not these, and no number of theirs is
quoted): under heterogeneous clients the personal models are more accurate on each
client's own data than the global model, and lam interpolates between training alone
(lam = 0) and the global model (large lam).

Setup (configs/personalization_digits.yaml): 20 clients, Dirichlet(alpha) label skew over
all 1797 images, each client holding out 25% of its own examples (``data.test_split:
examples``), 10 clients a round, E = 1, B = 10, client SGD. One Ditto run per (model,
alpha, lam, seed) gives both numbers: its global model is FedAvg's bit for bit (tested in
tests/test_ditto.py; checked again here), evaluated on the same per-client test examples
as the personal models.

    python benchmarks/personalization.py [--seeds 2] [--quick] [--models mlr,mlp,cnn]
"""

from __future__ import annotations

import os
import time

import numpy as np

from repro_common import (REPO, Recorder, band, command_line, load_config, pm, with_keys)

ALPHAS = (0.1, 1.0)
LAMS = (0.0, 0.1, 1.0, 10.0)       # lr 0.05 x lam 10 = 0.5: stable SGD
MODELS = {
    "mlr": {"kind": "multinomial_logistic_regression", "num_classes": 10},
    "mlp": {"kind": "mlp", "hidden": [64], "num_classes": 10},
    "cnn": {"kind": "cnn", "num_classes": 10},
}
KEYS = ("eval_accuracy", "eval_accuracy_client_mean", "eval_personal_accuracy",
        "eval_personal_accuracy_client_mean", "eval_loss", "eval_personal_loss")


def run(args) -> dict:
    from fedjax_lite.experiment import config as cfg
    from fedjax_lite.experiment.outputs import read_metrics
    from fedjax_lite.experiment.runner import run as run_one
    quick = args.quick
    rec = Recorder("personalization", args.out, quick, args.argv)
    base = load_config("personalization_digits.yaml")
    if quick:
        base = with_keys(base, rounds=3, eval_every=1, engine={"devices": 1})
    seeds = args.seeds or (1 if quick else 2)
    models = args.models.split(",") if args.models else (["mlr"] if quick else list(MODELS))
    alphas = ALPHAS[:1] if quick else ALPHAS
    lams = LAMS[1:2] if quick else LAMS
    runs, identical_global = {}, True
    for model in models:
        for alpha in alphas:
            for lam in lams:
                curves, t0 = [], time.perf_counter()
                for s in range(seeds):
                    raw = with_keys(base, seed=s, model=MODELS[model],
                                    data={"partition": {"kind": "dirichlet", "alpha": alpha}},
                                    algorithm={"lam": lam})
                    folder = os.path.join(rec.tmp, f"{model}_{alpha}_{lam}_{s}")
                    run_one(cfg.parse(raw), folder, progress=False)
                    rows = read_metrics(os.path.join(folder, "metrics.jsonl"))
                    curves.append({"seed": s, "round": [r["round"] for r in rows],
                                   **{k: [r[k] for r in rows] for k in KEYS}})
                v = {"label": f"{model} alpha={alpha:g} lam={lam:g}", "model": model,
                     "alpha": alpha, "lam": lam, "seeds": list(range(seeds)),
                     "curves": curves, "wall_s": time.perf_counter() - t0}
                runs[v["label"]] = v
                first = runs[f"{model} alpha={alpha:g} lam={lams[0]:g}"]
                same = all(a["eval_accuracy"] == b["eval_accuracy"]
                           for a, b in zip(first["curves"], curves))
                identical_global &= same
                rec.log(f"    {v['label']:<30s} global {_final(v, 'eval_accuracy')[0]:.4f}  "
                        f"personal {_final(v, 'eval_personal_accuracy')[0]:.4f}"
                        f"  [{v['wall_s']:.0f} s]" + ("" if same else "  GLOBAL DIFFERS"))
    doc = {"models": models, "alphas": list(alphas), "lams": list(lams), "seeds": seeds,
           "rounds": base["rounds"], "config": base, "runs": runs,
           "global_identical_across_lam": identical_global}
    return rec.finish(doc, render(doc, rec.out))


def _final(v: dict, key: str) -> tuple[float, float]:
    vals = [c[key][-1] for c in v["curves"]]
    return float(np.mean(vals)), float(np.std(vals))


def table(doc: dict) -> list[dict]:
    out = []
    for model in doc["models"]:
        for alpha in doc["alphas"]:
            row = {"model": model, "alpha": alpha}
            vs = [doc["runs"][f"{model} alpha={alpha:g} lam={lam:g}"] for lam in doc["lams"]]
            row["global"] = _final(vs[0], "eval_accuracy")
            row["global_client_mean"] = _final(vs[0], "eval_accuracy_client_mean")
            row["personal"] = {f"{lam:g}": _final(v, "eval_personal_accuracy")
                               for lam, v in zip(doc["lams"], vs)}
            row["personal_client_mean"] = {
                f"{lam:g}": _final(v, "eval_personal_accuracy_client_mean")
                for lam, v in zip(doc["lams"], vs)}
            best = max(row["personal"], key=lambda k: row["personal"][k][0])
            row["best_lam"], row["gain"] = best, row["personal"][best][0] - row["global"][0]
            out.append(row)
    return out


def render(doc: dict, out) -> str:
    rows = doc["table"] = table(doc)
    plot(out / "curves.png", doc)
    lams = doc["lams"]
    lines = [f"Test accuracy after {doc['rounds']} rounds on each client's own held-out "
             f"examples (example-weighted over all clients; mean ± std over "
             f"{doc['seeds']} seed(s)): FedAvg's global model beside Ditto's personal "
             "models. Digits, 20 clients, Dirichlet(alpha) label skew, 10 clients a round, "
             "E = 1, B = 10.", "",
             "| model | alpha | FedAvg (global) | " + " | ".join(
                 f"Ditto personal, lam = {lam:g}" for lam in lams)
             + " | best personal - global |",
             "|---|---|---|" + "---|" * len(lams) + "---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['alpha']:g} | {pm(*r['global'])} | "
                     + " | ".join(pm(*r["personal"][f"{lam:g}"]) for lam in lams)
                     + f" | {r['gain']:+.3f} (lam {r['best_lam']}) |")
    gap = max(max(abs(r["global"][0] - r["global_client_mean"][0]),
                  *(abs(r["personal"][k][0] - r["personal_client_mean"][k][0])
                    for k in r["personal"])) for r in rows)
    if gap < 5e-4:
        lines += ["", f"Unweighted means over clients (each client's accuracy on its own "
                  f"test examples, averaged) equal these to within {gap:.1e}: Hsu et "
                  "al.'s Dirichlet partition gives every client the same number of "
                  "examples, so every client holds the same number of test examples."]
    else:
        lines += ["", "The same, as unweighted means over clients (each client's accuracy "
                  "on its own test examples, averaged):", "",
                  "| model | alpha | FedAvg (global) | " + " | ".join(
                      f"lam = {lam:g}" for lam in lams) + " |",
                  "|---|---|---|" + "---|" * len(lams)]
        for r in rows:
            lines.append(f"| {r['model']} | {r['alpha']:g} | "
                         f"{pm(*r['global_client_mean'])} | "
                         + " | ".join(pm(*r["personal_client_mean"][f"{lam:g}"])
                                      for lam in lams) + " |")
    lines += ["", "Ditto's global model was identical (bitwise, every evaluation row) across "
              "lam in every cell: " + ("yes" if doc["global_identical_across_lam"] else
                                       "**NO**") + " (it is FedAvg's)."]
    return "\n".join(lines) + "\n"


def plot(path, doc: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models, alphas = doc["models"], doc["alphas"]
    fig, axes = plt.subplots(len(alphas), len(models), squeeze=False, sharey=True,
                             figsize=(4.6 * len(models), 3.6 * len(alphas)))
    for i, alpha in enumerate(alphas):
        for j, model in enumerate(models):
            ax = axes[i][j]
            vs = [doc["runs"][f"{model} alpha={alpha:g} lam={lam:g}"] for lam in doc["lams"]]
            band(ax, vs[0], "eval_accuracy", label="FedAvg global model", style=0,
                 color="black")
            for k, (lam, v) in enumerate(zip(doc["lams"], vs)):
                band(ax, v, "eval_personal_accuracy", style=k + 1,
                     label=f"Ditto personal, lam={lam:g}" + (" (local only)" if lam == 0
                                                             else ""))
            ax.set_title(f"{model}, Dirichlet alpha = {alpha:g}", fontsize=10)
            ax.set_xlabel("communication round")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("test accuracy on the clients' own data")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Personal (Ditto) vs global (FedAvg) models on 8x8 digits, 20 clients "
                 f"with label skew; mean over {doc['seeds']} seed(s)"
                 + (", band = min..max" if doc["seeds"] > 1 else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    return command_line(__doc__, argv, run, render,
                        quick_help="3 rounds, mlr, one alpha and lam",
                        seeds_help="default 2 (quick: 1)",
                        extra=[(("--models",), {"default": None,
                                                "help": "comma-separated: mlr,mlp,cnn"})],
                        out=REPO / "results" / "personalization")


if __name__ == "__main__":
    main()
