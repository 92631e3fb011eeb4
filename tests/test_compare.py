"""`fedjax-lite compare`: identical data and cohorts per seed, tables and curves."""

import json

import pytest
import yaml

from fedjax_lite.experiment import config as cfg
from fedjax_lite.experiment.cli import main
from fedjax_lite.experiment.compare import method_raw, plan
from fedjax_lite.experiment.outputs import TIMING_KEYS, read_metrics

BASE = {
    "seed": 4, "rounds": 6, "eval_every": 3, "checkpoint_every": 0,
    "data": {"kind": "synthetic_logistic", "num_clients": 24, "num_features": 4,
             "mean_examples": 10},
    "algorithm": {"name": "fedavg", "clients_per_round": 6, "local_epochs": 1,
                  "batch_size": 4,
                  "server_optimizer": {"name": "sgd", "learning_rate": 1.0, "momentum": 0.0}},
}


def rows_without_timing(path):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(path)]


def test_compare_runs_every_method_on_identical_data_and_cohorts(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    out = tmp_path / "cmp"
    code = main(["compare", str(path), "--algorithms", "fedavg,fedavgm,fedadam",
                 "--seeds", "2", "--target-accuracy", "0.6", "--out", str(out),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "| fedavgm |" in printed and "rounds to 0.6 accuracy" in printed
    for name in ("comparison.md", "comparison.json", "comparison.png"):
        assert (out / name).exists()
    doc = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in doc["table"]] == ["fedavg", "fedavgm", "fedadam"]
    assert all(r["seeds"] == [4, 5] for r in doc["table"])
    # fedavgm with the base's explicit momentum 0 IS fedavg: identical metrics prove that
    # both saw the same data, cohorts and client keys
    for seed in (0, 1):
        a = rows_without_timing(out / "fedavg" / f"seed{seed}" / "metrics.jsonl")
        b = rows_without_timing(out / "fedavgm" / f"seed{seed}" / "metrics.jsonl")
        assert a == b
    # different seeds are different data and cohorts
    assert rows_without_timing(out / "fedavg" / "seed0" / "metrics.jsonl") != \
        rows_without_timing(out / "fedavg" / "seed1" / "metrics.jsonl")
    # fedadam got its own server optimizer, not the base's SGD
    saved = yaml.safe_load((out / "fedadam" / "seed0" / "config.yaml").read_text())
    assert saved["algorithm"]["server_optimizer"]["name"] == "adam"


def test_method_raw_drops_keys_of_other_methods():
    raw = {"algorithm": {"name": "fedprox", "mu": 0.1, "straggler_fraction": 0.5},
           "aggregator": {"name": "trimmed_mean", "trim": 0.2}}
    got = method_raw(raw, "fedavg", "median")
    assert got["algorithm"] == {"name": "fedavg"}
    assert got["aggregator"] == {"name": "median"}
    assert method_raw(raw, "fedprox", None)["algorithm"]["mu"] == 0.1
    dp = {"aggregator": {"name": "dp_gaussian", "clip_norm": 0.5},
          "privacy": {"accountant": "pld"}}
    assert "privacy" not in method_raw(dp, "fedavg", "mean")
    assert method_raw(dp, "fedavg", "dp_ftrl")["privacy"] == {"accountant": "pld"}
    assert method_raw(dp, "fedavg", "dp_ftrl")["aggregator"] == {"name": "dp_ftrl",
                                                                 "clip_norm": 0.5}


def test_plan_validates_everything_before_running():
    with pytest.raises(cfg.ConfigError, match="--algorithms: unknown algorithm 'fedfoo'"):
        plan(BASE, ["fedavg", "fedfoo"], None, 1)
    with pytest.raises(cfg.ConfigError, match="--aggregators: unknown aggregator 'avg'"):
        plan(BASE, ["fedavg"], ["avg"], 1)
    with pytest.raises(cfg.ConfigError, match="--seeds must be >= 1"):
        plan(BASE, ["fedavg"], None, 0)
    runs = plan(BASE, ["fedavg", "fedadam"], ["mean", "median"], 2)
    assert [(label, k) for label, k, _ in runs][:3] == [
        ("fedavg+mean", 0), ("fedavg+mean", 1), ("fedavg+median", 0)]
    assert len(runs) == 8


def test_comparison_table_has_an_epsilon_column():
    from fedjax_lite.experiment.compare import markdown_table
    row = {"method": "fedavg+dp_gaussian", "final_eval_accuracy_mean": 0.9,
           "final_eval_accuracy_std": 0.01, "final_eval_loss_mean": 0.3,
           "final_eval_loss_std": 0.02, "rounds_to_target": [None], "wall_s_mean": 1.0,
           "clients_per_s_mean": 100.0, "epsilon": 3.25}
    table = markdown_table([row, {**row, "method": "fedavg", "epsilon": None}], None, 1)
    header, _, dp, plain = table.strip().splitlines()
    assert header.rstrip(" |").endswith("epsilon")
    assert dp.rstrip(" |").endswith("3.25") and plain.rstrip(" |").endswith("-")


def test_compare_resume_keeps_finished_runs_and_continues_the_rest(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "rounds": 4, "checkpoint_every": 2}))
    out = tmp_path / "cmp"
    args = ["compare", str(path), "--algorithms", "fedavg,fedprox", "--out", str(out)]
    assert main(args + ["--no-progress"]) == 0
    first = json.loads((out / "comparison.json").read_text())
    capsys.readouterr()
    assert main(args + ["--no-progress"]) == 2            # holds runs: says --resume
    assert "--resume" in capsys.readouterr().err
    # as if interrupted: fedprox's last checkpoint and outputs gone
    import shutil
    shutil.rmtree(out / "fedprox" / "seed0" / "checkpoints" / "4")
    (out / "fedprox" / "seed0" / "summary.json").unlink()
    assert main(args + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "finished earlier" in err and "fedavg" in err.split("finished earlier")[1]
    again = json.loads((out / "comparison.json").read_text())
    for a, b in zip(first["table"], again["table"]):
        assert a["final_eval_accuracy_mean"] == b["final_eval_accuracy_mean"]
    assert json.loads((out / "fedprox" / "seed0" / "summary.json").read_text())[
        "resumed_from_round"] == 2
