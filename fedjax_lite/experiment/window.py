"""The metrics window between two evaluation rows, shared by the runner and a sweep's
vmapped members (whose rows must equal the member's run alone).

A window sums the rounds since the last evaluation row: the training loss (only where
the run may show it), the rounds' seconds, and every other scalar round metric
(attackers in the cohort, reporting clients, ...); :func:`metrics_row` turns it into the
row ``metrics.jsonl`` holds.
"""

from __future__ import annotations

EMPTY = {"loss": 0.0, "rounds": 0, "time": 0.0, "extra": {}}


def add_round(window: dict, metrics: dict, loss: float, dt: float, config,
              show_loss: bool) -> tuple[dict, bool]:
    """(the window with one more round, whether no sampled client reported in it).

    ``metrics``: the round's metrics (a DP run keeps only those its mechanism releases:
    ``privacy_run.private_metrics``); ``show_loss``: whether the run may log a loss
    computed from client data."""
    extra = dict(window["extra"])
    if config.is_private:
        from fedjax_lite.experiment import privacy_run
        released = privacy_run.private_metrics(metrics, config)
    else:
        released = metrics
    for k, v in released.items():
        if k not in ("train_loss", "sampling_overflow") and getattr(v, "ndim", 1) == 0:
            extra[k] = extra.get(k, 0.0) + float(v)
    silent = bool(show_loss and "reporting_clients" in metrics
                  and int(metrics["reporting_clients"]) == 0)
    if silent:
        extra["rounds_without_reports"] = extra.get("rounds_without_reports", 0) + 1
    return {"loss": window["loss"] + (loss if show_loss else 0.0),
            "rounds": window["rounds"] + 1, "time": window["time"] + dt,
            "extra": extra}, silent


def metrics_row(window: dict, round_num: int, ev: dict, wall_s: float, C: int,
                show_loss: bool, ledger=None) -> dict:
    """The evaluation row after ``round_num`` rounds: the window's means (round times
    and loss only where ``show_loss``: they depend on client data), the evaluation
    ``ev``, the other round metrics as window means -- counts of events as totals -- and
    the run's epsilon (DP runs: ``ledger``, a ``privacy_run.Ledger``)."""
    timed = window["rounds"] and show_loss
    row = {"round": round_num,
           "train_loss": (window["loss"] / window["rounds"]) if timed else None,
           **ev, "wall_s": wall_s,
           "clients_per_s": (C * window["rounds"] / window["time"]) if timed else None,
           "round_s": (window["time"] / window["rounds"]) if timed else None}
    for k, v in sorted(window["extra"].items()):
        row[k] = v if k == "rounds_without_reports" else v / max(window["rounds"], 1)
    if ledger is not None:
        row["epsilon"] = ledger.epsilon(round_num)
    return row


__all__ = ["EMPTY", "add_round", "metrics_row"]
