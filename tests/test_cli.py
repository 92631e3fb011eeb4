"""The `fedjax-lite run` workflow end to end: outputs, determinism, errors, resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from fedjax_lite.experiment.cli import main
from fedjax_lite.experiment.outputs import TIMING_KEYS, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = {
    "seed": 1, "rounds": 6, "eval_every": 4, "checkpoint_every": 3,
    "data": {"kind": "synthetic_logistic", "num_clients": 30, "num_features": 5,
             "mean_examples": 12},
    "model": {"kind": "logistic_regression"},
    "algorithm": {"name": "fedavg", "clients_per_round": 7, "local_epochs": 2,
                  "batch_size": 4, "client_optimizer": {"name": "sgd", "learning_rate": 0.1},
                  "server_optimizer": {"name": "sgd", "learning_rate": 1.0}},
}


def write_config(tmp_path, raw, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    path = write_config(tmp, SMALL)
    assert main(["run", path, "--out", str(tmp / "a"), "--no-progress"]) == 0
    return path, tmp / "a"


def test_outputs(small_run):
    _, out = small_run
    for name in ("metrics.jsonl", "summary.json", "config.yaml", "curves.png", "params.npz"):
        assert (out / name).exists(), name
    rows = read_metrics(str(out / "metrics.jsonl"))
    assert [r["round"] for r in rows] == [0, 4, 6]      # round 0, every 4, and the last
    for key in ("round", "train_loss", "eval_loss", "eval_accuracy", "wall_s",
                "clients_per_s", "eval_accuracy_client_mean", "eval_loss_client_mean"):
        assert key in rows[-1]
    assert rows[0]["train_loss"] is None and rows[0]["clients_per_s"] is None
    assert rows[-1]["clients_per_s"] > 0 and 0 <= rows[-1]["eval_accuracy"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final", "rounds", "wall_s", "clients_per_s", "compile_s", "seed",
                "jax_version", "devices"):
        assert key in summary
    assert summary["final"]["round"] == 6 and summary["seed"] == 1
    params = np.load(out / "params.npz")
    assert sorted(params.files) == ["b", "w"] and params["w"].shape == (5,)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["algorithm"]["clients_per_round"] == 7 and saved["engine"]["unroll"] == 4


def test_same_seed_same_metrics(small_run, tmp_path):
    path, out = small_run
    assert main(["run", path, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    a = strip_timing(read_metrics(str(out / "metrics.jsonl")))
    b = strip_timing(read_metrics(str(tmp_path / "b" / "metrics.jsonl")))
    assert a == b
    pa, pb = np.load(out / "params.npz"), np.load(tmp_path / "b" / "params.npz")
    assert all(np.array_equal(pa[k], pb[k]) for k in pa.files)
    # a different seed is a different run
    assert main(["run", path, "--out", str(tmp_path / "c"), "--no-progress",
                 "--set", "seed=2"]) == 0
    c = strip_timing(read_metrics(str(tmp_path / "c" / "metrics.jsonl")))
    assert c != a


def test_config_errors_exit_2(tmp_path, capsys):
    path = write_config(tmp_path, {**SMALL, "rounds": -1})
    assert main(["run", path, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fedjax-lite: config error: config key 'rounds': got -1, expected a positive integer"
    assert main(["run", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    path = write_config(tmp_path, SMALL, "ok.yaml")
    assert main(["run", path, "--out", str(tmp_path / "o"), "--set",
                 "algorithm.client_optimizer.name=adamw2"]) == 2
    assert "unknown optimizer 'adamw2'" in capsys.readouterr().err


def npz_config(tmp_path, x, y, client, extra=None):
    np.savez(tmp_path / "train.npz", x=x, y=y, client=client)
    raw = {**SMALL, "data": {"kind": "npz", "path": str(tmp_path / "train.npz")},
           "algorithm": {**SMALL["algorithm"], "clients_per_round": 2}, **(extra or {})}
    return write_config(tmp_path, raw)


@pytest.mark.parametrize("mutate, message", [
    (lambda x, y, c: (np.where(np.arange(len(x))[:, None] == 7, np.nan, x), y, c),
     r"train.npz: client 1: non-finite feature \(NaN or inf\) in row 7"),
    (lambda x, y, c: (x, np.where(np.arange(len(y)) == 3, 5, y), c),
     r"train.npz: client 0: label 5 in row 3 is out of range, expected \[0, 2\)"),
    (lambda x, y, c: (x, y[:-1], c), r"train.npz: mismatched lengths: x has 18 rows, y 17"),
    (lambda x, y, c: (x, y, np.where(c == 0, 1, c)),
     r"clients_per_round=3 is larger than the population \(2 clients\)"),
])
def test_data_errors_exit_2(tmp_path, capsys, mutate, message):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(18, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    client = np.repeat(np.arange(3), 6)
    xb, yb, cb = mutate(x, y, client)
    path = npz_config(tmp_path, xb, yb, cb, {"algorithm": {**SMALL["algorithm"],
                                                           "clients_per_round": 3}})
    code = main(["run", path, "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("fedjax-lite: data error: ")
    assert re.search(message, err), err


def test_missing_data_file_exit_2(tmp_path, capsys):
    raw = {**SMALL, "data": {"kind": "npz", "path": str(tmp_path / "nope.npz")}}
    assert main(["run", write_config(tmp_path, raw), "--out", str(tmp_path / "o")]) == 2
    assert "data file not found: " + str(tmp_path / "nope.npz") in capsys.readouterr().err


def test_npz_with_test_file(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "train.npz", x=x[:45], y=y[:45], client=np.arange(45) % 5)
    np.savez(tmp_path / "test.npz", x=x[45:], y=y[45:])  # no client ids: one test client
    raw = {**SMALL, "data": {"kind": "npz", "path": str(tmp_path / "train.npz"),
                             "test_path": str(tmp_path / "test.npz")},
           "algorithm": {**SMALL["algorithm"], "clients_per_round": 5}}
    assert main(["run", write_config(tmp_path, raw), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["num_test_examples"] == 15 and summary["num_clients"] == 5


def test_divergence_stops_with_round_and_checkpoint(tmp_path, capsys):
    raw = {**SMALL, "rounds": 20, "checkpoint_every": 0,
           "algorithm": {**SMALL["algorithm"],
                         "client_optimizer": {"name": "sgd", "learning_rate": 1e38}}}
    code = main(["run", write_config(tmp_path, raw), "--out", str(tmp_path / "o"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "non-finite training loss in round" in err
    round_num = int(err.split("in round ")[1].split(";")[0])
    ckpts = os.listdir(tmp_path / "o" / "checkpoints")
    assert str(round_num - 1) in ckpts   # the last good state


def _cli(*args):
    return [sys.executable, "-m", "fedjax_lite.experiment.cli", *args]


def sigkill_after_checkpoint(path, out, at_least: int, env: dict) -> None:
    """Starts ``fedjax-lite run path --out out`` and SIGKILLs it once a checkpoint of
    round >= ``at_least`` exists (asserting it had not finished)."""
    proc = subprocess.Popen(_cli("run", path, "--out", str(out), "--no-progress"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_dir = out / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if ckpt_dir.exists() else []
        if steps and max(steps) >= at_least:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "params.npz").exists()


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    raw = {**SMALL, "rounds": 150, "eval_every": 50, "checkpoint_every": 10}
    path = write_config(tmp_path, raw)
    env = {**os.environ, "PYTHONPATH": ROOT}
    killed = tmp_path / "killed"
    sigkill_after_checkpoint(path, killed, 30, env)

    resumed = subprocess.run(_cli("run", path, "--out", str(killed), "--no-progress",
                                  "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from_round"] >= 30

    # the uninterrupted reference, also a fresh process (same devices as the killed run)
    full = subprocess.run(_cli("run", path, "--out", str(tmp_path / "full"), "--no-progress"),
                          env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    a, b = np.load(killed / "params.npz"), np.load(tmp_path / "full" / "params.npz")
    for k in a.files:
        assert a[k].tobytes() == b[k].tobytes(), k
    assert strip_timing(read_metrics(str(killed / "metrics.jsonl"))) == strip_timing(
        read_metrics(str(tmp_path / "full" / "metrics.jsonl")))


def test_a_second_run_never_overwrites_the_first(small_run, capsys):
    path, out = small_run
    before = (out / "params.npz").read_bytes()
    assert main(["run", path, "--out", str(out), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "params.npz").read_bytes() == before


def test_resume_refuses_a_changed_config(small_run, tmp_path, capsys):
    path, out = small_run
    code = main(["run", path, "--out", str(out), "--resume", "--set", "seed=5"])
    assert code == 2
    assert "--resume: config differs" in capsys.readouterr().err
    code = main(["run", path, "--out", str(tmp_path / "empty"), "--resume"])
    assert code == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_quickstart_reaches_90_percent(tmp_path):
    out = tmp_path / "quick"
    assert main(["run", os.path.join(ROOT, "configs", "quickstart.yaml"), "--out", str(out),
                 "--no-progress"]) == 0
    final = json.loads((out / "summary.json").read_text())["final"]
    assert final["round"] == 100 and final["eval_accuracy"] >= 0.90


def test_compressed_uploads_are_counted(tmp_path):
    raw = {**SMALL, "checkpoint_every": 0, "compression": {"kind": "qsgd", "bits": 4}}
    out = tmp_path / "q"
    assert main(["run", write_config(tmp_path, raw), "--out", str(out), "--no-progress"]) == 0
    rows = read_metrics(str(out / "metrics.jsonl"))
    d = 5 + 1                                        # 5 features + bias
    for r in rows[1:]:                               # 7 clients per round, all report
        assert r["upload_bytes"] == pytest.approx(7 * (32 + 4 * d) / 8)
        assert r["upload_bytes_uncompressed"] == pytest.approx(7 * 32 * d / 8)


def test_rotated_quantization_with_error_feedback_from_the_config(tmp_path):
    raw = {**SMALL, "checkpoint_every": 0,
           "compression": {"kind": "rotated_quantization", "bits": 4, "error_feedback": True}}
    out = tmp_path / "ef"
    assert main(["run", write_config(tmp_path, raw), "--out", str(out), "--no-progress"]) == 0
    rows = read_metrics(str(out / "metrics.jsonl"))
    # 5 features + bias = 6 coordinates, padded to 8; 4 bits each plus min and max
    assert rows[-1]["upload_bytes"] == pytest.approx(7 * (4 * 8 + 64) / 8)
    assert rows[-1]["residual_norm"] > 0
