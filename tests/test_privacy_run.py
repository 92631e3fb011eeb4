"""DP runs end to end (experiment.privacy_run, the runner, the CLI): the epsilon in every
row equals dp-accounting's, computed independently here for the sampling actually used;
nothing computed from client data outside the mechanism is logged; configs that cannot
be accounted, or would exceed a target epsilon, are refused before anything is written."""

import json

import dp_accounting as dpa
import pytest

from fedjax_lite.experiment.cli import main
from fedjax_lite.experiment.outputs import read_metrics
from test_cli import SMALL, write_config

NR = dpa.NeighboringRelation


def dp_raw(sampling="poisson", **privacy):
    return {**SMALL, "checkpoint_every": 0,
            "algorithm": {**SMALL["algorithm"], "weighting": "uniform", "sampling": sampling},
            "aggregator": {"name": "dp_gaussian", "clip_norm": 0.5, "noise_multiplier": 1.2},
            "privacy": {"delta": 1e-4, **privacy}}


def _run(tmp_path, raw, name="dp"):
    out = tmp_path / name
    assert main(["run", write_config(tmp_path, raw, name + ".yaml"), "--out", str(out),
                 "--no-progress"]) == 0
    return read_metrics(str(out / "metrics.jsonl")), json.loads(
        (out / "summary.json").read_text())


def _expected(accountant, event, delta=1e-4):
    accountant.compose(event)
    return accountant.get_epsilon(delta)


def test_poisson_dp_run_reports_dp_accounting_epsilon_and_no_client_data(tmp_path):
    rows, summary = _run(tmp_path, dp_raw())
    K = summary["num_clients"]
    assert [r["round"] for r in rows] == [0, 4, 6] and rows[0]["epsilon"] == 0.0
    for r in rows[1:]:
        want = _expected(dpa.rdp.RdpAccountant(), dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(7 / K, dpa.GaussianDpEvent(1.2)), r["round"]))
        assert r["epsilon"] == pytest.approx(want, rel=1e-9)
    p = summary["privacy"]
    assert p["epsilon"] == pytest.approx(rows[-1]["epsilon"])
    assert (p["sampling"], p["neighboring"], p["accountant"]) == ("poisson", "add_remove", "rdp")
    assert p["sampling_probability"] == pytest.approx(7 / K)
    assert summary["sampling"]["overflow_probability_per_round"] <= 1e-12
    assert 0 <= p["delta_overflow_stop"] <= 1e-4 / 10
    assert "num_train_examples" not in summary and p["secure_mode"] is False
    # nothing computed from client data outside the mechanism
    for r in rows:
        assert r["train_loss"] is None
        for key in ("clipped_fraction", "cohort_size", "num_reporting", "reporting_clients",
                    "nonfinite_clients", "no_client_reported"):
            assert key not in r, key
    assert rows[-1]["noise_std"] == pytest.approx(1.2 * 0.5 / 7)


def test_nonprivate_diagnostics_are_opt_in_and_declared(tmp_path):
    rows, summary = _run(tmp_path, dp_raw(nonprivate_diagnostics=True))
    assert rows[-1]["train_loss"] is not None and "clipped_fraction" in rows[-1]
    assert "cohort_size" in rows[-1]
    assert summary["privacy"]["nonprivate_diagnostics_logged"] is True


def test_fixed_cohort_run_is_accounted_without_replacement_under_replace_one(tmp_path):
    rows, summary = _run(tmp_path, dp_raw("fixed", accountant="rdp"))
    K = summary["num_clients"]
    want = _expected(dpa.rdp.RdpAccountant(neighboring_relation=NR.REPLACE_ONE),
                     dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(
                         K, 7, dpa.GaussianDpEvent(0.6)), 6))
    assert rows[-1]["epsilon"] == pytest.approx(want, rel=1e-9)
    assert summary["privacy"]["neighboring"] == "replace_one"


def test_pld_accountant(tmp_path):
    rows, summary = _run(tmp_path, dp_raw(accountant="pld"))
    want = _expected(dpa.pld.PLDAccountant(), dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(7 / summary["num_clients"], dpa.GaussianDpEvent(1.2)), 6))
    assert rows[-1]["epsilon"] == pytest.approx(want, rel=1e-9)


def test_target_epsilon_calibrates_the_noise(tmp_path):
    raw = dp_raw(target_epsilon=3.0)
    raw["aggregator"]["noise_multiplier"] = None
    rows, summary = _run(tmp_path, raw)
    z = summary["privacy"]["noise_multiplier"]
    assert rows[-1]["epsilon"] <= 3.0
    tighter = _expected(dpa.rdp.RdpAccountant(), dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(7 / summary["num_clients"], dpa.GaussianDpEvent(0.99 * z)),
        6))
    assert tighter > 3.0                       # the smallest such z, to 1%


def test_refused_before_anything_is_written(tmp_path, capsys):
    cases = [
        (dp_raw(target_epsilon=0.5), "reach epsilon"),          # z = 1.2 overshoots
        ({**dp_raw(), "algorithm": {**dp_raw()["algorithm"], "name": "scaffold"}},
         "scaffold cannot be combined"),
        ({**dp_raw("fixed"), "privacy": {"neighboring": "add_remove"}},
         "add_remove is not valid with algorithm.sampling fixed"),
        ({**SMALL, "data": {**SMALL["data"], "num_clients": 300},
          "algorithm": {**SMALL["algorithm"], "weighting": "uniform",
                        "clients_per_round": 300},
          "aggregator": {"name": "secure_mean", "bits": 24}}, "aggregator.bits"),
    ]
    for i, (raw, message) in enumerate(cases):
        out = tmp_path / f"r{i}"
        assert main(["run", write_config(tmp_path, raw, f"r{i}.yaml"), "--out", str(out),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not (out / "config.yaml").exists()


def test_privacy_command(capsys):
    q = 256 / 60000
    assert main(["privacy", "--rounds", "14063", "--sampling-rate", str(q),
                 "--noise-multiplier", "1.1", "--delta", "1e-5", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["epsilon"] == pytest.approx(2.597, abs=0.005)
    assert main(["privacy", "--rounds", "100", "--sampling-rate", "0.05", "--delta", "1e-5",
                 "--sampling", "fixed", "--population", "1000", "--noise-multiplier", "1",
                 "--json"]) == 0
    fixed = json.loads(capsys.readouterr().out)
    want = _expected(dpa.rdp.RdpAccountant(neighboring_relation=NR.REPLACE_ONE),
                     dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(
                         1000, 50, dpa.GaussianDpEvent(0.5)), 100), 1e-5)
    assert fixed["epsilon"] == pytest.approx(want, rel=1e-9)
    assert main(["privacy", "--rounds", "100", "--sampling-rate", "0.05", "--delta", "1e-5",
                 "--target-epsilon", "2", "--accountant", "pld", "--json"]) == 0
    solved = json.loads(capsys.readouterr().out)
    assert solved["epsilon"] <= 2.0 and solved["noise_multiplier"] > 1
    assert main(["privacy", "--rounds", "100", "--sampling-rate", "0.05", "--delta", "1e-5",
                 "--sampling", "fixed", "--noise-multiplier", "1"]) == 2
    assert "--population" in capsys.readouterr().err


def test_dp_ftrl_with_epoch_sampling_is_tree_aggregation_per_epoch(tmp_path):
    """Each client once per epoch, a fresh tree per epoch: dp-accounting's single-epoch
    tree aggregation event per tree (zero-out neighbours), no amplification."""
    raw = dp_raw("epochs")
    raw["aggregator"] = {"name": "dp_ftrl", "clip_norm": 0.5, "noise_multiplier": 1.2}
    rows, summary = _run(tmp_path, raw, "ftrl")
    K = summary["num_clients"]
    per_epoch = -(-K // 7)
    assert summary["privacy"]["restart_every"] == per_epoch
    trees = [per_epoch] * (6 // per_epoch) + ([6 % per_epoch] if 6 % per_epoch else [])
    want = _expected(dpa.rdp.RdpAccountant(neighboring_relation=NR.REPLACE_SPECIAL),
                     dpa.ComposedDpEvent([dpa.SingleEpochTreeAggregationDpEvent(1.2, t)
                                          for t in trees]))
    assert rows[-1]["epsilon"] == pytest.approx(want, rel=1e-9)
    assert summary["privacy"]["neighboring"] == "zero_out"
    assert "tree_round" in rows[-1] and "clipped_fraction" not in rows[-1]


def test_poisson_overflow_stops_the_run_cleanly(tmp_path, capsys):
    """A static bound at the expected cohort size (7 of 30, q = 7/30) is exceeded within a
    few rounds: the run stops with exit 2 and one line giving the per-round probability,
    after checkpointing the last good state; the round is never used. A DP run refuses such
    a bound before anything is written (its stop would add more than delta / 10)."""
    raw = {**SMALL, "algorithm": {**SMALL["algorithm"], "sampling": "poisson",
                                  "max_cohort_size": 7}}
    out = tmp_path / "over"
    assert main(["run", write_config(tmp_path, raw, "over.yaml"), "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Poisson sampling drew more than the static cohort bound of 7" in err
    assert "probability" in err and "Traceback" not in err
    assert (out / "checkpoints").exists()
    dp = dp_raw()
    dp["algorithm"]["max_cohort_size"] = 7
    assert main(["run", write_config(tmp_path, dp, "dpover.yaml"), "--out",
                 str(tmp_path / "dpover"), "--no-progress"]) == 2
    assert "would add more than delta / 10" in capsys.readouterr().err
    assert not (tmp_path / "dpover" / "config.yaml").exists()


def test_expected_reporting_denominator_under_dropout(tmp_path):
    """denominator expected_reporting divides by C (1 - dropout): the noise std on the mean
    update says which denominator was used."""
    raw = dp_raw()
    raw["clients"] = {"dropout": 0.2}
    raw["aggregator"]["denominator"] = "expected_reporting"
    rows, _ = _run(tmp_path, raw, "drop")
    assert rows[-1]["noise_std"] == pytest.approx(1.2 * 0.5 / (7 * 0.8), rel=1e-6)


def test_a_dp_round_with_an_empty_cohort_still_releases_noise():
    """Keeping the model when nobody reported would reveal an empty cohort (a count of
    clients the accounting does not cover): a DP aggregate is applied every round."""
    import jax
    import jax.numpy as jnp
    import optax
    from fedjax_lite.algorithms import fedavg
    from fedjax_lite.core import EngineOptions, make_cohort
    from fedjax_lite.data import synthetic_logistic
    from fedjax_lite.models import logistic_regression
    from fedjax_lite.privacy.gaussian import dp_gaussian
    population = jax.device_put(synthetic_logistic(num_clients=8, num_features=3,
                                                   mean_examples=6, seed=0).arrays())
    model = logistic_regression(3)
    empty = make_cohort(population, jnp.zeros(4, jnp.int32), jnp.zeros(4, bool))
    for agg, moves in ((dp_gaussian(1.0, 1.0, 4.0), True), (None, False)):
        alg = fedavg(model, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0),
                     local_epochs=1, batch_size=4, weighting="uniform", aggregator=agg,
                     engine=EngineOptions(chunk_size=None, unroll=1))
        state = alg.init(model.init(None))
        new, _ = jax.jit(alg.apply)(state, empty, jax.random.key(0))
        changed = bool(jnp.any(new.params["w"] != state.params["w"]))
        assert changed == moves


def test_dp_secure_mean_run_with_dropouts(tmp_path):
    """DP-FedAvg through secure aggregation (fixed cohorts, SecAgg+ graph, dropouts): the
    epsilon is the fixed-cohort one; only the constant upload size is logged."""
    raw = dp_raw("fixed")
    raw["clients"] = {"dropout": 0.2}
    raw["aggregator"] = {"name": "dp_secure_mean", "clip_norm": 0.5, "noise_multiplier": 1.2,
                         "bits": 12, "neighbors": 4, "min_survivors": 3}
    rows, summary = _run(tmp_path, raw, "dpsec")
    want = _expected(dpa.rdp.RdpAccountant(neighboring_relation=NR.REPLACE_ONE),
                     dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(
                         summary["num_clients"], 7, dpa.GaussianDpEvent(0.6)), 6))
    assert rows[-1]["epsilon"] == pytest.approx(want, rel=1e-9)
    assert rows[-1]["secagg_bytes_per_client"] == pytest.approx((12 + 3) * 6 / 8)
    assert "secagg_aborted" not in rows[-1] and "num_reporting" not in rows[-1]
    assert rows[-1]["eval_accuracy"] > 0.5


def test_secure_mode_draws_the_noise_from_the_os_and_resumes(tmp_path):
    """Two secure-mode runs of one config differ (the seed no longer determines the
    noise); the key is stored only beside the checkpoints; --resume continues the run."""
    raw = dp_raw(secure_mode=True)
    raw["checkpoint_every"] = 3
    a, sa = _run(tmp_path, raw, "sa")
    b, _ = _run(tmp_path, raw, "sb")
    assert a[-1]["eval_loss"] != b[-1]["eval_loss"]
    assert sa["privacy"]["secure_mode"] is True
    key = tmp_path / "sa" / "checkpoints" / "secret_key.npy"
    assert key.exists() and (key.stat().st_mode & 0o077) == 0
    path = write_config(tmp_path, raw, "sa.yaml")
    assert main(["run", path, "--out", str(tmp_path / "sa"), "--resume",
                 "--no-progress"]) == 0


def test_dp_rows_carry_no_timing_and_eval_clients_are_held_out(tmp_path):
    rows, summary = _run(tmp_path, dp_raw(), "t")
    for r in rows:
        assert r["round_s"] is None and r["clients_per_s"] is None
    # data.test_split auto = whole clients held out in a DP run: fewer training clients
    assert summary["num_clients"] < 30


@pytest.mark.parametrize("change,message", [
    ({"aggregator": {"name": "dp_gaussian", "target_quantile": 0.5},
      "privacy": {"neighboring": "zero_out"}}, "adaptive clipping is accounted"),
    ({"data": {**SMALL["data"], "test_split": "examples"}}, "'data.test_split': examples"),
    ({"aggregator": {"name": "dp_secure_mean", "min_survivors": 1}},
     "'aggregator.min_survivors': 1"),
])
def test_more_refusals(tmp_path, capsys, change, message):
    raw = dp_raw("fixed") if "dp_secure_mean" in str(change) else dp_raw()
    for k, v in change.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    assert main(["run", write_config(tmp_path, raw), "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert message in capsys.readouterr().err
