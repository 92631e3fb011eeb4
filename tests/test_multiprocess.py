"""Several processes, one run (``jax.distributed`` on 127.0.0.1, gloo collectives between
virtual CPU devices): the same metrics as one process, process 0 alone writes, a
multi-process checkpoint resumes, a signal stops every process after the same round, and
a process killed mid-run makes the other exit (4) within seconds with one line naming it.

The runs are `fedjax-lite run` subprocesses (XLA_FLAGS must be set before JAX starts),
but for the one-device reference, which runs in this process.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from fedjax_lite.experiment.cli import main
from fedjax_lite.experiment.outputs import TIMING_KEYS, read_metrics
from test_cli import ROOT, write_config

CLI = [sys.executable, "-m", "fedjax_lite.experiment.cli"]
TINY = {
    "seed": 1, "rounds": 9, "eval_every": 3, "checkpoint_every": 3,
    "data": {"kind": "synthetic_logistic", "num_clients": 40, "num_features": 5,
             "mean_examples": 12},
    "model": {"kind": "logistic_regression"},
    "algorithm": {"name": "fedavg", "clients_per_round": 16, "local_epochs": 2,
                  "batch_size": 4, "client_optimizer": {"name": "sgd", "learning_rate": 0.1},
                  "server_optimizer": {"name": "sgd", "learning_rate": 1.0}},
    "engine": {"chunk_size": 2},       # several chunks per device on 8 devices
}
# launches that would make JAX find a cluster on its own must not leak into the children
CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri")


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
    return {**env, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(path, out, *extra, devices: int, processes: int = 1,
           heartbeat: float | None = None) -> list[subprocess.Popen]:
    args = CLI + ["run", path, "--out", str(out), "--no-progress", *extra]
    if heartbeat is not None:
        args += ["--heartbeat-timeout", str(heartbeat)]
    if processes == 1:
        launches = [args]
    else:
        where = f"127.0.0.1:{_free_port()}"
        launches = [args + ["--coordinator", where, "--num-processes", str(processes),
                            "--process-id", str(i)] for i in range(processes)]
    return [subprocess.Popen(a, env=_env(devices), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for a in launches]


def _reap(procs) -> None:
    """Kills what still runs (a failed test) and collects every process."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


def _finish(procs, timeout=120) -> list[tuple[int, str, str]]:
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outputs)]
    finally:
        _reap(procs)


# gloo's connection notice, "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number
# of connected peer ranks is : 1", is written by several threads at once: its pieces
# interleave and may land on lines of their own ("1", say; seen in CI)
_GLOO_WORDS = set("[Gloo] Rank is connected to peer ranks. Expected number of connected "
                  "peer ranks is :".split())


def _gloo_piece(line: str) -> bool:
    return all(w in _GLOO_WORDS or w.isdigit() or w.rstrip(".").isdigit()
               for w in line.split())


def _lines(err: str) -> list[str]:
    """stderr without gloo's connection notices (whole or in pieces)."""
    return [x for x in err.splitlines()
            if x.strip() and "[Gloo]" not in x and "peer ranks" not in x
            and not _gloo_piece(x)]


def _assert_same_metrics(rows, reference):
    assert [r["round"] for r in rows] == [r["round"] for r in reference]
    for got, want in zip(rows, reference):
        assert set(got) == set(want)
        for k, v in want.items():
            if k in TIMING_KEYS or v is None:
                assert k in TIMING_KEYS or got[k] is None, k
                continue
            np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=0, err_msg=f"{k} {got}")


def test_two_processes_match_one_and_resume(tmp_path):
    """2 processes x 4 devices == 1 process x 8 devices == 1 device (1 process); process
    0 alone writes and prints; the 2-process checkpoint of round 6 resumes (again with 2
    processes) to round 9 with the same metrics as the uninterrupted runs."""
    path = write_config(tmp_path, TINY)
    t0 = time.time()
    runs = {"two": _start(path, tmp_path / "two", "--set", "rounds=6", devices=4,
                          processes=2),
            "eight": _start(path, tmp_path / "eight", devices=8)}
    # one device: in this process (the subprocesses above run meanwhile)
    assert main(["run", path, "--out", str(tmp_path / "one"), "--no-progress", "--set",
                 "engine.devices=1"]) == 0
    done = {name: _finish(procs) for name, procs in runs.items()}
    for name, results in done.items():
        for rc, _, err in results:
            assert rc == 0, (name, err[-3000:])
    (rc0, out0, err0), (rc1, out1, err1) = done["two"]
    assert json.loads(out0)["round"] == 6 and out1 == ""      # process 0 reports
    assert _lines(err1) == []
    for name in ("metrics.jsonl", "summary.json", "config.yaml", "curves.png",
                 "params.npz"):
        assert (tmp_path / "two" / name).exists(), name
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and len(summary["devices"]) == 8
    eight = read_metrics(str(tmp_path / "eight" / "metrics.jsonl"))
    one = read_metrics(str(tmp_path / "one" / "metrics.jsonl"))
    _assert_same_metrics(eight, one)
    _assert_same_metrics(read_metrics(str(tmp_path / "two" / "metrics.jsonl")), eight[:3])
    first = time.time() - t0

    resumed = _finish(_start(path, tmp_path / "two", "--resume", devices=4, processes=2))
    for rc, _, err in resumed:
        assert rc == 0, err[-3000:]
    assert json.loads(resumed[0][1])["round"] == 9
    _assert_same_metrics(read_metrics(str(tmp_path / "two" / "metrics.jsonl")), eight)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["resumed_from_round"] == 6
    for k in ("w", "b"):
        np.testing.assert_allclose(np.load(tmp_path / "two" / "params.npz")[k],
                                   np.load(tmp_path / "one" / "params.npz")[k],
                                   rtol=1e-5, atol=1e-7)
    print(f"3 runs in {first:.1f} s, resume in {time.time() - t0 - first:.1f} s")


def _wait_training(out, procs, seconds=90):
    metrics = out / "metrics.jsonl"
    deadline = time.time() + seconds
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if metrics.exists() and metrics.stat().st_size > 0:
            time.sleep(0.5)                # round 0 is written: training
            return
        time.sleep(0.05)
    raise AssertionError([_lines(p.communicate()[1])[-5:] if p.poll() is not None else
                          "running" for p in procs])


LONG = ["--set", "rounds=1000000", "--set", "eval_every=100000", "--set",
        "checkpoint_every=0"]


def test_a_killed_process_stops_the_other_within_seconds(tmp_path):
    """SIGKILL one of two processes mid-run: the other exits 4 within a few seconds
    with one line naming the lost process (never a hang). Process 1's loss is found by
    the watchdog (the only line on stderr); process 0's (the coordinator's) makes JAX
    abort the other at once, after its own log, and the last line names process 0. The
    two cases run side by side."""
    path = write_config(tmp_path, TINY)
    pairs = {victim: _start(path, tmp_path / f"run{victim}", *LONG, devices=4,
                            processes=2, heartbeat=3) for victim in (1, 0)}
    try:
        for victim, procs in pairs.items():
            _wait_training(tmp_path / f"run{victim}", procs)
        killed = {}
        for victim, procs in pairs.items():
            procs[victim].send_signal(signal.SIGKILL)
            killed[victim] = time.time()
        for victim, procs in pairs.items():
            survivor = procs[1 - victim]
            _, err = survivor.communicate(timeout=30)
            waited = time.time() - killed[victim]
            lines = _lines(err)
            assert survivor.returncode == 4, err[-3000:]
            assert waited < 10, waited
            assert lines[-1].startswith(f"fedjax-lite: process {victim} of 2"), lines[-5:]
            assert f"stopping process {1 - victim} (exit 4)" in lines[-1]
            if victim == 1:
                assert len(lines) == 1, lines
            print(f"process {1 - victim} exited {waited:.1f} s after process {victim} was "
                  f"killed: {lines[-1]}")
    finally:
        for procs in pairs.values():
            _reap(procs)


def test_a_signal_to_one_process_stops_both_after_the_same_round(tmp_path):
    """SIGINT to process 1 alone: both checkpoint the same round and exit 130 with one
    line each (resuming is tested above)."""
    path = write_config(tmp_path, TINY)
    out = tmp_path / "run"
    procs = _start(path, out, *LONG, devices=4, processes=2)
    try:
        _wait_training(out, procs)
        procs[1].send_signal(signal.SIGINT)
        results = _finish(procs, timeout=60)
    finally:
        _reap(procs)
    stopped = set()
    for i, (rc, _, err) in enumerate(results):
        lines = _lines(err)
        assert rc == 130, err[-3000:]
        assert len(lines) == 1, lines
        assert f"[process {i}]: interrupted after round" in lines[0], lines
        stopped.add(int(lines[0].split("after round ")[1].split(";")[0]))
    assert len(stopped) == 1
    (r,) = stopped
    assert sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit())[-1] == r
