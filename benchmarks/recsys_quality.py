#!/usr/bin/env python
"""Recommendation quality on ml-100k-shaped synthetic ratings: the federated methods
beside their references, and held-out RMSE against epsilon under user-level DP.

Data: ``data.kind: synthetic_ratings`` at its defaults (943 users, 1682 items, ~100 000
integer ratings 1-5, the ml-100k shape; ``fedjax_lite.data.ratings_synthetic``), a random
20% of each user's ratings held out, from ``--seed``. Model: biased MF, k = 32, l2 = 0.05
(``configs/movielens_fcf.yaml``'s recipe, the config the real-data target uses). Every run
goes through ``fedjax_lite.experiment.runner.run`` (what ``fedjax-lite run`` does).

Part ``methods`` (RMSE vs rounds): fcf and fedrecon (federated), centralized (all ratings
pooled: the upper reference) and local_only (each user alone: the lower reference), each
with the per-method settings in ``METHODS``, on the same data and seed; plus the per-user
comparison with local_only (``experiment.compare_recsys``).

Part ``dp`` (RMSE vs epsilon): FCF with user-level DP on the item updates
(``aggregator: dp_gaussian``: each user's whole sparse update clipped to L2 norm
``--clip``, Gaussian noise on every item row of the sum, fixed denominator; Poisson
sampling at rate ``--dp-rate``, add/remove neighbours, RDP accountant, delta 1e-5 <
1/users) at the noise multipliers ``--noise``, beside the same configuration without
noise and clipping (``aggregator: mean``, same sampling and weighting) -- on the
ml-100k-shaped population and on one ``--scale`` times larger (more users, same items and
ratings per user: what more users buy under a fixed privacy budget).

    python benchmarks/recsys_quality.py                  # writes results/recsys_quality.*
    python benchmarks/recsys_quality.py --render-only    # .md/.png from the .json
    python benchmarks/recsys_quality.py --rounds 10 --noise 1 --scale 2 --out /tmp/rq
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (machine_info; no JAX at module level)
from dp_tradeoff import source_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "movielens_fcf.yaml"
SYNTHETIC = ["data.kind=synthetic_ratings", "data.split=random", "data.test_fraction=0.2"]

# per-method settings (the rest from the base config); chosen on this data, see README
METHODS = {
    "fcf": [],
    "fedrecon": ["algorithm.name=fedrecon", "algorithm.recon_steps=20"],
    # tuned on this data over lr 0.1 / 0.3 / 1.0 (1.0 diverges) and l2 0.05 / 0.1 at
    # batch 64: l2 0.05 overfits after ~60 epochs (0.936 -> 0.971 at 200)
    "centralized": ["algorithm.name=centralized", "algorithm.batch_size=64",
                    "algorithm.client_optimizer.learning_rate=0.1", "model.l2=0.1"],
    "local_only": ["algorithm.name=local_only"],
}


def run_one(overrides: list[str], rounds: int, eval_every: int) -> dict:
    from fedjax_lite.experiment.host import configure_host
    configure_host()
    from fedjax_lite.experiment import config as cfg
    from fedjax_lite.experiment.compare import method_raw
    from fedjax_lite.experiment.outputs import read_metrics
    from fedjax_lite.experiment.runner import run
    full = overrides + [f"rounds={rounds}", f"eval_every={eval_every}",
                        "checkpoint_every=0"]
    try:
        raw = cfg.load_raw(str(BASE_CONFIG))
        raw["data"] = {"kind": "synthetic_ratings"}        # no path / movielens split
        for assignment in full:
            cfg.set_override(raw, assignment)
        # the base config's fcf-only keys dropped for the other methods (as compare does)
        raw = method_raw(raw, raw["algorithm"]["name"], None)
        config = cfg.parse(raw)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            run(config, tmp, progress=False)
            summary = json.loads((Path(tmp) / "summary.json").read_text())
            rows = read_metrics(os.path.join(tmp, "metrics.jsonl"))
            with np.load(os.path.join(tmp, "per_user.npz")) as z:
                per_user = {k: z[k].tolist() for k in ("se", "count")}
        elapsed = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 -- reported with the config
        return {"overrides": full, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=8)}
    return {"overrides": full, "final": summary["final"], "run_s": elapsed,
            "num_users": summary["num_clients"], "privacy": summary.get("privacy"),
            "curve": [[r["round"], r["eval_rmse"], r.get("epsilon")] for r in rows],
            "per_user": per_user}


def settings(args) -> list[tuple[str, list[str], int]]:
    """(key, overrides, rounds) of every run."""
    out = [(f"methods/{m}", [f"seed={args.seed}"] + o, args.rounds)
           for m, o in METHODS.items()]
    # item_aggregation all (the DP mechanism's fixed denominator) shrinks a rarely rated
    # item's step by its rating frequency; server SGD at lr 8 or more diverged (mu and
    # popular items overshoot) and lr 4 learns slowly (0.997 after 100 rounds), so the DP
    # rows and their reference use server Adam (lr 0.01: 0.958 without noise)
    dp_common = ["algorithm.sampling=poisson", "algorithm.weighting=uniform",
                 "algorithm.item_aggregation=all", "algorithm.server_optimizer.name=adam",
                 "algorithm.server_optimizer.learning_rate=0.01"]
    for scale in sorted({1, args.scale}):
        pop = [f"data.num_users={943 * scale}", f"data.num_ratings={100_000 * scale}",
               f"algorithm.clients_per_round={round(args.dp_rate * 943 * scale)}"]
        base = [f"seed={args.seed}"] + pop + dp_common
        out.append((f"dp/x{scale}/nonprivate", base, args.dp_rounds))
        for z in args.noise:
            out.append((f"dp/x{scale}/z{z:g}", base + [
                "aggregator.name=dp_gaussian", f"aggregator.clip_norm={args.clip}",
                f"aggregator.noise_multiplier={z}", "privacy.nonprivate_diagnostics=true",
                "privacy.delta=1e-5"], args.dp_rounds))
    return out


def per_user_stats(results: dict) -> dict:
    from fedjax_lite.experiment.compare_recsys import compare_users
    local = results.get("methods/local_only")
    if not local or "per_user" not in local:
        return {}
    lo = {k: np.asarray(v) for k, v in local["per_user"].items()}
    return {key.split("/")[1]: compare_users({k: np.asarray(v) for k, v in
                                              r["per_user"].items()}, lo)
            for key, r in results.items()
            if key.startswith("methods/") and key != "methods/local_only" and "per_user" in r}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Recommendation quality: federated MF vs its references, and RMSE vs epsilon",
             "", f"Written by `benchmarks/recsys_quality.py` ({res['args']}). Machine: "
             f"{m['cpu_model']}, {m['cpu_affinity']} cores, JAX {m['jax']} {m['backend']}; "
             f"git {res['source']['git_commit'][:7]}"
             f"{' (fedjax_lite/ modified)' if res['source']['fedjax_lite_dirty'] else ''}; "
             f"{res['wall_s'] / 60:.0f} min.", "",
             "Data: synthetic ratings shaped like ml-100k (943 users, 1682 items, ~100k "
             "ratings 1-5), 20% of each user's ratings held out. Model: biased MF, k = 32, "
             "l2 = 0.05. Predicting the global mean scores 1.126 on this data; tuned "
             "centralized ALS 0.927 (`tests/test_ratings_synthetic.py`).", "",
             "## Methods (RMSE vs rounds: recsys_quality.png)", "",
             "| method | settings | final held-out RMSE | MAE | run s |", "|---|---|---|---|---|"]
    for key, r in res["runs"].items():
        if not key.startswith("methods/"):
            continue
        name = key.split("/")[1]
        if "error" in r:
            lines.append(f"| {name} | - | error: {r['error']} | | |")
            continue
        lines.append(f"| {name} | {' '.join(METHODS[name]) or 'base config'} | "
                     f"{r['final']['eval_rmse']:.4f} | {r['final']['eval_mae']:.4f} | "
                     f"{r['run_s']:.0f} |")
    stats = res.get("per_user", {})
    if stats:
        lines += ["", "Per user, against local_only (the same user training alone): share "
                  "of the users with held-out ratings whose RMSE is lower, and the per-user "
                  "RMSE reduction (median [quartiles]).", "",
                  "| method | users | helped | hurt | median gain [q25, q75] |",
                  "|---|---|---|---|---|"]
        for name, s in stats.items():
            lines.append(f"| {name} | {s['users']} | {s['helped']:.1%} | {s['hurt']:.1%} | "
                         f"{s['median_gain']:+.4f} [{s['gain_q25']:+.4f}, "
                         f"{s['gain_q75']:+.4f}] |")
    lines += ["", "## User-level DP on the item updates (RMSE vs epsilon: recsys_dp.png)", "",
              "FCF with server Adam (lr 0.01), Poisson sampling, uniform weighting, each "
              f"user's whole sparse update clipped to L2 norm {res['args']['clip']}, "
              "Gaussian noise on every item row, "
              "fixed denominator; epsilon by the RDP accountant of dp-accounting at delta "
              "1e-5, add/remove neighbours (one user's entire ratings). The non-private row: "
              "the same sampling and weighting, no clipping or noise.", "",
              "| population | users | per round (q) | noise z | epsilon | final RMSE |",
              "|---|---|---|---|---|---|"]
    for key, r in res["runs"].items():
        if not key.startswith("dp/"):
            continue
        _, scale, what = key.split("/")
        if "error" in r:
            lines.append(f"| {scale} | | | {what} | error: {r['error']} | |")
            continue
        priv = r.get("privacy")
        q = (priv or {}).get("sampling_probability")
        lines.append(f"| {scale} | {r['num_users']} | "
                     f"{'' if q is None else f'q = {q:.3g}'} | "
                     f"{priv['noise_multiplier']:g} | {priv['epsilon']:.3g} | "
                     if priv else f"| {scale} | {r['num_users']} | | none | "
                     "not private | ")
        lines[-1] += f"{r['final']['eval_rmse']:.4f} |"
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, r in res["runs"].items():
        if key.startswith("methods/") and "curve" in r:
            c = np.array([[a, b] for a, b, _ in r["curve"]], float)
            ax.plot(c[:, 0], c[:, 1], label=key.split("/")[1])
    ax.set_xlabel("round (centralized: epoch)")
    ax.set_ylabel("held-out RMSE")
    ax.set_ylim(0.85, 1.25)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("ml-100k-shaped synthetic ratings")
    fig.tight_layout()
    fig.savefig(out / "recsys_quality.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    scales = sorted({k.split("/")[1] for k in res["runs"] if k.startswith("dp/")})
    for i, scale in enumerate(scales):
        pts, ref = [], None
        for key, r in res["runs"].items():
            if not key.startswith(f"dp/{scale}/") or "final" not in r:
                continue
            if r.get("privacy"):
                pts.append((r["privacy"]["epsilon"], r["final"]["eval_rmse"]))
            else:
                ref = r["final"]["eval_rmse"]
        color = f"C{i}"
        users = next((r["num_users"] for k, r in res["runs"].items()
                      if k.startswith(f"dp/{scale}/") and "num_users" in r), scale)
        if pts:
            pts.sort()
            ax.plot(*zip(*pts), "o-", color=color, label=f"{users} users, DP (FCF)")
        if ref is not None:
            ax.axhline(ref, color=color, ls=":", label=f"{users} users, not private")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta = 1e-5, user level; q = 0.2, 100 rounds)")
    ax.set_ylabel("held-out RMSE")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "recsys_dp.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--dp-rounds", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", default="0.5,1,2,4,8")
    ap.add_argument("--clip", type=float, default=0.1)     # ~20% of users clipped at z=1
    ap.add_argument("--dp-rate", type=float, default=0.2)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated key prefixes to run")
    ap.add_argument("--out", default=str(REPO / "results"))
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args(argv)
    args.noise = [float(v) for v in args.noise.split(",") if v.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recsys_quality.json"
    if not args.render_only:
        t0 = time.time()
        source = source_state()
        todo = [s for s in settings(args)
                if not args.only or any(s[0].startswith(p) for p in args.only.split(","))]
        runs = {}
        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(run_one, o, r, args.eval_every): k for k, o, r in todo}
            for f in cf.as_completed(futs):
                runs[futs[f]] = f.result()
                r = runs[futs[f]]
                print(f"{futs[f]}: {r.get('error') or round(r['final']['eval_rmse'], 4)} "
                      f"[{time.time() - t0:.0f} s]", flush=True)
        order = [k for k, _, _ in todo]
        runs = {k: runs[k] for k in order}
        res = {"args": {k: v for k, v in vars(args).items() if k != "render_only"},
               "source": source, "machine": tp.machine_info(), "wall_s": time.time() - t0,
               "runs": runs}
        res["per_user"] = per_user_stats(runs)
        for r in runs.values():
            r.pop("per_user", None)
        path.write_text(json.dumps(res, indent=1))
    res = json.loads(path.read_text())
    (out / "recsys_quality.md").write_text(markdown(res))
    plot(res, out)
    print(markdown(res))


if __name__ == "__main__":
    main()
