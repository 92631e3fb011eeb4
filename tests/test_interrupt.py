"""Runs a user can stop and trust: SIGINT / SIGTERM stop cleanly (one line, checkpoint,
exit 130 / 143) at a round boundary or at once while compiling; a corrupt latest
checkpoint is detected and skipped; a finished run can be extended; nothing is created
before validation passes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fedjax_lite.experiment.cli import main
from test_cli import ROOT, SMALL, write_config

CLI = [sys.executable, "-m", "fedjax_lite.experiment.cli"]


def _start(path, out, *extra):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen(CLI + ["run", path, "--out", str(out), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _training(tmp_path, raw, settle: float):
    """A run of ``raw`` in a subprocess, returned once it has evaluated round 0 and
    trained for ``settle`` seconds (the signal handlers are then in training mode)."""
    path, out = write_config(tmp_path, raw), tmp_path / "run"
    proc = _start(path, out, "--no-progress")
    metrics = out / "metrics.jsonl"
    assert _wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, proc)
    time.sleep(settle)
    return proc, path, out


def test_sigint_during_training_checkpoints_and_exits_130(tmp_path):
    raw = {**SMALL, "rounds": 100000, "eval_every": 1000, "checkpoint_every": 0}
    proc, path, out = _training(tmp_path, raw, 0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "interrupted after round" in lines[0], err
    stopped = int(lines[0].split("after round ")[1].split(";")[0])
    assert stopped > 0
    assert sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit())[-1] == stopped
    # the run continues from there (a shortened run: same config apart from rounds)
    resumed = _start(path, out, "--resume", "--no-progress", "--set",
                     f"rounds={stopped + 2}")      # a fresh process: same devices
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert json.loads((out / "summary.json").read_text())["resumed_from_round"] == stopped


def test_sigterm_while_compiling_exits_143_at_once(tmp_path):
    path = write_config(tmp_path, {**SMALL, "rounds": 5})
    out = tmp_path / "run"
    proc = _start(path, out)                          # progress on: the compile line
    lines = []

    def compiling():
        line = proc.stderr.readline()
        lines.append(line)
        return "compiling" in line
    assert _wait_for(compiling, proc), lines
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert time.time() - t < 5
    assert "Traceback" not in err and "interrupted before training started" in err


def _corrupt(run_dir, round_num, how):
    d = run_dir / "checkpoints" / str(round_num)
    if how == "metadata":
        for root, _, files in os.walk(d):
            for f in files:
                if root.endswith("meta") or f == "metadata" and "meta" in root:
                    (open(os.path.join(root, f), "w")).write("{not json")
    elif how == "missing_item":
        shutil.rmtree(d / "state")
    elif how == "bitflip":
        files = [os.path.join(r, f) for r, _, fs in os.walk(d / "state") for f in fs
                 if os.path.getsize(os.path.join(r, f)) > 64 and "manifest" not in f
                 and not f.endswith(".json") and "_METADATA" not in f]
        for f in files:
            data = bytearray(open(f, "rb").read())
            data[len(data) // 2] ^= 0x10
            open(f, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["metadata", "missing_item", "bitflip"])
def test_corrupt_latest_checkpoint_falls_back_to_an_older_one(tmp_path, capsys, how):
    path = write_config(tmp_path, {**SMALL, "rounds": 6, "eval_every": 2,
                                   "checkpoint_every": 2})
    out = tmp_path / "run"
    assert main(["run", path, "--out", str(out), "--no-progress"]) == 0
    reference = np.load(out / "params.npz")["w"].copy()
    capsys.readouterr()
    _corrupt(out, 6, how)
    assert main(["run", path, "--out", str(out), "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint of round 6 is unusable" in err and "resuming from round 4" in err
    assert "Traceback" not in err
    assert np.load(out / "params.npz")["w"].tobytes() == reference.tobytes()
    assert (out / "checkpoints_unusable" / "6").exists()


def test_no_usable_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    path = write_config(tmp_path, {**SMALL, "rounds": 4, "checkpoint_every": 2})
    out = tmp_path / "run"
    assert main(["run", path, "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    for r in (2, 4):
        _corrupt(out, r, "missing_item")
    assert main(["run", path, "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no usable checkpoint" in err and "round 4" in err


def test_extending_a_finished_run_equals_the_longer_run(tmp_path):
    path = write_config(tmp_path, {**SMALL, "rounds": 10, "eval_every": 5})
    assert main(["run", path, "--out", str(tmp_path / "long"), "--no-progress"]) == 0
    short = tmp_path / "short"
    assert main(["run", path, "--out", str(short), "--no-progress",
                 "--set", "rounds=5"]) == 0
    assert main(["run", path, "--out", str(short), "--no-progress", "--resume",
                 "--set", "rounds=10"]) == 0
    a, b = np.load(tmp_path / "long" / "params.npz"), np.load(short / "params.npz")
    for k in a.files:
        assert a[k].tobytes() == b[k].tobytes()


def test_nothing_is_created_before_validation(tmp_path, capsys):
    bad = {**SMALL, "data": {"kind": "npz", "path": str(tmp_path / "missing.npz")}}
    out = tmp_path / "never"
    assert main(["run", write_config(tmp_path, bad), "--out", str(out),
                 "--no-progress"]) == 2
    assert not out.exists()
    assert main(["run", write_config(tmp_path, SMALL), "--out", str(out), "--resume",
                 "--no-progress"]) == 2
    assert not out.exists()
    assert "no checkpoint to resume" in capsys.readouterr().err


def test_second_signal_exits_at_once(tmp_path):
    # rounds long enough (~0.1-1 s) that both signals land inside one round
    raw = {**SMALL, "rounds": 100000, "eval_every": 1000, "checkpoint_every": 0,
           "data": {**SMALL["data"], "num_clients": 400, "mean_examples": 400},
           "algorithm": {**SMALL["algorithm"], "clients_per_round": 400,
                         "local_epochs": 5, "batch_size": 2}}
    proc, _, _ = _training(tmp_path, raw, 1.0)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)          # two separate deliveries (pending signals of one kind merge)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted again; stopped at once" in err and "Traceback" not in err
