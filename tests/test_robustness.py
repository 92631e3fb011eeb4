"""Robust aggregation under attack, end to end through the runner (issue: 20% sign-flip
attackers on the synthetic task: the mean loses accuracy; median, trimmed mean and Krum
stay within a few points of the attack-free run), and dropout."""

import pytest

from fedjax_lite.experiment import config as cfg
from fedjax_lite.experiment.outputs import read_metrics
from fedjax_lite.experiment.runner import run

BASE = {
    "seed": 0, "rounds": 12, "eval_every": 12, "checkpoint_every": 0,
    "data": {"kind": "synthetic_logistic", "num_clients": 100, "num_features": 10,
             "mean_examples": 30, "feature_shift": 0.5},
    "algorithm": {"name": "fedavg", "clients_per_round": 20, "local_epochs": 2,
                  "batch_size": 8, "weighting": "uniform"},
}
ATTACK = {"kind": "sign_flip", "fraction": 0.2, "scale": 4.0}


def final_accuracy(tmp_path, name, **sections):
    config = cfg.parse({**BASE, **sections})
    summary = run(config, str(tmp_path / name), progress=False)
    return summary["final"]["eval_accuracy"], read_metrics(str(tmp_path / name / "metrics.jsonl"))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return final_accuracy(tmp_path_factory.mktemp("clean"), "clean")[0]


def test_mean_breaks_under_sign_flip(clean, tmp_path):
    attacked, rows = final_accuracy(tmp_path, "mean", attack=ATTACK)
    assert clean > 0.9
    assert attacked < clean - 0.15
    assert rows[-1]["attackers_in_cohort"] > 0


@pytest.mark.parametrize("aggregator", [{"name": "median"},
                                        {"name": "trimmed_mean", "trim": 0.3},
                                        {"name": "krum", "num_byzantine": 6}])
def test_robust_aggregators_hold(clean, tmp_path, aggregator):
    attacked, _ = final_accuracy(tmp_path, aggregator["name"], attack=ATTACK,
                                 aggregator=aggregator)
    assert attacked > clean - 0.05, (aggregator, attacked, clean)


def test_dropout_reports_survivors(tmp_path):
    accuracy, rows = final_accuracy(tmp_path, "dropout", clients={"dropout": 0.5})
    assert 5 < rows[-1]["reporting_clients"] < 15   # about half of 20
    assert accuracy > 0.85
