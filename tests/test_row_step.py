"""The sparse SGD local step (``core.local.local_train_chunk(row_leaves=...)``): moving
only a batch's item rows is the dense step's arithmetic in every recommender that uses it
(FCF, FedRecon's global update, local_only) -- equal to float rounding: XLA fuses the two
graphs differently, measured differences are 1 ulp in a few entries."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms.fcf import fcf
from fedjax_lite.algorithms.fedrecon import fedrecon
from fedjax_lite.algorithms.mf_baselines import local_only
from fedjax_lite.core import EngineOptions, build_round, round_key
from fedjax_lite.experiment.build_recsys import plain_sgd_lr
from fedjax_lite.experiment.config import OptimizerConfig
from fedjax_lite.models.mf import MatrixFactorization

U, I, N, DIM, LR = 12, 30, 9, 3, 0.07


def _population():
    rng = np.random.default_rng(0)
    n = rng.integers(0, N + 1, U).astype(np.int32)          # skewed, some empty users
    items = np.zeros((U, N), np.int32)
    ratings = np.zeros((U, N), np.float32)
    for u in range(U):
        items[u, :n[u]] = rng.choice(I, n[u], replace=False)
        ratings[u, :n[u]] = rng.integers(1, 6, n[u])
    return {"x": jnp.asarray(items), "y": jnp.asarray(ratings), "n": jnp.asarray(n)}


def _build(name, sparse):
    model = MatrixFactorization(num_items=I, dim=DIM, l2=0.03)
    kw = dict(client_optimizer=optax.sgd(LR), local_epochs=2, batch_size=4,
              engine=EngineOptions(chunk_size=4), row_sgd_lr=LR if sparse else None)
    if name == "fcf":
        alg = fcf(model, num_users=U, init_key=jax.random.key(1),
                  server_optimizer=optax.sgd(1.5), **kw)
    elif name == "fedrecon":
        alg = fedrecon(model, server_optimizer=optax.sgd(1.5), recon_steps=2, **kw)
    else:
        alg = local_only(model, num_users=U, num_slots=N, init_key=jax.random.key(1), **kw)
    return model, alg


@pytest.mark.parametrize("name", ["fcf", "fedrecon", "local_only"])
def test_sparse_row_step_equals_the_dense_step(name):
    pop = _population()
    out = []
    for sparse in (False, True):
        model, alg = _build(name, sparse)
        state = alg.init(model.init_global(jax.random.key(0)))
        round_fn = jax.jit(build_round(alg, num_clients=U, clients_per_round=7))
        losses = []
        for r in range(3):
            state, m = round_fn(state, pop, round_key(jax.random.key(5), r))
            losses.append(float(m["train_loss"]))
        out.append((jax.tree.map(np.asarray, state), losses))
    (dense, l_dense), (sparse, l_sparse) = out
    np.testing.assert_allclose(l_dense, l_sparse, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(sparse)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_plain_sgd_detection():
    assert plain_sgd_lr(OptimizerConfig("sgd", {"learning_rate": 0.05})) == 0.05
    assert plain_sgd_lr(OptimizerConfig("sgd", {"learning_rate": 0.05,
                                                "momentum": 0.9})) is None
    assert plain_sgd_lr(OptimizerConfig("sgd", {"learning_rate": 0.05,
                                                "nesterov": True})) is None
    assert plain_sgd_lr(OptimizerConfig("adam", {"learning_rate": 0.05})) is None


@pytest.mark.parametrize("dp", [False, True])
def test_fcf_micro_cohorts_equal_the_one_shot_round(dp):
    """engine.micro_cohort for FCF: the sparse aggregators are reductions, so a round a
    few users at a time (only [micro, N, k] of row updates at once) equals the one-shot
    round -- item tables, private factors, metrics -- under dropout, with and without
    the sparse Gaussian mechanism (the same noise: drawn once, from the same key)."""
    from fedjax_lite.core.faults import Faults
    from fedjax_lite.core.sparse import sparse_mean
    from fedjax_lite.privacy.sparse_dp import dp_sparse_gaussian
    pop = _population()
    model = MatrixFactorization(num_items=I, dim=DIM, l2=0.03)
    out = []
    for micro in (None, 3):
        agg = (dp_sparse_gaussian(I, 0.3, 1.0, 8.0) if dp else sparse_mean(I, "raters"))
        alg = fcf(model, num_users=U, init_key=jax.random.key(1),
                  client_optimizer=optax.sgd(LR), server_optimizer=optax.sgd(1.5),
                  local_epochs=2, batch_size=4, aggregator=agg, faults=Faults(dropout=0.3),
                  engine=EngineOptions(chunk_size=2, micro_cohort=micro), row_sgd_lr=LR)
        state = alg.init(model.init_global(jax.random.key(0)))
        round_fn = jax.jit(build_round(alg, num_clients=U, clients_per_round=8))
        for r in range(2):
            state, m = round_fn(state, pop, round_key(jax.random.key(5), r))
        out.append((jax.tree.map(np.asarray, state), {k: float(v) for k, v in m.items()}))
    (one, m_one), (micro, m_micro) = out
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(micro)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert m_one.keys() == m_micro.keys()
    for k in m_one:
        assert m_micro[k] == pytest.approx(m_one[k], rel=1e-5, abs=1e-6), k
