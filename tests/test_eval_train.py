"""``eval.train``: the global model's loss and accuracy on the training population
(the federated objective FL papers plot as training loss), against float64 NumPy."""

import numpy as np

from fedjax_lite.experiment import config as cfg
from fedjax_lite.experiment.builders import build_data
from fedjax_lite.experiment.cli import main
from fedjax_lite.experiment.outputs import read_metrics
from test_cli import SMALL, write_config


def test_eval_train_is_the_example_weighted_loss_on_the_training_clients(tmp_path, capsys):
    raw = {**SMALL, "rounds": 3, "eval_every": 3, "eval": {"train": True}}
    out = tmp_path / "run"
    assert main(["run", write_config(tmp_path, raw), "--out", str(out), "--no-progress"]) == 0
    row = read_metrics(str(out / "metrics.jsonl"))[-1]
    params = np.load(out / "params.npz")
    train, _ = build_data(cfg.parse(raw))
    x = train.x.astype(np.float64).reshape(train.num_clients, train.max_examples, -1)
    z = x @ params["w"].astype(np.float64) + float(params["b"])
    y = train.y.astype(np.float64)
    mask = train.mask
    losses = np.logaddexp(0.0, z) - y * z
    np.testing.assert_allclose(row["eval_train_loss"], losses[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(row["eval_train_accuracy"],
                               ((z > 0) == (y > 0))[mask].mean(), rtol=1e-6)
    # a DP run refuses it unless the non-private diagnostics are asked for
    dp = {**raw, "aggregator": {"name": "dp_gaussian", "noise_multiplier": 1.0},
          "algorithm": {**raw["algorithm"], "sampling": "poisson", "weighting": "uniform"},
          "data": {**raw["data"], "test_split": "clients"}}
    assert main(["run", write_config(tmp_path, dp, "dp.yaml"), "--out",
                 str(tmp_path / "dp"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.train" in err[0]
