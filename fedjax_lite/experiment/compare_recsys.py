"""Per-user comparison of recommenders with ``local_only``: which users federation helps.

Every recommender run writes ``per_user.npz`` (each user's held-out error sums at the last
evaluation). For each method and seed, a user with held-out ratings is *helped* when its
held-out RMSE is lower than under ``local_only`` (the user training alone on the same
data), *hurt* when higher; with the implicit objective (no RMSE) the per-user NDCG@10 of
the sampled ranking decides (higher is better). Reported per method: users compared, the
fractions helped / hurt, and the median and quartiles of the per-user difference.
"""

from __future__ import annotations

import os

import numpy as np


def _load(out_dir: str, label: str, k: int) -> dict | None:
    path = os.path.join(out_dir, label, f"seed{k}", "per_user.npz")
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        return {name: z[name] for name in z.files}


def per_user_score(sums: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """(per-user score, users that have one, metric name): RMSE when the run measured
    ratings, else the per-user mean NDCG@10 of the sampled ranking."""
    if "se" in sums:
        count = sums["count"]
        return np.sqrt(sums["se"] / np.maximum(count, 1)), count > 0, "rmse"
    ranked = sums["ranked"]
    return sums["ndcg"] / np.maximum(ranked, 1), ranked > 0, "ndcg10"


def per_user_gain(method: dict, local: dict) -> tuple[np.ndarray, str]:
    """(each scored user's gain of ``method`` over ``local_only``, > 0 when the method is
    better: RMSE lowered or NDCG raised; the metric's name)."""
    a, has, metric = per_user_score(method)
    b, _, _ = per_user_score(local)
    return ((b - a) if metric == "rmse" else (a - b))[has], metric


def compare_users(method: dict, local: dict) -> dict:
    """Per-user statistics of ``method`` against ``local_only`` (same users, same rows)."""
    d, metric = per_user_gain(method, local)
    if d.size == 0:
        return {"metric": metric, "users": 0}
    q25, q50, q75 = (float(x) for x in np.percentile(d, [25, 50, 75]))
    return {"metric": metric, "users": int(d.size),
            "helped": float(np.mean(d > 0)), "hurt": float(np.mean(d < 0)),
            "median_gain": q50, "gain_q25": q25, "gain_q75": q75}


def per_user_vs_local_only(out_dir: str, results: dict) -> dict:
    """{method: [per-seed statistics]} for every method but local_only."""
    seeds = {label: len(seed_runs) for label, seed_runs in results.items()}
    out = {}
    for label in results:
        if label == "local_only":
            continue
        stats = []
        for k in range(min(seeds[label], seeds["local_only"])):
            a, b = _load(out_dir, label, k), _load(out_dir, "local_only", k)
            if a is not None and b is not None:
                stats.append({"seed_index": k, **compare_users(a, b)})
        if stats:
            out[label] = stats
    return out


def per_user_markdown(doc: dict) -> str:
    lines = ["Per user, against local_only (each user alone): share of users with held-out "
             "ratings whose error federation lowers (RMSE; NDCG@10 for implicit runs), and "
             "the per-user gain (median [quartiles]; positive = better than alone).", "",
             "| method | users | helped | hurt | median gain [q25, q75] |",
             "|---|---|---|---|---|"]
    for label, stats in doc.items():
        for s in stats:
            if not s.get("users"):
                continue
            lines.append(f"| {label} (seed #{s['seed_index']}) | {s['users']} | "
                         f"{s['helped']:.1%} | {s['hurt']:.1%} | {s['median_gain']:+.4f} "
                         f"[{s['gain_q25']:+.4f}, {s['gain_q75']:+.4f}] {s['metric']} |")
    return "\n".join(lines) + "\n"


def plot_per_user(path: str, out_dir: str, results: dict) -> None:
    """Histogram of the per-user gain over local_only, one curve per method (seed 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    local = _load(out_dir, "local_only", 0)
    if local is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    metric = None
    for label in results:
        mine = _load(out_dir, label, 0)
        if label == "local_only" or mine is None:
            continue
        gain, metric = per_user_gain(mine, local)
        ax.hist(gain, bins=40, histtype="step", lw=1.5,
                label=f"{label}: {np.mean(gain > 0):.0%} helped")
    ax.axvline(0, color="gray", lw=1, ls=":")
    ax.set_xlabel(f"per-user gain over local_only ({'RMSE lowered by' if metric == 'rmse' else 'NDCG@10 raised by'})")
    ax.set_ylabel("users")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["compare_users", "per_user_gain", "per_user_markdown", "per_user_score",
           "per_user_vs_local_only", "plot_per_user"]
