"""``engine.compile_rounds``: K rounds as one ``lax.scan`` (``core.build_rounds``) give the
states and metrics of the per-round host loop, for every sampling kind."""

import jax
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms import fedavg
from fedjax_lite.core import Sampling, build_round, build_rounds, poisson_bound, round_key
from fedjax_lite.core.round import EngineOptions
from fedjax_lite.data import synthetic_logistic
from fedjax_lite.models import logistic_regression

K_CLIENTS, C = 20, 5


@pytest.mark.parametrize("kind", ["fixed", "poisson", "epochs"])
def test_scanned_rounds_equal_the_host_loop(kind):
    data = synthetic_logistic(num_clients=K_CLIENTS, num_features=3, mean_examples=8,
                              seed=0)
    population = jax.tree.map(jax.numpy.asarray, data.arrays())
    model = logistic_regression(3)
    algo = fedavg(model, client_optimizer=optax.sgd(0.1),
                  server_optimizer=optax.sgd(1.0, momentum=0.9), local_epochs=2,
                  batch_size=4, engine=EngineOptions(chunk_size=2))
    root = jax.random.key(3)
    sampling = Sampling(kind, poisson_bound(K_CLIENTS, C / K_CLIENTS)[0]
                        if kind == "poisson" else None, root if kind == "epochs" else None)
    round_fn = build_round(algo, num_clients=K_CLIENTS, clients_per_round=C,
                           sampling=sampling)
    state0 = algo.init(model.init(jax.random.key(0)))
    one = jax.jit(round_fn)
    state, rows = state0, []
    for r in range(6):
        state, m = one(state, population, round_key(root, r))
        rows.append(m)
    block = jax.jit(build_rounds(round_fn, 3))
    s2, m_a = block(state0, population, root, 0)
    s2, m_b = block(s2, population, root, 3)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(s2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    for r in range(6):
        got = m_a if r < 3 else m_b
        for k, v in rows[r].items():
            np.testing.assert_allclose(np.asarray(got[k])[r % 3], np.asarray(v),
                                       rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("which", ["fedavg", "fcf", "ditto"])
def test_run_with_compile_rounds_writes_the_loop_metrics(tmp_path, which):
    """``fedjax-lite run`` with ``engine.compile_rounds: 3`` (evaluations every 3 rounds,
    a checkpoint every 6, a last block cut short by the end): the same metrics rows and
    parameters as the per-round loop (for ditto its personal models' metrics too)."""
    from fedjax_lite.experiment.cli import main
    from fedjax_lite.experiment.outputs import read_metrics
    from test_cli import SMALL, strip_timing, write_config
    from test_recsys_run import REC
    base = {**(REC if which == "fcf" else SMALL), "rounds": 10, "eval_every": 3,
            "checkpoint_every": 6}
    if which == "ditto":
        base["algorithm"] = {**SMALL["algorithm"], "name": "ditto", "lam": 0.5}
    out = {}
    for k in (1, 3):
        raw = {**base, "engine": {"compile_rounds": k}}
        folder = tmp_path / f"k{k}"
        assert main(["run", write_config(tmp_path, raw, f"c{k}.yaml"), "--out",
                     str(folder), "--no-progress"]) == 0
        out[k] = (strip_timing(read_metrics(str(folder / "metrics.jsonl"))),
                  np.load(folder / "params.npz"))
    rows1, rows3 = out[1][0], out[3][0]
    assert [r["round"] for r in rows1] == [r["round"] for r in rows3]
    assert ("eval_personal_accuracy" in rows3[-1]) == (which == "ditto")
    for a, b in zip(rows1, rows3):
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
            else:
                assert a[key] == b[key], key
    for name in out[1][1].files:
        np.testing.assert_allclose(out[1][1][name], out[3][1][name], rtol=1e-5, atol=1e-6)
