"""Ditto (fedjax_lite.algorithms.ditto) against float64 NumPy references.

Setup: a population of P = 10 clients, d = 3 features padded to N = 6 (garbage in the
padding), binary logistic regression, E = 2 epochs of batch 2 (global pass) and E_p = 3
(personal pass), client SGD, server SGD(1), 3 rounds with a different cohort each round
(overlapping), so personal rows are gathered, updated and scattered across rounds. The
references take the engine's example orders (``epoch_orders``) as inputs.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms.ditto import PERSONAL_STREAM, ditto
from fedjax_lite.algorithms.fedavg import fedavg
from fedjax_lite.core.evaluate import build_evaluate_sums, finish_evaluate
from fedjax_lite.core.faults import Faults
from fedjax_lite.core.round import EngineOptions, make_cohort
from fedjax_lite.core.shuffle import epoch_orders
from fedjax_lite.experiment.cli import main
from fedjax_lite.experiment.outputs import read_metrics
from fedjax_lite.models.linear import logistic_regression
from conftest import padded_binary_population, small_logistic_params
from test_cli import strip_timing, write_config

P, N, D = 10, 6, 3
E, EP, BATCH, LR = 2, 3, 2, 0.3
COHORTS = [np.array(c, np.int32) for c in ([7, 3, 9, 0, 2], [3, 5, 7, 1, 8], [0, 9, 5, 4, 6])]
ENGINE = EngineOptions(chunk_size=2, unroll=1)     # several chunks: slicing is exercised


POP = padded_binary_population(P, N, D, sizes={(4,): 0})   # client 4: no examples


def init_params():
    return small_logistic_params(D)


def round_keys():
    return [jax.random.fold_in(jax.random.key(7), r) for r in range(len(COHORTS))]


@functools.lru_cache(maxsize=None)
def run(name: str, lam: float = 0.0, dropout: float = 0.0):
    """[(global params, personal rows, metrics)] after each round of the jitted algorithm."""
    kw = dict(client_optimizer=optax.sgd(LR), server_optimizer=optax.sgd(1.0),
              local_epochs=E, batch_size=BATCH, engine=ENGINE, faults=Faults(dropout=dropout))
    alg = (fedavg(logistic_regression(D), **kw) if name == "fedavg" else
           ditto(logistic_regression(D), num_clients=P, lam=lam, personal_epochs=EP, **kw))
    apply = jax.jit(alg.apply)
    state = alg.init(init_params())
    pop = {k: jnp.asarray(v) for k, v in POP.items()}
    out = []
    for cohort, key in zip(COHORTS, round_keys()):
        state, metrics = apply(state, make_cohort(pop, jnp.asarray(cohort)), key)
        out.append((jax.tree.map(np.asarray, state.params),
                    None if name == "fedavg" else jax.tree.map(np.asarray, state.personal),
                    {k: np.asarray(v) for k, v in metrics.items()}))
    return out


@functools.partial(jax.jit, static_argnums=(2, 3))
def engine_orders(key, index, personal: bool, epochs: int):
    _, train_key = jax.random.split(key)
    if personal:
        train_key = jax.random.fold_in(train_key, PERSONAL_STREAM)
    keys = jax.vmap(lambda i: jax.random.fold_in(train_key, i))(index)
    return epoch_orders(keys, jnp.asarray(POP["n"])[index], N, epochs)


def np_sgd(ref, start, x, y, n, orders, epochs, lam=0.0, anchor=None):
    """float64 minibatch SGD on F_k(v) + lam/2 ||v - anchor||^2 from ``start``."""
    return ref.prox_sgd("binary", start, anchor or start, x, y, n, orders, epochs=epochs,
                        batch_size=BATCH, lr=LR, mu=lam)


def numpy_ditto(ref, lam):
    """float64 Ditto: FedAvg (server SGD(1), example weights) for w; every sampled
    client's v_k <- E_p epochs of SGD on its h_k(v; w_t) from its own v_k."""
    x, y, n = POP["x"].astype(np.float64), POP["y"], POP["n"]
    w = {k: np.asarray(v, np.float64) for k, v in init_params().items()}
    v = [dict(w) for _ in range(P)]                      # v_k^0 = w^0
    out = []
    for cohort, key in zip(COHORTS, round_keys()):
        g_orders = np.asarray(engine_orders(key, jnp.asarray(cohort), False, E))
        p_orders = np.asarray(engine_orders(key, jnp.asarray(cohort), True, EP))
        deltas, weights, ls_g, ex_g, ls_p, ex_p = [], [], 0.0, 0, 0.0, 0
        new_v = {}
        for j, k in enumerate(cohort):
            w_k, ls, ex = np_sgd(ref, w, x[k], y[k], int(n[k]), g_orders[j], E)
            deltas.append({a: w_k[a] - w[a] for a in w})
            weights.append(float(n[k]))
            ls_g, ex_g = ls_g + ls, ex_g + ex
            new_v[k], ls, ex = np_sgd(ref, v[k], x[k], y[k], int(n[k]), p_orders[j], EP,
                                      lam, w)
            ls_p, ex_p = ls_p + ls, ex_p + ex
        for k, row in new_v.items():
            v[k] = row
        w = {a: w[a] + sum(wt * d[a] for wt, d in zip(weights, deltas)) / sum(weights)
             for a in w}
        out.append((w, [dict(r) for r in v], ls_g / ex_g, ls_p / ex_p))
    return out


def test_the_global_model_is_fedavgs_to_the_bit():
    for (w, _, m), (w_ref, _, m_ref) in zip(run("ditto", lam=0.5), run("fedavg")):
        for k in w:
            assert w[k].tobytes() == w_ref[k].tobytes(), k
        assert m["train_loss"].tobytes() == m_ref["train_loss"].tobytes()


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_personal_models_match_numpy(numpy_reference, lam):
    got, want = run("ditto", lam=lam), numpy_ditto(numpy_reference, lam)
    for r, ((w, v, m), (w_ref, v_ref, loss_g, loss_p)) in enumerate(zip(got, want)):
        for k in w:
            np.testing.assert_allclose(w[k], w_ref[k], rtol=1e-5, atol=1e-6,
                                       err_msg=f"round {r} global {k}")
            for i in range(P):
                np.testing.assert_allclose(v[k][i], v_ref[i][k], rtol=1e-5, atol=1e-6,
                                           err_msg=f"round {r} client {i} {k}")
        np.testing.assert_allclose(m["train_loss"], loss_g, rtol=1e-5)
        np.testing.assert_allclose(m["personal_train_loss"], loss_p, rtol=1e-5)
    # never sampled (client 4 was, but holds no examples): still v^0 = w^0
    v_last = got[-1][1]
    for k, w0 in init_params().items():
        np.testing.assert_array_equal(v_last[k][4], np.asarray(w0))
    # lam matters, and the rows of sampled clients moved
    assert np.abs(v_last["w"][7] - np.asarray(init_params()["w"])).max() > 1e-3


def test_lam_pulls_the_personal_models_to_the_global_one():
    """After round 1 (anchor w_0; lr * lam = 0.9 < 2 keeps SGD stable)."""
    w0 = np.asarray(init_params()["w"])

    def spread(lam):        # mean distance of the sampled clients' v_k to w_0
        _, v, _ = run("ditto", lam=lam)[0]
        rows = [i for i in COHORTS[0] if POP["n"][i] > 0]
        return np.mean([np.linalg.norm(v["w"][i] - w0) for i in rows])
    assert spread(3.0) < 0.5 * spread(0.0)


def test_clients_that_drop_out_keep_their_personal_model():
    """dropout = 1: nobody reports; the global model and every v_k stay where they were."""
    w0 = jax.tree.map(np.asarray, init_params())
    for w, v, _ in run("ditto", lam=0.5, dropout=1.0):
        for k in w0:
            np.testing.assert_array_equal(w[k], w0[k])
            np.testing.assert_array_equal(v[k], np.broadcast_to(w0[k], v[k].shape))


def test_evaluation_with_per_client_params_matches_numpy(numpy_reference):
    """Client k's own parameters on client k's examples: example-weighted and
    client-mean loss / accuracy, float64 reference."""
    rng = np.random.default_rng(3)
    rows = {"w": rng.normal(size=(P, D)).astype(np.float32),
            "b": rng.normal(size=(P,)).astype(np.float32)}
    sums = jax.jit(build_evaluate_sums(logistic_regression(D), ENGINE,
                                       per_client_params=True))
    got = finish_evaluate(sums(rows, {k: jnp.asarray(v) for k, v in POP.items()}))
    losses, correct, means, accs = 0.0, 0, [], []
    for i in range(P):
        n = int(POP["n"][i])
        if n == 0:
            continue
        x, y = POP["x"][i, :n].astype(np.float64), POP["y"][i, :n]
        z = x @ rows["w"][i].astype(np.float64) + float(rows["b"][i])
        loss = np.logaddexp(0.0, z) - y * z
        hit = (z > 0).astype(int) == y
        losses, correct = losses + loss.sum(), correct + hit.sum()
        means.append(loss.mean())
        accs.append(hit.mean())
    total = POP["n"].sum()
    np.testing.assert_allclose(got["eval_loss"], losses / total, rtol=1e-5)
    np.testing.assert_allclose(got["eval_accuracy"], correct / total, rtol=1e-6)
    np.testing.assert_allclose(got["eval_loss_client_mean"], np.mean(means), rtol=1e-5)
    np.testing.assert_allclose(got["eval_accuracy_client_mean"], np.mean(accs), rtol=1e-6)


def test_invalid_arguments_are_rejected():
    kw = dict(client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0),
              local_epochs=1, batch_size=2)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        ditto(logistic_regression(D), num_clients=P, lam=-1.0, **kw)
    with pytest.raises(ValueError, match="personal_epochs"):
        ditto(logistic_regression(D), num_clients=P, lam=1.0, personal_epochs=0, **kw)
    with pytest.raises(ValueError, match=r"engine\.micro_cohort.*ditto"):
        ditto(logistic_regression(D), num_clients=P, lam=1.0,
              engine=EngineOptions(micro_cohort=2), **kw)


# ------------------------------------------------------------------ runs (the CLI)

RUN = {"seed": 0, "rounds": 6, "eval_every": 3, "checkpoint_every": 3,
       "data": {"kind": "fedprox_synthetic", "alpha": 1, "beta": 1, "num_clients": 12,
                "test_split": "examples"},
       "model": {"kind": "multinomial_logistic_regression", "num_classes": 10},
       "algorithm": {"name": "ditto", "lam": 0.1, "clients_per_round": 6,
                     "local_epochs": 1, "batch_size": 10,
                     "client_optimizer": {"name": "sgd", "learning_rate": 0.05}}}


def test_a_run_reports_personal_metrics_and_resumes_exactly(tmp_path, capsys):
    """eval_personal_* in every evaluation row (round 0: the personal models are w_0, so
    they equal the global ones); on this heterogeneous data the personal models beat the
    global one; 3 rounds + --resume to 6 writes the 6-round run's rows (the personal
    models are checkpointed with the run)."""
    path = write_config(tmp_path, RUN)
    assert main(["run", path, "--out", str(tmp_path / "full"), "--no-progress"]) == 0
    rows = read_metrics(str(tmp_path / "full" / "metrics.jsonl"))
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["eval_personal_accuracy"] == rows[-1]["eval_personal_accuracy"]
    assert [r["round"] for r in rows] == [0, 3, 6]
    assert rows[0]["eval_personal_loss"] == pytest.approx(rows[0]["eval_loss"], rel=1e-6)
    assert rows[-1]["eval_personal_accuracy"] > rows[-1]["eval_accuracy"] + 0.05
    assert "personal_train_loss" in rows[-1]
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["client_state"] == "device"

    short = write_config(tmp_path, {**RUN, "rounds": 3}, "short.yaml")
    assert main(["run", short, "--out", str(tmp_path / "cut"), "--no-progress"]) == 0
    assert main(["run", short, "--out", str(tmp_path / "cut"), "--no-progress", "--resume",
                 "--set", "rounds=6"]) == 0
    assert strip_timing(read_metrics(str(tmp_path / "cut" / "metrics.jsonl"))) == \
        strip_timing(rows)


@pytest.mark.parametrize("change, message", [
    ({"data": {**RUN["data"], "test_split": "clients"}}, "'algorithm.name': ditto"),
    ({"data": {"kind": "sklearn_digits", "num_clients": 10}}, "'pooled' (test clients"),
    ({"data": {"kind": "movielens", "path": "/nonexistent"}}, "holds out its own test"),
    ({"algorithm": {**RUN["algorithm"], "lam": -1}}, "'algorithm.lam'"),
    ({"algorithm": {**RUN["algorithm"], "personal_epochs": 0}}, "'algorithm.personal_epochs'"),
    ({"algorithm": {**RUN["algorithm"], "name": "fedavg"}}, "'algorithm.lam'"),
    ({"aggregator": {"name": "dp_gaussian", "clip_norm": 1.0, "noise_multiplier": 1.0},
      "privacy": {"delta": 1e-5},
      "algorithm": {**RUN["algorithm"], "weighting": "uniform"}}, "outside the DP mechanism"),
])
def test_config_errors_name_the_key(tmp_path, capsys, change, message):
    raw = {**RUN, **change}
    if "model" not in change and change.get("data", {}).get("kind") == "sklearn_digits":
        raw["model"] = {"kind": "multinomial_logistic_regression", "num_classes": 10}
    assert main(["run", write_config(tmp_path, raw), "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert message in capsys.readouterr().err
