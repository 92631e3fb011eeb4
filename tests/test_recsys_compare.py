"""Recommenders side by side: `fedjax-lite compare` of fcf, fedrecon, centralized and
local_only on identical data, the per-user comparison with local_only, ranking metrics
and the implicit objective through `run`, and a SIGKILL mid-run of FCF resumed bitwise
exactly with its persistent private state."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedjax_lite.experiment.cli import main
from fedjax_lite.experiment.outputs import read_metrics
from test_cli import ROOT, sigkill_after_checkpoint, strip_timing, write_config
from test_recsys_run import REC

METHODS = ["fcf", "fedrecon", "centralized", "local_only"]


def test_compare_runs_federated_methods_beside_both_references(tmp_path, capsys):
    raw = {**REC, "rounds": 6, "eval_every": 3}
    out = tmp_path / "cmp"
    code = main(["compare", write_config(tmp_path, raw), "--algorithms", ",".join(METHODS),
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in doc["table"]] == METHODS
    assert doc["metrics"][:2] == ["eval_rmse", "eval_mae"]
    final = {r["method"]: r["final_eval_rmse_mean"] for r in doc["table"]}
    # every method saw the same held-out ratings: per-user sums add up to the final RMSE
    for m in METHODS:
        z = np.load(out / m / "seed0" / "per_user.npz")
        assert np.sqrt(z["se"].sum() / z["count"].sum()) == pytest.approx(final[m], rel=1e-4)
    per_user = doc["per_user_vs_local_only"]
    assert sorted(per_user) == ["centralized", "fcf", "fedrecon"]
    for stats in per_user.values():
        s = stats[0]
        assert s["metric"] == "rmse" and s["users"] > 0
        assert 0 <= s["helped"] <= 1 and s["helped"] + s["hurt"] <= 1
    md = (out / "comparison.md").read_text()
    assert "final RMSE" in md and "helped" in md
    assert (out / "per_user.png").exists() and (out / "comparison.png").exists()


@pytest.mark.parametrize("change,message", [
    ({"algorithm": {**REC["algorithm"], "name": "centralized"},
      "aggregator": {"name": "dp_gaussian"}}, "non-federated reference"),
    ({"model": {"kind": "matrix_factorization", "objective": "bce"}}, "eval.ranking: true"),
    ({"eval": {"ranking": True}, "data": {"kind": "synthetic_logistic"},
      "model": {"kind": "logistic_regression"}, "algorithm": {"name": "fedavg"}},
     "'eval.ranking'"),
])
def test_recommendation_reference_config_errors(tmp_path, capsys, change, message):
    assert main(["run", write_config(tmp_path, {**REC, **change}), "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["mse", "bce"])
def test_ranking_metrics_in_every_row(tmp_path, objective):
    raw = {**REC, "rounds": 4, "eval_every": 2, "eval": {"ranking": True, "negatives": 20},
           "data": {**REC["data"], "num_items": 400},
           "model": {"kind": "matrix_factorization", "dim": 4, "objective": objective}}
    out = tmp_path / objective
    assert main(["run", write_config(tmp_path, raw), "--out", str(out), "--no-progress"]) == 0
    rows = read_metrics(str(out / "metrics.jsonl"))
    for r in rows:
        for k in ("eval_hr10", "eval_ndcg10", "eval_hr10_full", "eval_ndcg10_full"):
            assert 0 <= r[k] <= 1, (k, r[k])
        assert r["eval_ndcg10"] <= r["eval_hr10"]
        # 20 sampled negatives are easier than all unrated items
        assert r["eval_hr10_full"] <= r["eval_hr10"] + 1e-6
    assert ("eval_rmse" in rows[-1]) == (objective == "mse")
    z = np.load(out / "per_user.npz")
    assert z["hits"].sum() / z["ranked"].sum() == pytest.approx(rows[-1]["eval_hr10"],
                                                                rel=1e-5)


def test_fcf_sigkill_then_resume_is_bitwise_exact(tmp_path):
    raw = {**REC, "rounds": 150, "eval_every": 50, "checkpoint_every": 5,
           "algorithm": {**REC["algorithm"], "clients_per_round": 10, "local_epochs": 1}}
    path = write_config(tmp_path, raw)
    env = {**os.environ, "PYTHONPATH": ROOT}
    cli = lambda *a: [sys.executable, "-m", "fedjax_lite.experiment.cli", *a]
    killed = tmp_path / "killed"
    sigkill_after_checkpoint(path, killed, 20, env)
    resumed = subprocess.run(cli("run", path, "--out", str(killed), "--no-progress",
                                 "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((killed / "summary.json").read_text())["resumed_from_round"] >= 20
    full = subprocess.run(cli("run", path, "--out", str(tmp_path / "full"), "--no-progress"),
                          env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    a, b = np.load(killed / "params.npz"), np.load(tmp_path / "full" / "params.npz")
    for k in a.files:
        assert a[k].tobytes() == b[k].tobytes(), k
    # the users' private factors, through the per-user errors they produce
    pa, pb = np.load(killed / "per_user.npz"), np.load(tmp_path / "full" / "per_user.npz")
    assert pa["se"].tobytes() == pb["se"].tobytes()
    assert strip_timing(read_metrics(str(killed / "metrics.jsonl"))) == strip_timing(
        read_metrics(str(tmp_path / "full" / "metrics.jsonl")))
