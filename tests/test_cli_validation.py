"""Bad input gets one line on stderr naming the problem and exit code 2, never a
traceback, and nothing is written before validation passes (issue 10)."""

import os

import numpy as np
import pytest
import yaml

from fedjax_lite.experiment import config as cfg
from fedjax_lite.experiment import config_checks
from fedjax_lite.experiment.cli import main
from fedjax_lite.experiment.compare import method_raw, plan, scope_keys

SMALL = {
    "seed": 1, "rounds": 2, "eval_every": 1, "checkpoint_every": 0,
    "data": {"kind": "synthetic_logistic", "num_clients": 20, "num_features": 3,
             "mean_examples": 8},
    "algorithm": {"name": "fedavg", "clients_per_round": 4, "batch_size": 4},
}


def write(tmp_path, raw, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def refused(capsys, argv, *fragments) -> str:
    """Runs the CLI in-process; asserts exit 2 and ONE stderr line holding fragments."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ------------------------------------------------------------ 1. krum / multi_krum

def test_krum_cohort_requirements_are_checked_at_config_time(tmp_path, capsys):
    path, out = write(tmp_path, SMALL), str(tmp_path / "o")
    refused(capsys, ["run", path, "--out", out, "--set", "aggregator.name=krum",
                     "--set", "aggregator.num_byzantine=2"],
            "config key 'aggregator.num_byzantine'", "num_byzantine + 3",
            "a cohort of 4 (algorithm.clients_per_round)", "num_byzantine <= 1")
    refused(capsys, ["run", path, "--out", out, "--set", "aggregator.name=multi_krum",
                     "--set", "aggregator.num_byzantine=0",
                     "--set", "aggregator.num_selected=5"],
            "config key 'aggregator.num_selected'", "num_selected <= 4")
    refused(capsys, ["compare", path, "--out", out, "--algorithms", "fedavg",
                     "--aggregators", "mean,krum", "--set", "aggregator.num_byzantine=3"],
            "fedavg+krum: config key 'aggregator.num_byzantine'")
    assert not os.path.exists(out)


def test_static_cohort_check_covers_poisson_bounds_and_secure_mean():
    from fedjax_lite.experiment.runner import check_static_cohort
    krum = cfg.parse({**SMALL, "algorithm": {**SMALL["algorithm"], "sampling": "poisson"},
                      "aggregator": {"name": "krum", "num_byzantine": 30}})
    with pytest.raises(cfg.ConfigError, match=r"static cohort of 18 \(the Poisson"):
        check_static_cohort(krum, 18)
    check_static_cohort(krum, 33)                    # n - f - 2 = 1 neighbour: enough
    config_checks.check_config_cohort(krum)          # the Poisson bound is not known yet
    secure = cfg.parse({**SMALL, "aggregator": {"name": "secure_mean", "bits": 24},
                        "algorithm": {**SMALL["algorithm"], "weighting": "uniform"}})
    check_static_cohort(secure, 256)
    with pytest.raises(cfg.ConfigError, match=r"aggregator.bits=24 .* use aggregator.bits "
                                              r"<= 23"):
        check_static_cohort(secure, 300)


# ------------------------------------------------ 2. files, --out, seed out of range

@pytest.mark.parametrize("content, fragment", [
    (b"", "the file is empty"),
    (b"x,y,client\n1,0,0\n", "not a zip archive (17 bytes"),
    ("dir", "not a readable .npz file: a directory"),
    ("objects", "array 'x' holds Python objects"),
    ("header", "not a readable .npz file (EOF"),
    ("member", "member 'x' is not a .npy array"),
])
def test_unreadable_npz_files_are_one_line_data_errors(tmp_path, capsys, content, fragment):
    data = tmp_path / "train.npz"
    if content == "dir":
        data.mkdir()
    elif content == "objects":
        np.savez(data, x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, int),
                 client=np.zeros(4, int))
    elif content in ("header", "member"):
        import zipfile
        with zipfile.ZipFile(data, "w") as z:     # a damaged .npy header / not a .npy
            z.writestr("x.npy", b"\x93NUMPY\x01\x00 garbage" if content == "header"
                       else b"plain text")
    else:
        data.write_bytes(content)
    raw = {**SMALL, "data": {"kind": "npz", "path": str(data)}}
    out = tmp_path / "o"
    err = refused(capsys, ["run", write(tmp_path, raw), "--out", str(out)],
                  "fedjax-lite: data error: " + str(data), fragment)
    assert "allow_pickle" not in err and "pickle.load" not in err     # never suggested
    assert not out.exists()


def test_config_path_that_is_a_directory_or_binary(tmp_path, capsys):
    out = str(tmp_path / "o")
    refused(capsys, ["run", str(tmp_path), "--out", out], "is a directory")
    binary = tmp_path / "c.yaml"
    binary.write_bytes(b"seed: 1\n\x00\x01\x02\xff\xfe")
    refused(capsys, ["run", str(binary), "--out", out], str(binary),
            "not a text (UTF-8) YAML file", "line 2")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"seed: 1\nrounds: \xe9\n")
    refused(capsys, ["compare", str(latin), "--algorithms", "fedavg", "--out", out],
            "not a text (UTF-8) YAML file")
    keys = tmp_path / "keys.yaml"
    keys.write_text("seed: 1\nalgorithm: {1: 2, name: fedavg, 3: 4}\n")
    refused(capsys, ["run", str(keys), "--out", out], "config key 'algorithm.1'")


def test_out_that_is_a_file_or_cannot_be_created(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, SMALL)
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(capsys, ["run", path, "--out", str(afile)],
            f"fedjax-lite: output folder: {afile} is a file")
    refused(capsys, ["compare", path, "--algorithms", "fedavg", "--out", str(afile / "o")],
            "fedjax-lite: output folder: cannot create", f"{afile} is a file")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) ==
                        str(locked) else real_access(p, mode, **kw))
    refused(capsys, ["run", path, "--out", str(locked / "new" / "o")],
            f"cannot create {locked / 'new' / 'o'}: {locked} is not writable")
    refused(capsys, ["run", path, "--out", str(locked)], f"{locked} is not writable")
    assert os.listdir(locked) == []


def test_seed_must_fit_in_64_bits(tmp_path, capsys):
    path, out = write(tmp_path, SMALL), str(tmp_path / "o")
    for seed in (str(2 ** 64), "-1", "1.5"):
        refused(capsys, ["run", path, "--out", out, "--set", f"seed={seed}"],
                "config key 'seed'")
    assert cfg.parse({"seed": 2 ** 63 - 1}).seed == 2 ** 63 - 1
    with pytest.raises(cfg.ConfigError, match=r"in \[0, 2\*\*63 - 1\]"):
        cfg.parse({"seed": 2 ** 63})
    # compare's seeds base, base + 1, ... must fit as well
    refused(capsys, ["compare", path, "--algorithms", "fedavg", "--seeds", "2",
                     "--out", out, "--set", f"seed={2 ** 63 - 1}"], "fedavg: config key 'seed'")


# ------------------------------------------------------------ 3. population memory

def test_huge_population_is_refused_with_the_estimate(tmp_path, capsys):
    raw = {**SMALL, "data": {**SMALL["data"], "num_clients": "1e8"}}
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(SMALL).replace(
        "num_clients: 20", "num_clients: 1e8"))      # YAML reads 1e8 as a string
    assert cfg.parse(yaml.safe_load((tmp_path / "big.yaml").read_text())
                     ).data.num_clients == 10 ** 8
    out = str(tmp_path / "o")
    for argv in (["run", str(tmp_path / "big.yaml")],
                 ["run", write(tmp_path, SMALL), "--set", "data.num_clients=1e8"],
                 ["compare", write(tmp_path, raw), "--algorithms", "fedavg,fedprox"]):
        refused(capsys, argv + ["--out", out], "config key 'data.num_clients'",
                "needs at least", "of host memory", "available")
    assert not os.path.exists(out)


def test_memory_estimate_uses_the_generators_own_sizes():
    from fedjax_lite.data import fedprox_synthetic, synthetic_logistic
    from fedjax_lite.data.synthetic import client_sizes
    pop = synthetic_logistic(num_clients=12, num_features=3, mean_examples=9, seed=5)
    assert client_sizes("synthetic_logistic", seed=5, num_clients=12, num_features=3,
                        mean_examples=9).tolist() == pop.n.tolist()
    pop = fedprox_synthetic(alpha=1, beta=1, num_clients=6, num_features=4, seed=3)
    assert client_sizes("fedprox_synthetic", seed=3, num_clients=6,
                        num_features=4).tolist() == pop.n.tolist()
    config = cfg.parse(SMALL)
    config_checks.check_population_memory(config)      # small: fits
    keys, need, lower, _ = config_checks.population_estimate(config)
    assert keys == ("data.num_clients",) and not lower and need > 20 * 8 * 4 * 4
    with pytest.raises(cfg.ConfigError, match=r"an estimated .* 1.0 KB available \(of "
                                              r"2.0 KB\)"):
        config_checks.check_population_memory(config, available=1000, total=2000)


# ---------------------------------------------------------------- 4. compare options

def test_compare_target_accuracy_must_be_a_fraction(tmp_path, capsys):
    path = write(tmp_path, SMALL)
    for target in ("2", "0", "-0.5", "nan"):
        refused(capsys, ["compare", path, "--algorithms", "fedavg", "--target-accuracy",
                         target, "--out", str(tmp_path / "o")], "--target-accuracy",
                "(0, 1]")


def test_method_specific_keys_apply_to_the_methods_that_take_them():
    raw = {**SMALL, "algorithm": {**SMALL["algorithm"], "mu": 0.5}}   # base is fedavg
    with pytest.raises(cfg.ConfigError, match="applies only to algorithm.name"):
        cfg.parse(raw)                           # a plain run still refuses it
    runs = {label: c for label, _, c in plan(raw, ["fedavg", "fedprox"], None, 1)}
    assert runs["fedprox"].algorithm.mu == 0.5
    assert "mu" not in method_raw(raw, "fedavg", None)["algorithm"]
    base, notes = scope_keys(raw, ["fedavg", "fedprox", "fedsgd"], None)
    assert "mu" not in base["algorithm"] and notes == ["algorithm.mu (for fedavg, fedsgd)"]
    with pytest.raises(cfg.ConfigError, match=r"'algorithm.mu' applies only to "
                                              r"algorithm.name in \(fedprox\); none of"):
        plan(raw, ["fedavg", "fedsgd"], None, 1)
    agg = {**SMALL, "aggregator": {"name": "mean", "trim": 0.2}}
    runs = {label: c for label, _, c in plan(agg, ["fedavg"], ["mean", "trimmed_mean"], 1)}
    assert runs["fedavg+trimmed_mean"].aggregator.trim == 0.2
    assert scope_keys(agg, ["fedavg"], ["mean", "trimmed_mean"])[1] == [
        "aggregator.trim (for mean)"]


def test_compare_headers_to_stderr_table_to_stdout(tmp_path, capsys):
    raw = {**SMALL, "rounds": 1}
    out = tmp_path / "cmp"
    code = main(["compare", write(tmp_path, raw), "--algorithms", "fedavg,fedprox",
                 "--set", "algorithm.mu=0.5", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("| method") and "== " not in captured.out
    assert "== fedavg, seed 1" in captured.err and "== fedprox, seed 1" in captured.err
    assert captured.err.count("algorithm.mu (for fedavg)") == 1
    saved = yaml.safe_load((out / "fedprox" / "seed0" / "config.yaml").read_text())
    assert saved["algorithm"]["mu"] == 0.5
    saved = yaml.safe_load((out / "fedavg" / "seed0" / "config.yaml").read_text())
    assert "mu" not in saved["algorithm"]
    # an output folder that already holds a run is an output-folder problem
    refused(capsys, ["run", write(tmp_path, raw, "r.yaml"), "--out",
                     str(out / "fedavg" / "seed0")],
            "fedjax-lite: output folder: ", "already holds a run")


# ----------------------------------------------------------- 5. --version and --help

def test_version_and_help(capsys):
    from fedjax_lite import __version__
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fedjax-lite {__version__}"
    for command in ("run", "compare"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert e.value.code == 0
        for fragment in ("algorithms (algorithm.name): fedavg", "fedprox", "multi_krum",
                         "aggregators (aggregator.name)", "dp_secure_mean",
                         "data kinds (data.kind)", "synthetic_logistic", "npz",
                         "exit codes: 0 done; 2 bad config", "3 diverged", "130 / 143"):
            assert fragment in text, (command, fragment)
