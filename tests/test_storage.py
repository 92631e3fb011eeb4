"""``data.storage``: device, host and mmap give the same run; prepared folders.

The population's place changes where a cohort's rows are gathered (inside the compiled
round, or on the host before it), never which clients train, with which keys, on which
data: the trained parameters must be bitwise equal, the metrics equal (mmap's blocked
evaluation to float rounding)."""

import copy
import json

import numpy as np
import pytest

from fedjax_lite.data import prepared as prep
from fedjax_lite.data import synthetic_logistic
from fedjax_lite.experiment.cli import main
from fedjax_lite.experiment.outputs import read_metrics
from test_cli import SMALL, strip_timing, write_config

BASE = {**SMALL, "rounds": 4, "eval_every": 2, "checkpoint_every": 2}


def _run(tmp_path, raw, name, *extra):
    path = write_config(tmp_path, raw, f"{name}.yaml")
    out = tmp_path / name
    assert main(["run", path, "--out", str(out), "--no-progress", *extra]) == 0
    params = dict(np.load(out / "params.npz"))
    return params, strip_timing(read_metrics(out / "metrics.jsonl")), out


def _with(raw, **sections):
    out = copy.deepcopy(raw)
    for section, values in sections.items():
        out[section] = {**out.get(section, {}), **values}
    return out


def _same(a, b, rows_a, rows_b, rtol=0.0, blocked=()):
    """Equal parameters and rows; ``rtol`` for every float metric, or only for the
    metrics starting with a prefix in ``blocked`` (evaluated a block at a time on the
    host: summed in another order)."""
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                tol = 1e-6 if k.startswith(tuple(blocked)) else rtol
                np.testing.assert_allclose(rb[k], ra[k], rtol=tol or 0, atol=0 if not tol
                                           else 1e-7, err_msg=k)
            else:
                assert ra[k] == rb[k], k


@pytest.mark.parametrize("case", ["poisson_micro", "scaffold_epochs", "ditto_feedback"])
def test_device_host_and_mmap_train_the_same_model(tmp_path, case):
    """Poisson cohorts (padding slots) in micro-cohorts with dropout; SCAFFOLD (a
    population-sized client state: on the host with host/mmap storage, the round given
    only the cohort's rows) with epoch sampling (the round number enters the sampler);
    Ditto (personal models, evaluated a block at a time from the host) with top-k error
    feedback (residuals, another client state) under dropout."""
    raw = {"poisson_micro": _with(BASE, algorithm={"sampling": "poisson"},
                                  clients={"dropout": 0.2}, engine={"micro_cohort": 3}),
           "scaffold_epochs": _with(BASE, algorithm={"name": "scaffold",
                                                     "sampling": "epochs"}),
           "ditto_feedback": _with(BASE, algorithm={"name": "ditto", "lam": 0.5},
                                   clients={"dropout": 0.3},
                                   compression={"kind": "top_k", "fraction": 0.4,
                                                "error_feedback": True})}[case]
    runs = {s: _run(tmp_path, _with(raw, data={"storage": s}), s)
            for s in ("device", "host", "mmap")}
    p_dev, rows_dev, _ = runs["device"]
    _same(p_dev, runs["host"][0], rows_dev, runs["host"][1], blocked=("eval_personal_",))
    _same(p_dev, runs["mmap"][0], rows_dev, runs["mmap"][1], rtol=1e-6)
    for s, (_, _, out) in runs.items():
        summary = json.loads((out / "summary.json").read_text())
        assert summary["storage"] == s
        assert summary["client_state"] == (None if case == "poisson_micro" else
                                           "device" if s == "device" else "host")
    assert (runs["mmap"][2] / "prepared" / "prepared.json").is_file()


def test_host_storage_resumes_and_extends_exactly(tmp_path):
    """A host-storage run extended with --resume --set rounds=N equals an N-round run
    (the cohort prefetch starts again at the resumed round)."""
    raw = _with(BASE, data={"storage": "host"})
    p_full, rows_full, _ = _run(tmp_path, {**raw, "rounds": 6}, "full")
    _, _, out = _run(tmp_path, raw, "part")
    path = write_config(tmp_path, raw, "part.yaml")
    assert main(["run", path, "--out", str(out), "--no-progress", "--resume",
                 "--set", "rounds=6"]) == 0
    _same(p_full, dict(np.load(out / "params.npz")), rows_full,
          strip_timing(read_metrics(out / "metrics.jsonl")))


def test_prepare_then_run_from_the_folder(tmp_path, capsys):
    """`fedjax-lite prepare` writes the population once; a run with data.prepared reads
    it (auto storage -> mmap) and equals the device run; a second prepare keeps it; a
    config of other data is refused, naming what differs (exit 2, one line)."""
    path = write_config(tmp_path, BASE, "base.yaml")
    folder = tmp_path / "prep"
    assert main(["prepare", path, "--out", str(folder)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["up_to_date"] is False and first["train_clients"] == 30
    assert main(["prepare", path, "--out", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is True
    p_dev, rows_dev, _ = _run(tmp_path, _with(BASE, data={"storage": "device"}), "dev")
    p_mm, rows_mm, out = _run(tmp_path, _with(BASE, data={"prepared": str(folder)}), "mm")
    _same(p_dev, p_mm, rows_dev, rows_mm, rtol=1e-6)
    assert json.loads((out / "summary.json").read_text())["storage"] == "mmap"

    assert main(["prepare", path, "--out", str(folder), "--set", "seed=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed: prepared 1, config 5" in err[0]
    other = write_config(tmp_path, {**_with(BASE, data={"prepared": str(folder)}),
                                    "seed": 5}, "other.yaml")
    assert main(["run", other, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was prepared from other data" in err[0]
    assert not (tmp_path / "x").exists()
    # data.seed pins the data: another run seed then reads the same folder
    pinned = write_config(tmp_path, {**_with(BASE, data={"prepared": str(folder),
                                                         "seed": 1}), "seed": 5},
                          "pinned.yaml")
    assert main(["run", pinned, "--out", str(tmp_path / "y"), "--no-progress"]) == 0


def test_bad_storage_settings_exit_2_naming_the_key(tmp_path, capsys):
    cases = [(_with(BASE, data={"storage": "host"}, engine={"compile_rounds": 2}),
              "engine.compile_rounds"),
             (_with(BASE, data={"storage": "disk"}), "data.storage"),
             (_with(BASE, data={"prepared": str(tmp_path / "none")}), "data.prepared")]
    for i, (raw, key) in enumerate(cases):
        path = write_config(tmp_path, raw, f"bad{i}.yaml")
        assert main(["run", path, "--out", str(tmp_path / f"o{i}"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0], err


def test_prepared_writer_and_mapped_reads_against_numpy(tmp_path):
    """Block-wise writing reproduces the population exactly; MappedArray gathers the
    rows NumPy fancy indexing gives; wrong blocks and unfinished folders are refused."""
    pop = synthetic_logistic(num_clients=23, num_features=3, mean_examples=6, seed=2)
    test = pop.gather(np.arange(5))
    prep.write_prepared(str(tmp_path / "p"), pop, test, {"k": 1}, block=7)
    train2, test2 = prep.open_prepared(str(tmp_path / "p"), {"k": 1})
    rows = np.array([22, 0, 5, 5, 13])
    np.testing.assert_array_equal(train2.x[rows], pop.x[rows])
    np.testing.assert_array_equal(train2.y[rows], pop.y[rows])
    np.testing.assert_array_equal(train2.n, pop.n)
    np.testing.assert_array_equal(np.asarray(test2.x), test.x)
    with pytest.raises(ValueError, match="prepared from other data"):
        prep.open_prepared(str(tmp_path / "p"), {"k": 2})
    w = prep.PreparedWriter(str(tmp_path / "q"), "train", 4, 2, (3,))
    with pytest.raises(ValueError, match="not the next block"):
        w.write(2, np.zeros((2, 2, 3)), np.zeros((2, 2)), np.ones(2), np.arange(2))
    w.write(0, np.zeros((2, 2, 3)), np.zeros((2, 2)), np.ones(2), np.arange(2))
    with pytest.raises(ValueError, match="only 2 of 4"):
        w.close()
    with pytest.raises(ValueError, match="not a prepared folder"):
        prep.open_prepared(str(tmp_path / "q"))


SHARDED_SCRIPT = """
import json, sys
import numpy as np
from fedjax_lite.experiment.cli import main
import jax
assert jax.device_count() == 4, jax.devices()
out = {}
for name in ("replicated", "sharded"):
    code = main(["run", sys.argv[1], "--out", sys.argv[2] + "/" + name, "--no-progress",
                 "--set", "engine.population=" + name])
    assert code == 0, code
    p = np.load(sys.argv[2] + "/" + name + "/params.npz")
    out[name] = {k: p[k].tolist() for k in p}
print(json.dumps(out))
"""


def test_a_sharded_population_trains_the_replicated_model(tmp_path):
    """4 devices, 30 clients (two empty rows pad the shards), Poisson cohorts, SCAFFOLD's
    client state: the population split by rows over the devices (each chunk's rows
    fetched where they live) gives bitwise the parameters of the replicated one."""
    import os
    import subprocess
    import sys
    raw = _with(BASE, algorithm={"name": "scaffold", "sampling": "poisson"})
    path = write_config(tmp_path, raw, "sharded.yaml")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    res = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, path, str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["sharded"] == got["replicated"]


def test_fcf_with_host_storage_keeps_the_private_factors_on_the_host(tmp_path):
    """FCF: the ratings and every user's private factors stay on the host, each round
    gets its cohort's rows; parameters, per-user errors and metrics equal device
    storage bitwise. The other recommenders refuse host storage (exit 2, the key)."""
    from test_recsys_run import REC
    raw = {**REC, "rounds": 4, "eval_every": 2, "checkpoint_every": 2}
    runs = {s: _run(tmp_path, _with(raw, data={"storage": s}), s) for s in ("device", "host")}
    _same(runs["device"][0], runs["host"][0], runs["device"][1], runs["host"][1])
    a, b = (dict(np.load(runs[s][2] / "per_user.npz")) for s in ("device", "host"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert json.loads((runs["host"][2] / "summary.json").read_text())["client_state"] == "host"
    bad = write_config(tmp_path, _with(raw, data={"storage": "host"},
                                       algorithm={"name": "fedrecon"}), "bad.yaml")
    assert main(["run", bad, "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
