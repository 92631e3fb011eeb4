"""scikit-learn's 8x8 digits as federated data: the loader, its config, and a short run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits

from fedjax_lite.data import federated_digits
from fedjax_lite.data.digits import TEST_CLIENT_SIZE
from fedjax_lite.experiment import config as cfg
from fedjax_lite.experiment.builders import build_data
from fedjax_lite.experiment.cli import main


@pytest.fixture(scope="module")
def reference():
    bunch = load_digits()
    return bunch.images.astype(np.float64), bunch.target


def _examples(pop):
    """Multiset of the population's real examples: sorted (pixels * 16, label) rows."""
    rows = [np.concatenate([np.rint(pop.x[k, j].ravel() * 16), [pop.y[k, j]]])
            for k in range(pop.num_clients) for j in range(pop.n[k])]
    rows = np.array(rows)
    return rows[np.lexsort(rows.T[::-1])]


def test_train_and_test_hold_every_digit_once(reference):
    images, target = reference
    train, test = federated_digits(num_clients=30, partition_kind="iid", seed=0)
    assert train.num_clients == 30 and train.feature_shape == (8, 8)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int32
    assert train.x.min() >= 0 and train.x.max() <= 1 and train.x.max() == 1
    assert train.num_examples + test.num_examples == 1797
    got = np.concatenate([_examples(train), _examples(test)])
    want = np.column_stack([images.reshape(1797, 64), target])
    np.testing.assert_array_equal(got[np.lexsort(got.T[::-1])],
                                  want[np.lexsort(want.T[::-1])])


@pytest.mark.parametrize("test_fraction", [0.2, 0.35])
def test_test_split_is_stratified_and_shared_by_every_partition(reference, test_fraction):
    _, target = reference
    expected = {c: round(test_fraction * np.sum(target == c)) for c in range(10)}
    tests = []
    for kind, k in (("iid", 10), ("dirichlet", 40), ("shards", 25), ("quantity_skew", 7)):
        train, test = federated_digits(num_clients=k, partition_kind=kind,
                                       test_fraction=test_fraction, seed=3)
        assert train.num_clients == k
        labels = np.concatenate([test.y[i, :test.n[i]] for i in range(test.num_clients)])
        assert {c: int(np.sum(labels == c)) for c in range(10)} == expected
        assert test.n.max() <= TEST_CLIENT_SIZE
        tests.append(_examples(test))
    assert all(np.array_equal(tests[0], t) for t in tests[1:])
    # another seed holds out other examples
    other = _examples(federated_digits(num_clients=10, test_fraction=test_fraction,
                                       seed=4)[1])
    assert not np.array_equal(tests[0], other)


def test_per_client_test_split_holds_each_clients_own_examples(reference):
    """test_split 'examples': test client k holds round(test_fraction * n_k) of client
    k's own examples (at least one left for training); train and test together hold
    every digit once, and the label skew of a client is in its test part too."""
    images, target = reference
    train, test = federated_digits(num_clients=20, partition_kind="dirichlet", alpha=0.1,
                                   test_fraction=0.25, seed=2, test_split="examples")
    assert train.num_clients == test.num_clients == 20
    got = np.concatenate([_examples(train), _examples(test)])
    want = np.column_stack([images.reshape(1797, 64), target])
    np.testing.assert_array_equal(got[np.lexsort(got.T[::-1])],
                                  want[np.lexsort(want.T[::-1])])
    whole = train.n + test.n
    np.testing.assert_array_equal(test.n, np.minimum(np.rint(0.25 * whole), whole - 1))
    for k in range(20):             # a test label is one the client trains on (alpha 0.1)
        if test.n[k]:
            seen = set(train.y[k, :train.n[k]].tolist())
            share = np.mean([c in seen for c in test.y[k, :test.n[k]]])
            assert share >= 0.5, (k, share)
    with pytest.raises(ValueError, match="test_split"):
        federated_digits(num_clients=5, test_split="clients")


def test_partitions_shape_the_label_mix():
    def labels_per_client(kind, **kw):
        train, _ = federated_digits(num_clients=36, partition_kind=kind, seed=0, **kw)
        return np.mean([len(np.unique(train.y[k, :train.n[k]]))
                        for k in range(train.num_clients)])
    assert labels_per_client("iid") > 9
    assert labels_per_client("shards", shards_per_client=2) <= 2 + 1
    assert labels_per_client("dirichlet", alpha=0.05) < 3
    train, _ = federated_digits(num_clients=36, partition_kind="quantity_skew", sigma=1.5,
                                seed=0)
    assert train.n.max() > 4 * np.median(train.n)


def test_too_many_clients_is_a_value_error():
    with pytest.raises(ValueError, match=r"sklearn_digits training part: iid partition: "
                                         r"cannot split 1438 examples over 2000 clients"):
        federated_digits(num_clients=2000, seed=0)


# ------------------------------------------------------------------------- config

DIGITS = {"seed": 0, "rounds": 12, "eval_every": 6,
          "data": {"kind": "sklearn_digits", "num_clients": 20, "test_fraction": 0.2,
                   "partition": {"kind": "dirichlet", "alpha": 1.0}},
          "model": {"kind": "multinomial_logistic_regression", "num_classes": 10},
          "algorithm": {"name": "fedavg", "clients_per_round": 10, "local_epochs": 2,
                        "batch_size": 16,
                        "client_optimizer": {"name": "sgd", "learning_rate": 0.5}},
    # one device, one chunk, no unrolling: the smallest program to compile (test time)
    "engine": {"devices": 1, "chunk_size": "all", "unroll": 1}}


def test_config_round_trip_and_data_seed():
    c = cfg.parse(DIGITS)
    assert isinstance(c.data, cfg.SklearnDigitsData)
    assert c.data.partition == cfg.PartitionConfig(kind="dirichlet", alpha=1.0)
    saved = cfg.to_dict(c)
    assert saved["data"]["partition"] == {"kind": "dirichlet", "alpha": 1.0}
    assert cfg.parse(yaml.safe_load(yaml.safe_dump(saved))) == c
    assert cfg.parse({**DIGITS, "data": {"kind": "sklearn_digits"}}).data.partition.kind == "iid"
    # data.seed, not the run's seed, draws the data when it is set
    a = build_data(cfg.parse({**DIGITS, "seed": 1, "data": {**DIGITS["data"], "seed": 5}}))
    b = build_data(cfg.parse({**DIGITS, "seed": 2, "data": {**DIGITS["data"], "seed": 5}}))
    c2 = build_data(cfg.parse({**DIGITS, "seed": 5}))
    for x, y in ((a, b), (a, c2)):
        assert all(np.array_equal(p.x, q.x) and np.array_equal(p.n, q.n)
                   for p, q in zip(x, y))


@pytest.mark.parametrize("data, model, match", [
    ({"partition": {"kind": "iid", "alpha": 0.3}}, None,
     r"^config key 'data.partition.alpha' applies only to data.partition.kind in "
     r"\(dirichlet\), not 'iid'$"),
    ({"partition": {"kind": "dirichlet", "sigma": 1.0}}, None,
     r"'data.partition.sigma' applies only to data.partition.kind in \(quantity_skew\)"),
    ({"partition": {"kind": "quantity_skew", "shards_per_client": 3}}, None,
     r"'data.partition.shards_per_client' applies only to"),
    ({"partition": {"kind": "dirichlet", "alpha": 0}}, None,
     r"config key 'data.partition.alpha': got 0.0, expected a number > 0"),
    ({"partition": {"kind": "noniid"}}, None, r"config key 'data.partition.kind': got 'noniid'"),
    ({"partition": {"knd": "iid"}}, None, r"unknown config key 'data.partition.knd'"),
    ({"partition": "iid"}, None, r"config key 'data.partition': expected a mapping"),
    ({"test_fraction": 0}, None, r"config key 'data.test_fraction': got 0.0, expected a "
                                 r"number in \(0, 1\)"),
    ({"test_split": "clients"}, None, r"'data.test_split'.*pooled"),
    ({}, {"kind": "multinomial_logistic_regression", "num_classes": 9},
     r"^config key 'model.num_classes': got 9, but sklearn_digits has 10 classes"),
    ({}, {"kind": "logistic_regression"},
     r"^config key 'model.kind': logistic_regression is binary but sklearn_digits"),
])
def test_config_errors_name_the_key(data, model, match):
    raw = {**DIGITS, "data": {"kind": "sklearn_digits", **data}}
    if model is not None:
        raw["model"] = model
    with pytest.raises(cfg.ConfigError, match=match):
        cfg.parse(raw)


def test_run_reaches_accuracy_far_above_chance(tmp_path, capsys):
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(DIGITS))
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").open()]
    assert rows[0]["eval_accuracy"] < 0.2          # zero-initialized: one class, ~10%
    assert rows[-1]["round"] == 12 and rows[-1]["eval_accuracy"] > 0.6   # chance: 0.1
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["num_clients"] == 20 and summary["num_test_examples"] == 359
    # too many clients: one config error line naming the key, exit 2
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(tmp_path / "o2"), "--set",
                 "data.num_clients=1500"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedjax-lite: config error: config key 'data.num_clients': ")
    assert "\n" not in err


def test_cli_help_lists_the_data_kinds(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "sklearn_digits" in out and "leaf" in out
