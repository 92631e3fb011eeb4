"""Federated recommendation end to end through `fedjax-lite run`: FCF on ml-100k-shaped
synthetic ratings, RMSE / MAE rows, private factors kept out of the released parameters,
exact resume with the persistent private state, DP on the item updates."""

import json
import shutil

import numpy as np
import pytest

from fedjax_lite.experiment.cli import main
from fedjax_lite.experiment.outputs import read_metrics
from test_cli import strip_timing, write_config

REC = {
    "seed": 0, "rounds": 8, "eval_every": 4, "checkpoint_every": 4,
    "data": {"kind": "synthetic_ratings", "num_users": 80, "num_items": 120,
             "num_ratings": 4000},
    "model": {"kind": "matrix_factorization", "dim": 4},
    "algorithm": {"name": "fcf", "clients_per_round": 40, "local_epochs": 2,
                  "batch_size": 8, "client_optimizer": {"name": "sgd", "learning_rate": 0.05},
                  "server_optimizer": {"name": "sgd", "learning_rate": 1.0}},
}


def test_fcf_run_reports_rating_errors_and_releases_only_global_parameters(tmp_path):
    out = tmp_path / "rec"
    assert main(["run", write_config(tmp_path, REC), "--out", str(out), "--no-progress"]) == 0
    rows = read_metrics(str(out / "metrics.jsonl"))
    assert [r["round"] for r in rows] == [0, 4, 8]
    assert rows[-1]["eval_rmse"] < rows[0]["eval_rmse"]
    for r in rows:
        assert r["eval_rmse"] ** 2 == pytest.approx(r["eval_loss"], rel=1e-5)
        assert 0 < r["eval_mae"] <= r["eval_rmse"]
    params = np.load(out / "params.npz")
    assert sorted(params.files) == ["item", "item_bias", "mu"]
    summary = json.loads((out / "summary.json").read_text())
    assert params["item"].shape[0] <= 120 and summary["num_clients"] == 80


def test_resume_is_exact_with_persistent_private_factors(tmp_path):
    path = write_config(tmp_path, REC)
    full = tmp_path / "full"
    assert main(["run", path, "--out", str(full), "--no-progress"]) == 0
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "8")          # as if killed after round 4's save
    (cut / "params.npz").unlink()
    assert main(["run", path, "--out", str(cut), "--resume", "--no-progress"]) == 0
    a, b = np.load(full / "params.npz"), np.load(cut / "params.npz")
    for k in a.files:
        assert a[k].tobytes() == b[k].tobytes(), k
    assert strip_timing(read_metrics(str(full / "metrics.jsonl"))) == strip_timing(
        read_metrics(str(cut / "metrics.jsonl")))


def test_user_level_dp_on_item_updates(tmp_path):
    raw = {**REC, "algorithm": {**REC["algorithm"], "weighting": "uniform",
                                "item_aggregation": "all", "sampling": "poisson"},
           "aggregator": {"name": "dp_gaussian", "clip_norm": 0.5, "noise_multiplier": 1.0},
           "privacy": {"nonprivate_diagnostics": True}}
    out = tmp_path / "dp"
    assert main(["run", write_config(tmp_path, raw), "--out", str(out), "--no-progress"]) == 0
    rows = read_metrics(str(out / "metrics.jsonl"))
    assert rows[-1]["epsilon"] > 0 and rows[-1]["noise_std"] == pytest.approx(0.5 / 40)


@pytest.mark.parametrize("change,message", [
    ({"aggregator": {"name": "median"}}, "takes mean or dp_gaussian"),
    ({"model": {"kind": "logistic_regression"}}, "go together"),
    ({"data": {"kind": "movielens"}}, "'data.path' is required"),
    ({"aggregator": {"name": "dp_gaussian"}, "algorithm": {**REC["algorithm"],
                                                           "weighting": "uniform"}},
     "item_aggregation: all"),
])
def test_recommendation_config_errors(tmp_path, capsys, change, message):
    raw = {**REC, **change}
    assert main(["run", write_config(tmp_path, raw), "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_movielens_directory_errors_are_one_line(tmp_path, capsys):
    raw = {**REC, "data": {"kind": "movielens", "path": str(tmp_path / "nowhere")}}
    assert main(["run", write_config(tmp_path, raw), "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


def test_shipped_movielens_config_parses_with_the_issue_command_line():
    import os
    from fedjax_lite.experiment import config as cfg
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = cfg.load(os.path.join(root, "configs", "movielens_fcf.yaml"),
                 ["data.path=/some/ml-100k", "data.split=u1"])
    assert (c.data.kind, c.data.split, c.algorithm.name) == ("movielens", "u1", "fcf")


def test_fedrecon_run_keeps_nothing_private_and_evaluates_by_reconstruction(tmp_path):
    raw = {**REC, "algorithm": {**REC["algorithm"], "name": "fedrecon", "recon_steps": 3}}
    out = tmp_path / "recon"
    assert main(["run", write_config(tmp_path, raw), "--out", str(out), "--no-progress"]) == 0
    rows = read_metrics(str(out / "metrics.jsonl"))
    assert rows[-1]["eval_rmse"] < rows[0]["eval_rmse"]
    assert sorted(np.load(out / "params.npz").files) == ["item", "item_bias", "mu"]
