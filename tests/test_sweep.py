"""`fedjax-lite sweep`: a vmapped member computes what its own run computes."""

import json
import math
import signal

import pytest
import yaml

from fedjax_lite.experiment import config as cfg
from fedjax_lite.experiment.cli import main
from fedjax_lite.experiment.interrupt import Interrupted, Interrupts
from fedjax_lite.experiment.outputs import TIMING_KEYS, read_metrics
from fedjax_lite.experiment.runner import run
from fedjax_lite.experiment.sweep import group_members, plan, short_names, sweep
from fedjax_lite.experiment.swept import NotVmappable, Swept

BASE = {
    "seed": 0, "rounds": 4, "eval_every": 2, "checkpoint_every": 2,
    "data": {"kind": "synthetic_logistic", "num_clients": 24, "num_features": 4,
             "mean_examples": 10, "seed": 7},
    "algorithm": {"name": "fedprox", "clients_per_round": 6, "batch_size": 4},
}
GRID = ["algorithm.client_optimizer.learning_rate=0.05,0.3", "algorithm.mu=0.01,0.5"]


def assert_same_rows(got_path, want_path, rel=1e-5):
    got, want = read_metrics(got_path), read_metrics(want_path)
    assert [r["round"] for r in got] == [r["round"] for r in want]
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for k, v in w.items():
            if k in TIMING_KEYS or v is None or g[k] is None:
                assert (g[k] is None) == (v is None) or k in TIMING_KEYS, k
                continue
            assert math.isclose(g[k], v, rel_tol=rel, abs_tol=1e-7), (k, g[k], v)


def config_of(raw, tmp_path, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def fedprox_sweep(tmp_path_factory):
    """fedprox over lr x mu x seeds 0,1 with a fixed data seed: ONE vmapped program."""
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "out"
    code = main(["sweep", config_of(BASE, tmp), *sum([["--grid", g] for g in GRID], []),
                 "--seeds", "0,1", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_vmapped_members_equal_their_runs_alone(fedprox_sweep, tmp_path, capsys):
    out = fedprox_sweep
    doc = json.loads((out / "comparison.json").read_text())
    assert len(doc["members"]) == 8
    assert [len(g["members"]) for g in doc["groups"]] == [8]          # one program
    assert doc["groups"][0]["vmapped"] and sorted(doc["groups"][0]["swept"]) == [
        "algorithm.client_optimizer.learning_rate", "algorithm.mu"]
    members = {m.name: m for m in plan(BASE, GRID, "0,1")}
    # (lr=0.3,mu=0.5,seed=1 is checked against its run alone in the fallback test)
    for name in ("lr=0.05,mu=0.01,seed=0",):
        folder = out / "members" / name
        alone = tmp_path / name
        run(members[name].config, str(alone), progress=False)
        assert_same_rows(folder / "metrics.jsonl", alone / "metrics.jsonl")
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved == yaml.safe_load((alone / "config.yaml").read_text())
        assert json.loads((folder / "summary.json").read_text())["final"]["round"] == 4
    # members really differ (lr, mu and seed all act)
    finals = {n: read_metrics(out / "members" / n / "metrics.jsonl")[-1]["eval_loss"]
              for n in doc["members"]}
    assert len(set(finals.values())) == 8
    # the table: one row per configuration, mean +- std over both seeds, the best
    md = (out / "comparison.md").read_text()
    assert md.startswith("| configuration |") and "best configuration: **" in md
    table = {r["method"]: r for r in doc["table"]}
    assert sorted(table) == ["lr=0.05,mu=0.01", "lr=0.05,mu=0.5", "lr=0.3,mu=0.01",
                             "lr=0.3,mu=0.5"]
    row = table["lr=0.3,mu=0.5"]
    accs = [read_metrics(out / "members" / f"lr=0.3,mu=0.5,seed={s}" / "metrics.jsonl")[-1][
        "eval_accuracy"] for s in (0, 1)]
    assert row["seeds"] == [0, 1]
    assert row["final_eval_accuracy_mean"] == pytest.approx(sum(accs) / 2)
    best = doc["best"]
    assert best["metric"] == "eval_accuracy" and best["mean"] == max(
        r["final_eval_accuracy_mean"] for r in doc["table"])
    assert (out / "curves.png").stat().st_size > 0


def test_interrupted_group_resumes_to_the_same_rows(fedprox_sweep, tmp_path, capsys):
    """Ctrl-C after round 2: checkpointed; --resume finishes with the same metrics."""

    out = tmp_path / "out"
    saved = out / "groups" / "lr=0.05,mu=0.01,seed=0" / "checkpoints" / "2"

    class StopAtRound(Interrupts):           # "SIGINT" once round 2 is checkpointed
        @property
        def requested(self):
            return signal.SIGINT if saved.exists() else None

        @requested.setter
        def requested(self, value):
            pass

    with pytest.raises(Interrupted) as stopped:
        sweep(BASE, str(out), grids=GRID, seeds="0,1", progress=False,
              interrupts=StopAtRound())
    assert stopped.value.round == 2
    name = "lr=0.3,mu=0.5,seed=1"
    assert [r["round"] for r in read_metrics(out / "members" / name / "metrics.jsonl")] \
        == [0, 2]
    with pytest.raises(cfg.OutputError, match="--resume"):       # not overwritten
        sweep(BASE, str(out), grids=GRID, seeds="0,1", progress=False)
    sweep(BASE, str(out), grids=GRID, seeds="0,1", progress=False, resume=True)
    for n in (name, "lr=0.05,mu=0.01,seed=0"):
        assert_same_rows(out / "members" / n / "metrics.jsonl",
                         fedprox_sweep / "members" / n / "metrics.jsonl", rel=1e-6)
        assert json.loads((out / "members" / n / "summary.json").read_text())[
            "resumed_from_round"] == 2


def test_dp_members_are_vmapped_and_accounted_each(tmp_path):
    raw = {**BASE, "rounds": 3, "eval_every": 3, "checkpoint_every": 0,
           "data": {**BASE["data"], "num_clients": 40},
           "algorithm": {"name": "fedavg", "clients_per_round": 8, "batch_size": 4,
                         "weighting": "uniform"},
           "aggregator": {"name": "dp_gaussian", "clip_norm": 0.5, "noise_multiplier": 0.8}}
    grid = ["algorithm.client_optimizer.learning_rate=0.05,0.2",
            "aggregator.noise_multiplier=0.8,1.3", "aggregator.clip_norm=0.5,1.0"]
    out = tmp_path / "out"
    doc = sweep(raw, str(out), grids=grid, seeds="0,1", progress=False)
    # the clip norm and the noise multiplier vmap too: one program of 16 members
    assert [len(g["members"]) for g in doc["groups"]] == [16] and doc["groups"][0]["vmapped"]
    member = plan(raw, grid, "0,1")[13]
    assert member.name == "lr=0.2,noise=1.3,clip=0.5,seed=1"
    run(member.config, str(tmp_path / "alone"), progress=False)
    assert_same_rows(out / "members" / member.name / "metrics.jsonl",
                     tmp_path / "alone" / "metrics.jsonl")
    last = read_metrics(out / "members" / member.name / "metrics.jsonl")[-1]
    assert last["epsilon"] > 0 and last["train_loss"] is None     # nothing non-private


def test_non_vmappable_grid_runs_members_alone(fedprox_sweep, tmp_path, capsys):
    raw = {**BASE, "algorithm": {**BASE["algorithm"], "client_optimizer": {
        "name": "sgd", "learning_rate": 0.3}}}
    out = tmp_path / "out"
    assert main(["sweep", config_of(raw, tmp_path), "--grid",
                 "algorithm.name=fedavg,fedprox", "--set", "algorithm.mu=0.5", "--seeds", "1",
                 "--out", str(out), "--no-progress"]) == 0
    assert "| name=fedprox |" in capsys.readouterr().out
    doc = json.loads((out / "comparison.json").read_text())
    assert [(g["members"], g["vmapped"]) for g in doc["groups"]] == [
        (["name=fedavg,seed=1"], False), (["name=fedprox,seed=1"], False)]
    folder = out / "members" / "name=fedprox,seed=1"
    assert (folder / "curves.png").exists() and (folder / "checkpoints").is_dir()
    # run alone by the runner: the same rows as the vmapped member of that config
    assert_same_rows(folder / "metrics.jsonl",
                     fedprox_sweep / "members" / "lr=0.3,mu=0.5,seed=1" / "metrics.jsonl")
    saved = yaml.safe_load((out / "members" / "name=fedavg,seed=1" / "config.yaml").read_text())
    assert saved["algorithm"]["name"] == "fedavg" and "mu" not in saved["algorithm"]


@pytest.mark.parametrize("args, message", [
    (["--grid", "algorithm.mu=0.1,abc"],
     "config error: sweep member mu=abc,seed=0: config key 'algorithm.mu': got 'abc'"),
    (["--grid", "algorithm.mu"], "--grid 'algorithm.mu': expected KEY.PATH=V1,V2"),
    (["--grid", "algorithm.mu=0.1,,0.2"], "none empty"),
    (["--grid", "algorithm.client_optimizer.learning_rate=0.1,-1"],
     "sweep member lr=-1,seed=0: config key 'algorithm.client_optimizer.learning_rate'"),
    (["--grid", "algorithm.mu=0.1", "--seeds", "0,x"], "--seeds '0,x': expected"),
    (["--grid", "algorithm.muu=1,2"], "sweep member muu=1,seed=0: unknown config key "
                                      "'algorithm.muu'"),
])
def test_bad_grid_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["sweep", config_of(BASE, tmp_path), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()                                # nothing was written


def test_grouping_follows_the_data_seed():
    shared = plan(BASE, GRID, "0,1,2")
    assert len(group_members(shared)) == 1               # data.seed fixed: one program
    own = {**BASE, "data": {**BASE["data"], "seed": None}}
    groups = group_members(plan(own, GRID, "0,1,2"))      # data follows each seed
    assert [[m.config.seed for m in g] for g in groups] == [[0] * 4, [1] * 4, [2] * 4]
    other = group_members(plan(BASE, ["algorithm.batch_size=2,4"], "0,1"))
    assert [len(g) for g in other] == [2, 2]              # not a vmappable key
    attacked = {**BASE, "attack": {"kind": "sign_flip", "fraction": 0.2}}
    assert len(group_members(plan(attacked, [], "0,1"))) == 2   # attackers follow the seed


def test_members_evaluated_on_their_training_data_run_alone():
    """eval.train rows come from the runner: such members are not vmapped."""
    from fedjax_lite.experiment.sweep import not_vmappable_reason
    (member,) = plan({**BASE, "eval": {"train": True}}, [], "0")
    assert "eval.train" in not_vmappable_reason(member.config)
    assert not_vmappable_reason(plan(BASE, [], "0")[0].config) is None


def test_member_names():
    assert short_names(["algorithm.client_optimizer.learning_rate", "algorithm.mu"]) == {
        "algorithm.client_optimizer.learning_rate": "lr", "algorithm.mu": "mu"}
    both = short_names(["algorithm.client_optimizer.learning_rate",
                        "algorithm.server_optimizer.learning_rate"])
    assert both == {"algorithm.client_optimizer.learning_rate": "client_optimizer.lr",
                    "algorithm.server_optimizer.learning_rate": "server_optimizer.lr"}
    names = [m.name for m in plan(BASE, ["data.test_split=examples,clients"], "3")]
    assert names == ["test_split=examples,seed=3", "test_split=clients,seed=3"]


def test_swept_values_decide_only_when_members_agree():
    import jax.numpy as jnp
    mu = Swept(jnp.float32(0.5), (0.0, 0.5, 1.0), "algorithm.mu")
    assert not (mu < 0) and mu >= 0                      # every member agrees
    with pytest.raises(NotVmappable, match="algorithm.mu"):
        bool(mu > 0.2)                                    # they disagree
    with pytest.raises(NotVmappable, match="concrete"):
        float(mu)
    half = 0.5 * mu
    assert isinstance(half, Swept) and half.host == (0.0, 0.25, 0.5)
    assert float((half * jnp.ones(2))[0]) == 0.25        # meets an array: traced value
    assert float(jnp.square(mu)) == 0.25


def test_poisson_cohort_bound_is_the_runners():
    from fedjax_lite.core import poisson_bound
    from fedjax_lite.experiment import privacy_run
    from fedjax_lite.experiment.sweep_group import cohort_bound
    raw = {**BASE, "algorithm": {**BASE["algorithm"], "sampling": "poisson"}}
    config = cfg.parse(raw)
    assert cohort_bound(config, 20, None) == poisson_bound(20, 6 / 20, 1e-12)
    dp = cfg.parse({**raw, "algorithm": {**raw["algorithm"], "weighting": "uniform"},
                    "aggregator": {"name": "dp_gaussian", "noise_multiplier": 1.0}})
    _, setup = privacy_run.resolve(dp, 20)
    ledger = privacy_run.Ledger(setup, dp.privacy.delta)
    bound, p = cohort_bound(dp, 20, ledger)
    assert ledger.overflow_p == p and p <= ledger.overflow_tail(dp.rounds)
    assert bound == poisson_bound(20, 6 / 20, min(1e-12, ledger.overflow_tail(4)))[0]
