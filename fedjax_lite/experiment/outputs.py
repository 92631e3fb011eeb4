"""Run outputs: metrics.jsonl, summary.json, params.npz, curves.png."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np

TIMING_KEYS = ("wall_s", "clients_per_s", "round_s")


def _clean(value: Any):
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


class MetricsWriter:
    """Appends one JSON object per line; on resume, drops rows after ``keep_until``."""

    def __init__(self, path: str, keep_until: int | None = None):
        self.path = path
        if keep_until is None:
            open(path, "w").close()
        else:
            rows = read_metrics(path) if os.path.exists(path) else []
            with open(path, "w") as f:
                for row in rows:
                    if row["round"] <= keep_until:
                        f.write(json.dumps(row) + "\n")

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
            f.flush()
            os.fsync(f.fileno())


class NullWriter:
    """A process other than process 0 of a multi-process run writes no metrics."""

    def write(self, row: dict) -> None:
        pass


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({k: _clean(v) for k, v in obj.items()}, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def save_params(path: str, params) -> None:
    """Saves a parameter pytree as .npz, keys = pytree paths (e.g. ``w``, ``Dense_0/kernel``)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    arrays = {"/".join(_key_name(k) for k in path_): np.asarray(leaf) for path_, leaf in flat}
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def save_per_user(path: str, sums: dict, user_ids) -> None:
    """Per-user held-out sums of a recommender's last evaluation (``se``, ``ae``,
    ``count``; ``hits``, ``ndcg``, ``ranked`` with ranking) and the users' source ids."""
    arrays = {k: np.asarray(v) for k, v in sums.items()}
    tmp = path + ".tmp.npz"
    np.savez(tmp, user_ids=np.asarray(user_ids), **arrays)
    os.replace(tmp, path)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def plot_curves(path: str, rows: list[dict], title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("eval_loss", "eval loss"), ("train_loss", "train loss (local steps)")):
        pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            axes[0].plot(*zip(*pts), marker=".", label=label)
    axes[0].set_xlabel("round"); axes[0].set_ylabel("loss"); axes[0].legend()
    ratings = any(r.get("eval_rmse") is not None for r in rows)
    ranking = not ratings and any(r.get("eval_hr10") is not None for r in rows)
    panel = ((("eval_rmse", "RMSE"), ("eval_mae", "MAE")) if ratings else
             (("eval_hr10", "HR@10 (99 sampled)"), ("eval_ndcg10", "NDCG@10 (99 sampled)"),
              ("eval_hr10_full", "HR@10 (full)"), ("eval_ndcg10_full", "NDCG@10 (full)"))
             if ranking else
             (("eval_accuracy", "example-weighted"), ("eval_accuracy_client_mean",
                                                      "client mean")))
    later = []
    for key, label in panel:
        pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            axes[1].plot(*zip(*pts), marker=".", label=label)
            later += [v for _, v in pts[max(1, len(pts) // 10):]]
    if later:      # zoom to the progress after the first tenth (round 0 may fall off)
        lo, hi = min(later), max(later)
        pad = max(0.05 * (hi - lo), 1e-3)
        axes[1].set_ylim(lo - pad, hi + pad)
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("held-out rating error" if ratings else "held-out ranking"
                       if ranking else "eval accuracy")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
        if rounds:
            ax.set_xlim(min(rounds), max(rounds))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
