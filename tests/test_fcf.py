"""Sparse per-item aggregation (core.sparse) and FCF with private user factors
(algorithms.fcf) against float64 NumPy references and the privacy property of the split
between global and private parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms.fcf import evaluate_ratings, fcf
from fedjax_lite.core import EngineOptions, build_round, make_cohort, round_key
from fedjax_lite.core.sparse import SparseUpdate, sparse_mean
from fedjax_lite.models.mf import MatrixFactorization

U, I, K_DIM, PER = 80, 40, 3, 16     # users, items, factors, ratings per user


@pytest.mark.parametrize("normalize", ["raters", "all"])
def test_sparse_mean_equals_a_dense_float64_reference(normalize):
    rng = np.random.default_rng(0)
    C, N, num_items = 7, 5, 11
    index = np.stack([rng.choice(num_items, N, replace=False) for _ in range(C)])
    mask = rng.random((C, N)) < 0.8
    rows = rng.normal(size=(C, N, 3))
    bias = rng.normal(size=(C, N))
    mu = rng.normal(size=C)
    w = np.array([1.0, 2.0, 0.0, 1.0, 3.0, 1.0, 0.5])            # client 2 dropped
    update = SparseUpdate({"item": jnp.asarray(rows, jnp.float32),
                           "item_bias": jnp.asarray(bias, jnp.float32)},
                          jnp.asarray(index, jnp.int32), jnp.asarray(mask),
                          {"mu": jnp.asarray(mu, jnp.float32)})
    out, _, metrics = jax.jit(sparse_mean(num_items, normalize).apply)(
        update, jnp.asarray(w, jnp.float32), (), jax.random.key(0))
    # dense reference: every client's delta as a full [I, ...] table, zeros elsewhere
    dense = np.zeros((C, num_items, 3)); dense_b = np.zeros((C, num_items))
    touched = np.zeros((C, num_items), bool)
    for c in range(C):
        for j in range(N):
            if mask[c, j]:
                dense[c, index[c, j]] = rows[c, j]
                dense_b[c, index[c, j]] = bias[c, j]
                touched[c, index[c, j]] = True
    if normalize == "raters":
        denom = (w[:, None] * touched).sum(0)
    else:
        denom = np.full(num_items, w.sum())
    safe = np.where(denom > 0, denom, 1.0)
    want = np.einsum("c,cik->ik", w, dense) / safe[:, None]
    want_b = (w[:, None] * dense_b).sum(0) / safe
    np.testing.assert_allclose(np.asarray(out["item"]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["item_bias"]), want_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(out["mu"]), (w * mu).sum() / w.sum(), rtol=1e-5)
    assert float(metrics["rows_touched"]) == ((w[:, None] * touched).sum(0) > 0).sum()


def _low_rank(seed=0, noise=0.1):
    rng = np.random.default_rng(seed)
    P = rng.normal(size=(U, K_DIM)) * 0.7
    Q = rng.normal(size=(I, K_DIM)) * 0.7
    bu, bi = rng.normal(size=U) * 0.3, rng.normal(size=I) * 0.3
    items = np.stack([rng.choice(I, PER + 4, replace=False) for _ in range(U)])
    r = (3.0 + bu[:, None] + bi[items] + np.einsum("uk,unk->un", P, Q[items])
         + noise * rng.normal(size=items.shape))
    r = np.clip(r, 1, 5).astype(np.float32)
    split = lambda a, b: {"x": jnp.asarray(items[:, a:b], jnp.int32),
                          "y": jnp.asarray(r[:, a:b]), "n": jnp.full((U,), b - a, jnp.int32)}
    return split(0, PER), split(PER, PER + 4)


def _fcf(**kw):
    model = MatrixFactorization(num_items=I, dim=K_DIM, l2=0.001)
    alg = fcf(model, num_users=U, init_key=jax.random.key(1),
              client_optimizer=optax.sgd(0.2), server_optimizer=optax.sgd(1.0),
              local_epochs=2, batch_size=4, engine=EngineOptions(chunk_size=None), **kw)
    return model, alg


def test_private_parameters_never_leave_the_client():
    """The server state holds no user-indexed array; perturbing one user's private
    factors changes nothing the server receives except that user's own item rows."""
    model, alg = _fcf()
    train, _ = _low_rank()
    state = alg.init(model.init_global(jax.random.key(0)))
    for leaf in jax.tree.leaves((state.params, state.opt_state, state.agg_state)):
        assert jnp.ndim(leaf) == 0 or leaf.shape[0] != U
    seen = {}

    def spy(update, weights, agg_state, key):
        seen["update"] = update
        return sparse_mean(I).apply(update, weights, agg_state, key)

    from fedjax_lite.core.aggregators import Aggregator
    _, alg_spy = _fcf(aggregator=Aggregator(lambda p: (), spy))
    cohort = make_cohort(train, jnp.arange(10, dtype=jnp.int32))
    outs = []
    for bump in (0.0, 0.5):
        st = state._replace(private={**state.private,
                                     "user": state.private["user"].at[3].add(bump)})
        alg_spy.apply(st, cohort, jax.random.key(4))
        outs.append(jax.tree.map(np.asarray, seen["update"]))
    a, b = outs
    others = np.arange(10) != 3
    for name in ("item", "item_bias"):
        np.testing.assert_array_equal(a.rows[name][others], b.rows[name][others])
        assert not np.array_equal(a.rows[name][3], b.rows[name][3])
    np.testing.assert_array_equal(a.index, b.index)


def test_private_state_persists_for_the_cohort_only():
    model, alg = _fcf()
    train, _ = _low_rank()
    state = alg.init(model.init_global(jax.random.key(0)))
    new, _ = jax.jit(alg.apply)(state, make_cohort(train, jnp.arange(5, 15, dtype=jnp.int32)),
                                jax.random.key(2))
    moved = np.any(np.asarray(new.private["user"]) != np.asarray(state.private["user"]), 1)
    np.testing.assert_array_equal(np.flatnonzero(moved), np.arange(5, 15))


def test_fcf_approaches_the_noise_floor_on_low_rank_data():
    """Ratings = low-rank + biases + N(0, 0.1^2): FCF's training RMSE reaches the noise
    floor and its held-out RMSE falls far below the mean predictor's (~1 here)."""
    model, alg = _fcf()
    train, test = _low_rank()
    round_fn = jax.jit(build_round(alg, num_clients=U, clients_per_round=U))
    evaluate = jax.jit(evaluate_ratings(model))
    state = alg.init(model.init_global(jax.random.key(0)))
    mean_rmse = float(np.sqrt(np.mean((np.asarray(test["y"]) - np.asarray(train["y"]).mean())
                                      ** 2)))
    for r in range(150):
        state, _ = round_fn(state, train, round_key(jax.random.key(5), r))
    rmse = float(evaluate(state, test)["eval_rmse"])
    assert rmse < 0.4 * mean_rmse, (rmse, mean_rmse)
    assert float(evaluate(state, train)["eval_rmse"]) < 0.2


def test_dp_sparse_gaussian_clips_whole_users_and_noises_every_row():
    from fedjax_lite.privacy.sparse_dp import dp_sparse_gaussian
    rng = np.random.default_rng(3)
    C, N, num_items, S = 5, 4, 9, 0.5
    index = np.stack([rng.choice(num_items, N, replace=False) for _ in range(C)])
    mask = np.ones((C, N), bool); mask[1, 3] = False
    rows = rng.normal(size=(C, N, 2)) * np.array([0.01, 1, 5, 0.1, 100])[:, None, None]
    rows[1, 3] = np.nan                               # a padding slot: never read
    mu = rng.normal(size=C)
    update = SparseUpdate({"item": jnp.asarray(rows, jnp.float32)},
                          jnp.asarray(index, jnp.int32), jnp.asarray(mask),
                          {"mu": jnp.asarray(mu, jnp.float32)})
    w = jnp.ones(C)
    out, _, _ = dp_sparse_gaussian(num_items, S, 0.0, 4.0).apply(update, w, (),
                                                                 jax.random.key(0))
    want = np.zeros((num_items, 2)); want_mu = 0.0
    for c in range(C):
        vec = np.concatenate([np.where(mask[c][:, None], rows[c], 0).ravel(), [mu[c]]])
        f = min(1.0, S / np.linalg.norm(vec))
        for j in range(N):
            if mask[c, j]:
                want[index[c, j]] += f * rows[c, j]
        want_mu += f * mu[c]
    np.testing.assert_allclose(np.asarray(out["item"]), want / 4.0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(out["mu"]), want_mu / 4.0, rtol=1e-5, atol=1e-7)
    noisy, _, m = jax.jit(dp_sparse_gaussian(num_items, S, 2.0, 4.0).apply)(
        update, w, (), jax.random.key(1))
    noise = (np.asarray(noisy["item"]) - want / 4.0)
    assert np.all(noise != 0)                         # every row, touched or not
    assert float(m["noise_std"]) == pytest.approx(2.0 * S / 4.0)
