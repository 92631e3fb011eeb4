"""Config validation: every bad input is one ConfigError line naming the key."""

import glob
import os

import numpy as np
import pytest
import yaml

from fedjax_lite.experiment import config as cfg


def parse(raw):
    return cfg.parse(raw)


def test_defaults_and_round_trip():
    c = parse({"seed": 3, "rounds": 7})
    assert c.seed == 3 and c.rounds == 7 and c.algorithm.name == "fedavg"
    assert parse(cfg.to_dict(c)) == c
    # what config.yaml holds must survive YAML and parse back identically
    assert parse(yaml.safe_load(yaml.safe_dump(cfg.to_dict(c)))) == c


def test_yaml_scientific_notation_strings_are_numbers():
    raw = yaml.safe_load("""
algorithm:
  client_optimizer: {name: adam, learning_rate: 1e-3}
  server_optimizer: {name: sgd, learning_rate: 1e0}
data: {kind: fedprox_synthetic, alpha: 5e-1, beta: 1e0}
model: {kind: multinomial_logistic_regression, num_classes: 10}
""")
    assert raw["algorithm"]["client_optimizer"]["learning_rate"] == "1e-3"  # PyYAML quirk
    c = parse(raw)
    assert c.algorithm.client_optimizer.kwargs["learning_rate"] == pytest.approx(1e-3)
    assert c.algorithm.server_optimizer.kwargs["learning_rate"] == 1.0
    assert c.data.alpha == 0.5 and c.data.beta == 1.0


@pytest.mark.parametrize("raw, match", [
    ({"foo": 1}, r"unknown config key 'foo'; allowed keys: aggregator, algorithm, attack, "
                   r"checkpoint_every"),
    ({"algorithm": {"local_epoch": 1}}, r"unknown config key 'algorithm.local_epoch'"),
    ({"rounds": 0}, r"config key 'rounds': got 0, expected a positive integer"),
    ({"rounds": "ten"}, r"config key 'rounds': got 'ten', expected an integer"),
    ({"rounds": True}, r"config key 'rounds'"),
    ({"algorithm": {"batch_size": -4}}, r"'algorithm.batch_size': got -4"),
    ({"algorithm": {"weighting": "clients"}}, r"'algorithm.weighting'.*'examples', 'uniform'"),
    ({"algorithm": {"name": "fedfoo"}}, r"'algorithm.name'.*'fedavg'"),
    ({"data": {"kind": "mnist"}}, r"'data.kind': unknown data kind 'mnist'; allowed: "
                                  r"fedprox_synthetic, leaf, movielens, npz, (\w+, )*"
                                  r"sklearn_digits, synthetic_logistic, synthetic_ratings$"),
    ({"data": {"num_clients": 3}}, r"'data.kind' is required"),
    ({"data": {"kind": "synthetic_logistic", "alpha": 1}}, r"unknown config key 'data.alpha'"),
    ({"data": {"kind": "npz"}}, r"'data.path' is required"),
    ({"data": {"kind": "synthetic_logistic", "test_fraction": 1.5}},
     r"'data.test_fraction': got 1.5, expected a number in \[0, 1\)"),
    ({"model": {"kind": "resnet"}}, r"'model.kind': unknown model kind 'resnet'; allowed: "
                                    r"cnn, logistic_regression, matrix_factorization, mlp, "
                                    r"multinomial_logistic_regression"),
    ({"algorithm": {"client_optimizer": {"name": "adamz", "learning_rate": 1}}},
     r"'algorithm.client_optimizer.name': unknown optimizer 'adamz'; allowed: .*adam"),
    ({"algorithm": {"client_optimizer": {"name": "sgd", "lr": 0.1}}},
     r"'algorithm.client_optimizer.lr': optax.sgd has no argument 'lr'"),
    ({"algorithm": {"server_optimizer": {"name": "adam"}}},
     r"'algorithm.server_optimizer': optax.adam needs learning_rate"),
    ({"algorithm": {"server_optimizer": {"name": "sgd", "learning_rate": -1}}},
     r"'algorithm.server_optimizer.learning_rate': got -1"),
    ({"algorithm": {"client_optimizer": "sgd"}}, r"'algorithm.client_optimizer': expected a "
                                                 r"mapping with 'name'"),
    ({"data": {"kind": "fedprox_synthetic"}, "model": {"kind": "logistic_regression"}},
     r"'model.kind': logistic_regression is binary"),
    ({"engine": {"chunk_size": 0}}, r"'engine.chunk_size'"),
    ({"engine": {"devices": 0}}, r"'engine.devices'"),
    ({"engine": {"group_by_size": "yes"}}, r"'engine.group_by_size'"),
    ({"compression": {"kind": "qsgd", "fraction": 0.1}},
     r"'compression.fraction' applies only to compression.kind in \(top_k\), not 'qsgd'"),
    ({"compression": {"kind": "qsgd", "bits": 1}}, r"'compression.bits': got 1"),
    ({"compression": {"kind": "zip"}}, r"'compression.kind'"),
    ({"aggregator": {"name": "secure_mean"}}, r"secure_mean weights every client equally"),
    ({"aggregator": {"name": "secure_mean", "bits": 30},
      "algorithm": {"weighting": "uniform"}}, r"'aggregator.bits': got 30"),
    ({"aggregator": {"name": "mean", "clip_norm": 1.0}},
     r"'aggregator.clip_norm' applies only to aggregator.name in \(dp_gaussian, dp_ftrl, "
     r"dp_secure_mean\)"),
    ({"aggregator": {"name": "dp_gaussian"}}, r"'algorithm.weighting'.*set algorithm.weighting: "
                                              r"uniform"),
    ({"aggregator": {"name": "dp_gaussian", "delta": 1e-5},
      "algorithm": {"weighting": "uniform"}}, r"'aggregator.delta' has moved to 'privacy.delta'"),
    ({"aggregator": {"name": "dp_gaussian"}, "privacy": {"delta": 1.0},
      "algorithm": {"weighting": "uniform"}}, r"'privacy.delta': got 1.0"),
    ({"aggregator": {"name": "mean"}, "privacy": {"delta": 1e-6}},
     r"'privacy' applies only to the DP aggregators"),
    ({"aggregator": {"name": "dp_gaussian"}, "privacy": {"neighboring": "add_remove"},
      "algorithm": {"weighting": "uniform", "sampling": "fixed"}},
     r"'privacy.neighboring': add_remove is not valid with algorithm.sampling fixed"),
    ({"aggregator": {"name": "dp_gaussian"}, "privacy": {"accountant": "pld"},
      "algorithm": {"weighting": "uniform", "sampling": "fixed"}},
     r"accountant pld does not support fixed-size sampling"),
    ({"aggregator": {"name": "dp_gaussian"}, "privacy": {"neighboring": "replace_one"},
      "algorithm": {"weighting": "uniform", "sampling": "poisson"}},
     r"accountant rdp does not support Poisson sampling under replace_one"),
    ({"aggregator": {"name": "dp_gaussian"},
      "algorithm": {"weighting": "uniform", "name": "scaffold"}},
     r"scaffold cannot be combined with aggregator dp_gaussian"),
    ({"aggregator": {"name": "dp_ftrl"},
      "algorithm": {"weighting": "uniform", "name": "fednova"}},
     r"fednova cannot be combined with aggregator dp_ftrl: its update is rescaled by tau_eff"),
    ({"algorithm": {"sampling": "fixed", "max_cohort_size": 20}},
     r"'algorithm.max_cohort_size' applies only to algorithm.sampling in \(poisson\)"),
    ({"algorithm": {"sampling": "poisson", "clients_per_round": 10, "max_cohort_size": 5}},
     r"'algorithm.max_cohort_size': 5 is below clients_per_round=10"),
    ({"algorithm": {"sampling": "uniform"}}, r"'algorithm.sampling'"),
    ({"aggregator": {"name": "dp_secure_mean"},
      "algorithm": {"weighting": "uniform", "sampling": "poisson"}},
     r"dp_secure_mean aborts a round below aggregator.min_survivors"),
    ({"aggregator": {"name": "secure_mean", "neighbors": 3},
      "algorithm": {"weighting": "uniform"}}, r"'aggregator.neighbors': got 3"),
    ({"aggregator": {"name": "dp_gaussian", "noise_multiplier": -1},
      "algorithm": {"weighting": "uniform"}}, r"'aggregator.noise_multiplier': got -1"),
    ({"algorithm": {"name": "fedavg", "mu": 0.1}},
     r"'algorithm.mu' applies only to algorithm.name in \(fedprox\), not 'fedavg'"),
    ({"aggregator": {"name": "median", "trim": 0.1}},
     r"'aggregator.trim' applies only to aggregator.name in \(trimmed_mean\)"),
    ({"aggregator": {"name": "trimmed_mean", "trim": 0.5}}, r"'aggregator.trim': got 0.5"),
    ({"aggregator": {"name": "bulyan"}}, r"'aggregator.name'"),
    ({"algorithm": {"name": "fedadam", "server_optimizer": {"name": "sgd",
                                                            "learning_rate": 1}}},
     r"'algorithm.server_optimizer.name': fedadam uses 'adam'"),
    ({"algorithm": {"name": "scaffold", "client_optimizer": {"name": "adam",
                                                             "learning_rate": 0.1}}},
     r"scaffold is defined for plain client SGD"),
    ({"clients": {"dropout": 1.0}}, r"'clients.dropout': got 1.0"),
    ({"algorithm": {"client_optimizer": {"learning_rate": "abc"}}},
     r"'algorithm.client_optimizer.learning_rate': got 'abc', expected a number"),
    ({"algorithm": {"server_optimizer": {"name": "sgd", "learning_rate": 1.0,
                                         "momentum": "abc"}}},
     r"'algorithm.server_optimizer.momentum': got 'abc', expected a number"),
    ({"algorithm": {"server_optimizer": {"name": "sgd", "learning_rate": 1.0,
                                         "momentum": -0.5}}},
     r"'algorithm.server_optimizer.momentum': got -0.5, expected a number >= 0"),
    ({"algorithm": {"client_optimizer": {"name": "adam", "learning_rate": 0.1, "b1": 1.0}}},
     r"'algorithm.client_optimizer.b1': got 1.0, expected a number in \[0, 1\)"),
    ({"algorithm": {"client_optimizer": {"name": "sgd", "learning_rate": 0.1,
                                         "nesterov": "yes"}}},
     r"'algorithm.client_optimizer.nesterov': got 'yes', expected true or false"),
    ({"attack": {"kind": "backdoor"}}, r"'attack.kind'"),
    ({"attack": {"kind": "sign_flip", "fraction": 1.5}}, r"'attack.fraction': got 1.5"),
])


def test_errors_name_the_key(raw, match):
    with pytest.raises(cfg.ConfigError, match=match) as info:
        parse(raw)
    assert "\n" not in str(info.value)


def test_fedopt_names_default_their_server_optimizer():
    c = parse({"algorithm": {"name": "fedadam"}})
    assert c.algorithm.server_optimizer.name == "adam"
    assert c.algorithm.server_optimizer.kwargs["eps"] == 0.001
    c = parse({"algorithm": {"name": "fedyogi",
                             "server_optimizer": {"name": "yogi", "learning_rate": 0.03}}})
    assert c.algorithm.server_optimizer.kwargs == {"learning_rate": 0.03, "b1": 0.9,
                                                   "b2": 0.99, "eps": 0.001}
    # FedAvgM given plain server SGD still gets its momentum (else it would be FedAvg)
    c = parse({"algorithm": {"name": "fedavgm",
                             "server_optimizer": {"name": "sgd", "learning_rate": 0.5}}})
    assert c.algorithm.server_optimizer.kwargs == {"learning_rate": 0.5, "momentum": 0.9}
    assert parse({"algorithm": {"name": "fedavgm"}}).algorithm.server_optimizer.kwargs[
        "momentum"] == 0.9
    c = parse({"algorithm": {"name": "fedprox", "mu": 0.5}, "aggregator": {"name": "krum"}})
    assert parse(cfg.to_dict(c)) == c and "mu" in cfg.to_dict(c)["algorithm"]
    assert "mu" not in cfg.to_dict(parse({}))["algorithm"]


def test_load_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 5\nalgorithm: {clients_per_round: 4}\n")
    c = cfg.load(str(path), ["algorithm.local_epochs=3", "seed=9",
                             "algorithm.client_optimizer.learning_rate=2e-2",
                             "data.kind=fedprox_synthetic", "data.alpha=0.5",
                             "model.kind=multinomial_logistic_regression"])
    assert (c.rounds, c.seed, c.algorithm.local_epochs, c.algorithm.clients_per_round) == (5, 9, 3, 4)
    assert c.algorithm.client_optimizer.kwargs["learning_rate"] == pytest.approx(0.02)
    assert c.data.alpha == 0.5
    with pytest.raises(cfg.ConfigError, match="unknown config key 'algorithm.epochs'"):
        cfg.load(str(path), ["algorithm.epochs=3"])
    with pytest.raises(cfg.ConfigError, match="expected key.path=value"):
        cfg.load(str(path), ["rounds"])
    with pytest.raises(cfg.ConfigError, match="'rounds' is not a mapping"):
        cfg.load(str(path), ["rounds.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(cfg.ConfigError, match="config file not found: .*nope.yaml"):
        cfg.load(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1, 2\n")
    with pytest.raises(cfg.ConfigError, match="bad.yaml: not valid YAML"):
        cfg.load(str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(cfg.ConfigError, match="expected a mapping at the top level"):
        cfg.load(str(lst))


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("rounds: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(cfg.ConfigError, match="not valid YAML"):
        cfg.load(str(evil))


def test_auto_chunk_size_is_smaller_for_skewed_populations():
    from fedjax_lite.experiment.builders import auto_chunk_size, engine_options
    assert auto_chunk_size(np.full(100, 64)) == 64                 # workload W: equal sizes
    assert auto_chunk_size(None) == 64
    skewed = np.array([50, 60, 80, 100, 120, 3000])                # lognormal-like tail
    assert auto_chunk_size(skewed) == 8
    opts = engine_options(parse({"engine": {"devices": 1}}).engine, skewed)
    assert opts.chunk_size == 8 and opts.group_by_size
    opts = engine_options(parse({"engine": {"devices": 1, "chunk_size": 32,
                                            "group_by_size": False}}).engine, skewed)
    assert opts.chunk_size == 32 and not opts.group_by_size


def test_compression_round_trips_through_to_dict():
    c = parse({"compression": {"kind": "top_k", "fraction": 0.05}})
    d = cfg.to_dict(c)
    assert d["compression"] == {"kind": "top_k", "fraction": 0.05, "error_feedback": False}
    assert parse(d) == c


@pytest.mark.parametrize("name", sorted(os.path.basename(p) for p in glob.glob(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                 "*.yaml"))))
def test_every_shipped_config_parses(name):
    """configs/*.yaml never rot: each parses (data files are not read here)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = cfg.load(os.path.join(root, "configs", name))
    assert config.rounds >= 1
