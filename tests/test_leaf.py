"""LEAF-format JSON loading (fedjax_lite.data.leaf, .json_stream) and the leaf config."""

from __future__ import annotations

import json
import os
import re
import tracemalloc
from collections import Counter

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lite.data.leaf import (NUM_CHAR_CLASSES, char_ids, iter_leaf_file, load_leaf,
                                   tokenize)
from fedjax_lite.experiment import config as cfg
from fedjax_lite.experiment.builders import build_data
from fedjax_lite.experiment.cli import main


def write_leaf(path, user_data, *, order=("users", "num_samples", "user_data"),
               indent=None, extra=None):
    """A LEAF file as LEAF / FedProx write it (json.dump of one object)."""
    full = {"users": list(user_data), "user_data": user_data,
            "num_samples": [len(r["y"]) for r in user_data.values()]}
    obj = {k: full[k] for k in order}
    obj.update(extra or {})
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
    return str(path)


def numeric_users(rng, num_users, d, num_classes, prefix="f", sizes=(3, 9)):
    return {f"{prefix}{i:04d}": {"x": np.round(rng.random((n, d)), 4).tolist(),
                                 "y": rng.integers(0, num_classes, n).tolist()}
            for i, n in enumerate(rng.integers(*sizes, size=num_users))}


def _client(pop, k):
    return pop.x[k, :pop.n[k]], pop.y[k, :pop.n[k]]


# ----------------------------------------------------------------------- numeric

def test_femnist_like_train_and_test(tmp_path):
    rng = np.random.default_rng(0)
    train = numeric_users(rng, 4, 784, 62)
    test = {u: {"x": r["x"][:2], "y": r["y"][:2]} for u, r in list(train.items())[:3]}
    test["stranger"] = {"x": train["f0000"]["x"][:1], "y": [1]}
    tr = write_leaf(tmp_path / "train.json", train)
    te = write_leaf(tmp_path / "test.json", test)
    with pytest.warns(UserWarning, match=r"test.json: 1 test user\(s\) that are not in the "
                                         r"training data dropped \(e.g. 'stranger'\)"):
        ds = load_leaf(tr, te, buffer_size=1000)
    assert ds.kind == "numeric" and ds.users == tuple(train)
    assert ds.train.feature_shape == (784,) and ds.test.feature_shape == (784,)
    labels = [y for r in train.values() for y in r["y"]]
    assert ds.num_classes == max(labels) + 1
    for k, (u, r) in enumerate(train.items()):
        x, y = _client(ds.train, k)
        np.testing.assert_array_equal(x, np.array(r["x"], np.float32))
        np.testing.assert_array_equal(y, r["y"])
        want = test.get(u, {"x": np.zeros((0, 784)), "y": []})
        x, y = _client(ds.test, k)                 # the last user has an empty test client
        np.testing.assert_array_equal(x, np.array(want["x"], np.float32).reshape(-1, 784))
        np.testing.assert_array_equal(y, want["y"])
    assert ds.test.n[-1] == 0


def test_fedprox_key_order_extra_keys_and_directories(tmp_path):
    rng = np.random.default_rng(1)
    a, b = numeric_users(rng, 3, 60, 10, "a"), numeric_users(rng, 2, 60, 10, "b")
    os.mkdir(tmp_path / "train")
    write_leaf(tmp_path / "train" / "2.json", b, order=("users", "user_data", "num_samples"))
    write_leaf(tmp_path / "train" / "1.json", a, extra={"hierarchies": [[1, 2]]}, indent=2)
    (tmp_path / "train" / "notes.txt").write_text("not json")
    ds = load_leaf(str(tmp_path / "train"), buffer_size=64)
    assert ds.users == tuple(a) + tuple(b)       # files in name order
    np.testing.assert_array_equal(ds.train.n, [len(r["y"]) for r in (a | b).values()])
    x, _ = _client(ds.train, 4)
    np.testing.assert_array_equal(x, np.array(b["b0001"]["x"], np.float32))
    write_leaf(tmp_path / "train" / "3.json", {"a0001": a["a0001"]})
    with pytest.raises(ValueError, match=r"user 'a0001' appears in both .*1.json and "
                                         r".*3.json"):
        load_leaf(str(tmp_path / "train"))
    os.mkdir(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"empty: a directory without .json files"):
        load_leaf(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_leaf(str(tmp_path / "missing.json"))


# ------------------------------------------------------------------------ text

def test_shakespeare_characters(tmp_path):
    assert NUM_CHAR_CLASSES == 97
    # independent reference: newline 1, printable ASCII c -> ord(c) - 30, else 0
    ref = lambda s: [1 if c == "\n" else ord(c) - 30 if 32 <= ord(c) < 127 else 0 for c in s]
    text = "To be, or not to be:\nthat is the question~ \t é字" * 3
    np.testing.assert_array_equal(char_ids(text), ref(text))
    lines = [text[i:i + 80] for i in range(0, 50)]
    data = {"THE_TEMPEST_PROSPERO": {"x": lines[:30], "y": [text[i + 80] for i in range(30)]},
            "HAMLET": {"x": lines[30:], "y": [text[i + 80] for i in range(30, 50)]}}
    ds = load_leaf(write_leaf(tmp_path / "s.json", data), buffer_size=50)
    assert ds.kind == "shakespeare" and ds.num_classes == 97
    assert ds.train.feature_shape == (80,) and ds.train.x.dtype == np.float32
    x, y = _client(ds.train, 1)
    np.testing.assert_array_equal(x, [ref(s) for s in lines[30:]])
    np.testing.assert_array_equal(y, ref("".join(data["HAMLET"]["y"])))
    data["HAMLET"]["x"][3] = data["HAMLET"]["x"][3][:79]
    with pytest.raises(ValueError, match=r"s.json: user 'HAMLET': x strings differ in length "
                                         r"\(\[79, 80\]; example 3\)"):
        load_leaf(write_leaf(tmp_path / "s.json", data))


def tweet(text, uid="u"):
    return ["1467810369", "Mon Apr 06 22:19:45 PDT 2009", "NO_QUERY", uid, text]


def test_sent140_tokenizer_vocabulary_and_bag_of_words(tmp_path):
    assert tokenize("Don't STOP @user_1: http://t.co/x9 #Win!!  café's") == [
        "don't", "stop", "user_1", "http", "t", "co", "x9", "win", "café's"]
    train = {"alice": {"x": [tweet("the cat, the hat"), tweet("The dog!")], "y": [1, 0]},
             "bob": {"x": [tweet("a dog and a cat... and THE end")], "y": [0]}}
    test = {"bob": {"x": [tweet("zebra the zebra cat")], "y": [1]}}
    tr, te = (write_leaf(tmp_path / "tr.json", train), write_leaf(tmp_path / "te.json", test))
    ds = load_leaf(tr, te, vocab_size=4, buffer_size=16)
    # train counts: the 4, cat 2, dog 2, a 2, and 2, hat 1, end 1 -> ties alphabetical
    assert ds.kind == "sent140" and ds.vocabulary == ("the", "a", "and", "cat")
    assert ds.train.feature_shape == (4,) and ds.num_classes == 2

    def bag(text):
        counts = Counter(tokenize(text))
        return [counts[w] for w in ds.vocabulary]
    x, y = _client(ds.train, 0)
    np.testing.assert_array_equal(x, [bag("the cat, the hat"), bag("The dog!")])
    np.testing.assert_array_equal(y, [1, 0])
    x, y = _client(ds.test, 1)          # 'zebra' is only in the test file: not a word
    np.testing.assert_array_equal(x, [bag("zebra the zebra cat")])
    assert ds.test.n[0] == 0
    big = load_leaf(tr, vocab_size=50)
    assert big.train.feature_shape == (50,) and len(big.vocabulary) == 7
    assert not big.train.x[:, :, 7:].any()


def test_kind_is_detected_and_must_hold_for_every_user(tmp_path):
    rng = np.random.default_rng(2)
    data = numeric_users(rng, 2, 5, 3)
    data["f0001"]["x"][1] = "a string"
    with pytest.raises(ValueError, match=r"user 'f0001': x entry 1 \('a string'\) does not "
                                         r"look like the numeric data"):
        load_leaf(write_leaf(tmp_path / "m.json", data))
    with pytest.raises(ValueError, match=r"cannot tell the kind of data from x entry 3"):
        load_leaf(write_leaf(tmp_path / "m.json", {"u": {"x": [3], "y": [0]}}))
    data = numeric_users(rng, 2, 5, 3)
    data["f0001"]["x"][0] = [1.0, 2.0]
    with pytest.raises(ValueError, match=r"user 'f0001': 'x' must be a list of equal-shaped"):
        load_leaf(write_leaf(tmp_path / "m.json", data))


# ---------------------------------------------------------------- consistency

@pytest.mark.parametrize("mutate, match", [
    (lambda o: o["users"].append("ghost"),
     r"user 'ghost' is listed in 'users' but has no entry in 'user_data'"),
    (lambda o: o["users"].remove("f0001"),
     r"user 'f0001' has an entry in 'user_data' but is not listed in 'users'"),
    (lambda o: o["num_samples"].__setitem__(1, 99),
     r"user 'f0001': num_samples says 99 but 'user_data' holds \d+ examples"),
    (lambda o: o["user_data"]["f0002"]["y"].pop(),
     r"user 'f0002': \d+ entries in 'x' but \d+ in 'y'"),
    (lambda o: o["user_data"]["f0002"].pop("y"),
     r"user 'f0002': expected an object with lists 'x' and 'y'"),
    (lambda o: o.pop("user_data"), r"no 'user_data' key"),
    (lambda o: o["user_data"]["f0000"]["y"].__setitem__(0, 1.5),
     r"user 'f0000': labels 'y' must be integers"),
    (lambda o: o["user_data"]["f0000"]["y"].__setitem__(2, -1),
     r"user 'f0000': label -1 of example 2 is negative"),
    (lambda o: o["user_data"]["f0001"]["x"][0].__setitem__(0, 1e300),
     r"user 'f0001': non-finite feature \(NaN or inf, or beyond float32\) in example 0"),
    (lambda o: (o["user_data"]["f0001"].update(x=[], y=[]), o["num_samples"].__setitem__(1, 0)),
     r"training user 'f0001' has no examples"),
])
def test_inconsistent_files_name_the_user(tmp_path, mutate, match):
    rng = np.random.default_rng(3)
    users = numeric_users(rng, 3, 4, 3, sizes=(4, 6))
    obj = {"users": list(users), "num_samples": [len(r["y"]) for r in users.values()],
           "user_data": users}
    mutate(obj)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=r"bad.json: " + match):
        load_leaf(str(path), buffer_size=32)


def test_duplicate_user_and_label_range(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"user_data": {"u": {"x": [[1]], "y": [0]}, "u": {"x": [[2]], "y": [1]}}}')
    with pytest.raises(ValueError, match=r"dup.json: user 'u' appears twice in 'user_data'"):
        load_leaf(str(path))
    rng = np.random.default_rng(4)
    tr = write_leaf(tmp_path / "tr.json", numeric_users(rng, 3, 4, 3))
    bad = numeric_users(rng, 2, 4, 3)
    bad["f0001"]["y"][-1] = 7
    te = write_leaf(tmp_path / "te.json", bad)
    with pytest.raises(ValueError, match=r"te.json: user 'f0001': label 7 of example \d+ is "
                                         r"out of range, expected \[0, 3\)"):
        load_leaf(tr, te, num_classes=3)


# ------------------------------------------------------------------- malformed

def _json_position(text):
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return e.lineno, e.colno
    return None


def _reported(err):
    m = re.search(r"malformed JSON at line:column (\d+):(\d+): ", str(err))
    return (int(m.group(1)), int(m.group(2))) if m else None


SMALL = numeric_users(np.random.default_rng(5), 3, 3, 4, sizes=(2, 4))


@settings(max_examples=150, deadline=None)
@given(position=st.integers(0, 10_000), replacement=st.sampled_from(["", ",", ":", "}", "]",
       "x", '"', "-", "1e", " ", "\n"]), indent=st.sampled_from([None, 1]),
       buffer_size=st.sampled_from([1, 5, 64, 4096]))
def test_corrupted_json_reports_file_and_position(tmp_path_factory, position, replacement,
                                                  indent, buffer_size):
    text = json.dumps({"users": list(SMALL), "num_samples": [len(r["y"]) for r in
                                                             SMALL.values()],
                       "user_data": SMALL}, indent=indent)
    position %= len(text)
    corrupted = text[:position] + replacement + text[position + 1:]
    expected = _json_position(corrupted)
    if expected is None:
        return                  # still valid JSON (e.g. a digit for a digit)
    path = tmp_path_factory.mktemp("c") / "bad.json"
    path.write_text(corrupted)
    with pytest.raises(ValueError) as info:
        load_leaf(str(path), buffer_size=buffer_size)
    assert str(path) in str(info.value)
    reported = _reported(info.value)
    # never later than the standard parser's first error (it may be earlier: the
    # streaming parser also requires the LEAF structure)
    assert reported is None or reported <= expected, (str(info.value), expected)
    if position > text.index('"user_data": {') + 20 and reported is not None:
        assert reported == expected, (str(info.value), expected)


@pytest.mark.parametrize("text, where", [
    ("", "1:1"), ("[1, 2]", "1:1"), ('{"user_data": {}} x', "1:19"),
    ('{"user_data": {"u": {"x": [[1]], "y": [0]}}', "1:44"),           # truncated
    ('{\n  "user_data": {\n    "u": {"x": [[1] [2]], "y": [0]}}}', "3:21"),
    ('{"users": ["u"]\n "user_data": {}}', "2:2"),
])
def test_malformed_json_examples(tmp_path, text, where):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"bad.json: malformed JSON at line:column {where}"):
        load_leaf(str(path), buffer_size=3)


def test_not_utf8(tmp_path):
    path = tmp_path / "bin.json"
    path.write_bytes(b'{"user_data": {"\xff\xfe": 1}}')
    with pytest.raises(ValueError, match=r"bin.json: not UTF-8 text"):
        load_leaf(str(path))


# ------------------------------------------------------------------- streaming

def test_streaming_memory_is_bounded_by_one_record(tmp_path):
    rng = np.random.default_rng(6)
    users = numeric_users(rng, 250, 60, 10, sizes=(15, 25))
    path = write_leaf(tmp_path / "big.json", users)
    size = os.path.getsize(path)
    assert size > 2_000_000
    tracemalloc.start()
    try:
        sums = {u: (len(r["y"]), float(np.sum(r["x"]))) for u, r in
                iter_leaf_file(path, buffer_size=4096)}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sums == {u: (len(r["y"]), float(np.sum(r["x"]))) for u, r in users.items()}
    # one record is ~10 kB of text (~60 kB as Python floats); the file is > 2 MB
    assert peak < size / 8, (peak, size)
    ds = load_leaf(path, buffer_size=4096)
    assert ds.train.num_examples == sum(len(r["y"]) for r in users.values())


# ---------------------------------------------------------------------- config

def _separable(rng, users, d=8, classes=3):
    w = rng.normal(size=(d, classes))
    out = {}
    for i in range(users):
        x = rng.normal(size=(int(rng.integers(15, 40)), d)) + rng.normal(scale=0.5, size=d)
        out[f"f_{i:03d}"] = {"x": np.round(x, 4).tolist(), "y": np.argmax(x @ w, 1).tolist()}
    return out


LEAF_RUN = {"seed": 0, "rounds": 15, "eval_every": 5,
            "model": {"kind": "multinomial_logistic_regression", "num_classes": 3},
            "algorithm": {"name": "fedavg", "clients_per_round": 8, "local_epochs": 2,
                          "batch_size": 8,
                          "client_optimizer": {"name": "sgd", "learning_rate": 0.3}},
    # one device, one chunk, no unrolling: the smallest program to compile (test time)
    "engine": {"devices": 1, "chunk_size": "all", "unroll": 1}}


def test_leaf_config_and_build_data(tmp_path):
    rng = np.random.default_rng(7)
    data = _separable(rng, 12)
    tr = write_leaf(tmp_path / "tr.json", data)
    raw = {**LEAF_RUN, "data": {"kind": "leaf", "path": tr, "test_fraction": 0.25}}
    c = cfg.parse(raw)
    assert c.data == cfg.LeafData(path=tr, test_fraction=0.25)
    assert cfg.parse(yaml.safe_load(yaml.safe_dump(cfg.to_dict(c)))) == c
    train, test = build_data(c)                       # split per client, test_fraction
    assert train.num_clients == test.num_clients == 12
    assert train.num_examples + test.num_examples == sum(len(r["y"]) for r in data.values())
    with pytest.raises(cfg.ConfigError, match=r"config key 'data.path' is required for "
                                              r"data kind 'leaf'"):
        cfg.parse({**raw, "data": {"kind": "leaf"}})
    with pytest.raises(cfg.ConfigError, match=r"config key 'data.vocab_size': got 0"):
        cfg.parse({**raw, "data": {"kind": "leaf", "path": tr, "vocab_size": 0}})
    small = cfg.parse({**raw, "model": {"kind": "multinomial_logistic_regression",
                                        "num_classes": 2}})
    with pytest.raises(cfg.ConfigError, match=r"^config key 'model.num_classes': the model "
                                              r"has 2 classes but the numeric data at .*tr.json "
                                              r"needs 3 \(labels 0..2\)$"):
        build_data(small)
    text = {"u1": {"x": [tweet("good day")] * 3, "y": [1, 1, 0]},
            "u2": {"x": [tweet("bad day"), tweet("good")], "y": [0, 1]}}
    sent = write_leaf(tmp_path / "sent.json", text)
    train, _ = build_data(cfg.parse({**raw, "model": {"kind": "logistic_regression"},
                                     "algorithm": {"clients_per_round": 2},
                                     "data": {"kind": "leaf", "path": sent, "vocab_size": 7}}))
    assert train.feature_shape == (7,)


def test_run_on_a_leaf_file_pair(tmp_path, capsys):
    rng = np.random.default_rng(8)
    data = _separable(rng, 16)
    train = {u: {"x": r["x"][5:], "y": r["y"][5:]} for u, r in data.items()}
    test = {u: {"x": r["x"][:5], "y": r["y"][:5]} for u, r in data.items()}
    raw = {**LEAF_RUN, "data": {"kind": "leaf",
                                "path": write_leaf(tmp_path / "train.json", train),
                                "test_path": write_leaf(tmp_path / "test.json", test)}}
    path = tmp_path / "leaf.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").open()]
    assert rows[-1]["round"] == 15 and rows[-1]["eval_accuracy"] > 0.7   # chance ~0.33
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["num_clients"] == 16 and summary["num_test_examples"] == 80
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(tmp_path / "o2"), "--set",
                 "model.num_classes=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedjax-lite: config error: config key 'model.num_classes'")
    (tmp_path / "test.json").write_text('{"user_data": {"f_000": {"x": [[1, 2]] "y": [0]}}}')
    assert main(["run", str(path), "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"fedjax-lite: data error: .*test.json: malformed JSON at "
                        r"line:column 1:\d+: .*", err), err
