"""The recommender's references: ``centralized`` (pooled minibatch SGD) against a float64
NumPy SGD written here, and ``local_only`` (every user alone) against a float64 NumPy
full-batch descent per user, plus its isolation (a user's model depends on its own
ratings only)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms import recsys_eval
from fedjax_lite.algorithms.mf_baselines import (centralized, local_only,
                                                 local_only_factors, pooled_order)
from fedjax_lite.core import build_round
from fedjax_lite.core.round import EngineOptions, make_cohort
from fedjax_lite.models.mf import MatrixFactorization

U, I, N, DIM = 5, 7, 4, 3


def _population(seed=0):
    rng = np.random.default_rng(seed)
    n = np.array([4, 1, 3, 0, 2], np.int32)
    items = np.zeros((U, N), np.int32)
    ratings = np.zeros((U, N), np.float32)
    for u in range(U):
        items[u, :n[u]] = rng.choice(I, n[u], replace=False)
        ratings[u, :n[u]] = rng.integers(1, 6, n[u])
    return {"x": items, "y": ratings, "n": n}


def _model(l2=0.1):
    return MatrixFactorization(num_items=I, dim=DIM, l2=l2, init_scale=0.3)


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def test_pooled_order_is_a_permutation_of_the_real_ratings():
    pop = _population()
    order = np.asarray(pooled_order(jax.random.key(3), jnp.asarray(pop["n"]), N, 10))
    real = [u * N + j for u in range(U) for j in range(pop["n"][u])]
    assert sorted(order.tolist()) == real


def test_centralized_equals_float64_numpy_minibatch_sgd():
    model, pop, lr, B, E = _model(), _population(), 0.05, 3, 2
    M = int(pop["n"].sum())
    algo = centralized(model, num_users=U, num_ratings=M, init_key=jax.random.key(1),
                       optimizer=optax.sgd(lr), epochs_per_round=E, batch_size=B)
    state = algo.init(model.init_global(jax.random.key(0)))
    g, p = _np(state.params), _np(state.private)
    key = jax.random.key(7)
    cohort = make_cohort(jax.tree.map(jnp.asarray, pop), jnp.arange(2))   # ignored
    new, metrics = jax.jit(algo.apply)(state, cohort, key)

    q, bi, mu, pu, bu = g["item"], g["item_bias"], g["mu"], p["user"], p["user_bias"]
    losses = []
    for e in range(E):
        order = np.asarray(pooled_order(jax.random.fold_in(key, e), jnp.asarray(pop["n"]),
                                        N, M))
        for s in range(0, M, B):
            idx = order[s:s + B]
            uu, jj = idx // N, idx % N
            ii, rr = pop["x"][uu, jj], pop["y"][uu, jj].astype(np.float64)
            c = len(idx)
            err = mu + bu[uu] + bi[ii] + np.sum(pu[uu] * q[ii], 1) - rr
            losses.append(np.sum(err ** 2))
            d = 2 * err / c
            gq, gbi, gpu, gbu = (np.zeros_like(q), np.zeros_like(bi), np.zeros_like(pu),
                                 np.zeros_like(bu))
            np.add.at(gq, ii, d[:, None] * pu[uu] + 2 * model.l2 * q[ii] / c)
            np.add.at(gpu, uu, d[:, None] * q[ii] + 2 * model.l2 * pu[uu] / c)
            np.add.at(gbi, ii, d + 2 * model.l2 * bi[ii] / c)
            np.add.at(gbu, uu, d + 2 * model.l2 * bu[uu] / c)
            mu = mu - lr * np.sum(d)
            q, bi, pu, bu = q - lr * gq, bi - lr * gbi, pu - lr * gpu, bu - lr * gbu
    np.testing.assert_allclose(new.params["item"], q, atol=1e-5)
    np.testing.assert_allclose(new.params["item_bias"], bi, atol=1e-5)
    np.testing.assert_allclose(new.params["mu"], mu, atol=1e-5)
    np.testing.assert_allclose(new.private["user"], pu, atol=1e-5)
    np.testing.assert_allclose(new.private["user_bias"], bu, atol=1e-5)
    assert float(metrics["train_loss"]) == pytest.approx(sum(losses) / (E * M), rel=1e-5)


def _local_reference(model, g0, p0, items, ratings, steps, lr):
    """One user's full-batch gradient descent on FCF's local objective, float64."""
    q, bi = g0["item"][items].copy(), g0["item_bias"][items].copy()
    mu, pu, bu = float(g0["mu"]), p0["user"].copy(), float(p0["user_bias"])
    c = len(items)
    for _ in range(steps):
        err = mu + bu + bi + q @ pu - ratings
        d = 2 * err / c
        gq = d[:, None] * pu[None, :] + 2 * model.l2 * q / c
        gbi = d + 2 * model.l2 * bi / c
        gpu = d @ q + 2 * model.l2 * pu
        gbu = np.sum(d) + 2 * model.l2 * bu
        gmu = np.sum(d)
        q, bi, pu, bu, mu = q - lr * gq, bi - lr * gbi, pu - lr * gpu, bu - lr * gbu, mu - lr * gmu
    return pu, bu, mu


def test_local_only_equals_per_user_float64_descent_and_persists_across_rounds():
    model, pop, lr = _model(), _population(), 0.1
    algo = local_only(model, num_users=U, num_slots=N, init_key=jax.random.key(1),
                      client_optimizer=optax.sgd(lr), local_epochs=2, batch_size=N,
                      engine=EngineOptions(chunk_size=2))
    state = algo.init(model.init_global(jax.random.key(0)))
    g0, p0 = _np(state.params), _np(state.private)
    round_fn = jax.jit(build_round(algo, num_clients=U, clients_per_round=U))
    population = jax.tree.map(jnp.asarray, pop)
    for r in range(2):                 # every user every round: 2 x 2 full-batch steps
        state, _ = round_fn(state, population, jax.random.key(r))
    assert np.array_equal(np.asarray(state.params["item"]), g0["item"].astype(np.float32))
    folded = local_only_factors(state)
    for u in range(U):
        k = pop["n"][u]
        pu, bu, mu = _local_reference(model, g0, {"user": p0["user"][u],
                                                  "user_bias": p0["user_bias"][u]},
                                      pop["x"][u, :k], pop["y"][u, :k].astype(np.float64),
                                      4 if k else 0, lr)
        np.testing.assert_allclose(state.private["user"][u], pu, atol=1e-5)
        np.testing.assert_allclose(folded["user_bias"][u], bu + mu - g0["mu"], atol=1e-5)


def test_local_only_user_depends_on_its_own_ratings_only():
    model, pop = _model(), _population()
    other = {k: v.copy() for k, v in pop.items()}
    other["y"][0] = np.where(np.arange(N) < pop["n"][0], 6 - pop["y"][0], 0)   # user 0
    algo = local_only(model, num_users=U, num_slots=N, init_key=jax.random.key(1),
                      client_optimizer=optax.sgd(0.05), local_epochs=1, batch_size=2)
    round_fn = jax.jit(build_round(algo, num_clients=U, clients_per_round=3))
    out = []
    for data in (pop, other):
        state = algo.init(model.init_global(jax.random.key(0)))
        for r in range(3):
            state, _ = round_fn(state, jax.tree.map(jnp.asarray, data), jax.random.key(r))
        out.append(jax.tree.map(np.asarray, state.private))
    assert not np.allclose(out[0]["user"][0], out[1]["user"][0])
    for k in out[0]:
        np.testing.assert_array_equal(out[0][k][1:], out[1][k][1:])


def test_evaluate_recommender_rating_metrics_match_numpy():
    model, pop = _model(), _population()
    test = _population(seed=5)
    rng = np.random.default_rng(0)
    params = {"item": rng.normal(size=(I, DIM)).astype(np.float32),
              "item_bias": rng.normal(size=I).astype(np.float32), "mu": np.float32(3.0)}
    private = {"user": rng.normal(size=(U, DIM)).astype(np.float32),
               "user_bias": rng.normal(size=U).astype(np.float32)}

    class S:
        pass
    state = S()
    state.params, state.private = params, private
    ev = recsys_eval.evaluate_recommender(model, lambda st, tr: recsys_eval.stored_factors(st))
    metrics, per_user = ev(state, pop, test, {"x": pop["x"], "n": pop["n"]})
    se, cnt = np.zeros(U), np.zeros(U)
    for u in range(U):
        for j in range(test["n"][u]):
            i = test["x"][u, j]
            pred = (3.0 + private["user_bias"][u] + params["item_bias"][i]
                    + private["user"][u].astype(np.float64) @ params["item"][i])
            se[u] += (np.clip(pred, 1, 5) - test["y"][u, j]) ** 2
            cnt[u] += 1
    np.testing.assert_allclose(per_user["se"], se, rtol=1e-5)
    np.testing.assert_allclose(per_user["count"], cnt)
    assert float(metrics["eval_rmse"]) == pytest.approx(np.sqrt(se.sum() / cnt.sum()), rel=1e-5)
