"""FedRecon (algorithms.fedrecon): the support/query split, reconstruction and the global
update against float64 NumPy references, the absence of any persistent private state,
and learning on low-rank data -- for training users and for users never seen in
training."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms.fedrecon import (evaluate_reconstruction, evaluate_train_test,
                                             fedrecon, reconstruct, support_query_split)
from fedjax_lite.core import EngineOptions, build_round, client_keys, make_cohort, round_key
from fedjax_lite.core.aggregators import Aggregator
from fedjax_lite.core.sparse import sparse_mean
from fedjax_lite.models.mf import MatrixFactorization, gather_rows

U, U_NEW, I, K_DIM, PER, TEST = 80, 20, 40, 3, 16, 4   # train users, unseen users, ...
L2 = 0.001


# ----------------------------------------------------------------------------- references
def np_predict(p, bu, q, bi, mu):
    return mu + bu + bi + q @ p


def np_reconstruct(q, bi, mu, r, steps, lr, l2):
    """Full-batch SGD on (p_u, b_u) from zeros, rows frozen: Koren's per-rating mean
    objective of models.mf: the gradient of
    mean(e^2) + l2 (mean(|q|^2 + b_i^2) + |p|^2 + b_u^2)."""
    p, bu = np.zeros(q.shape[1]), 0.0
    n = len(r)
    if n == 0:
        return p, bu
    for _ in range(steps):
        e = np_predict(p, bu, q, bi, mu) - r
        p, bu = (p - lr * (2 / n * q.T @ e + 2 * l2 * p),
                 bu - lr * (2 / n * e.sum() + 2 * l2 * bu))
    return p, bu


def np_global_update(p, bu, q, bi, mu, r, epochs, lr, l2):
    """Full-batch SGD on the rows (q, b_i) and mu with (p_u, b_u) fixed; returns deltas."""
    q0, bi0, mu0 = q.copy(), bi.copy(), mu
    n = len(r)
    for _ in range(epochs):
        e = np_predict(p, bu, q, bi, mu) - r
        gq = 2 / n * e[:, None] * p[None, :] + 2 * l2 * q / n
        gb = 2 / n * e + 2 * l2 * bi / n
        q, bi, mu = q - lr * gq, bi - lr * gb, mu - lr * 2 / n * e.sum()
    return q - q0, bi - bi0, mu - mu0


# ----------------------------------------------------------------------------- data
def _low_rank(seed=0, noise=0.1):
    """U + U_NEW users, each rating PER + TEST distinct items of I: 3 + biases + a rank-3
    interaction + N(0, noise^2), clipped to [1, 5]."""
    rng = np.random.default_rng(seed)
    users = U + U_NEW
    P = rng.normal(size=(users, K_DIM)) * 0.7
    Q = rng.normal(size=(I, K_DIM)) * 0.7
    bu, bi = rng.normal(size=users) * 0.3, rng.normal(size=I) * 0.3
    items = np.stack([rng.choice(I, PER + TEST, replace=False) for _ in range(users)])
    r = (3.0 + bu[:, None] + bi[items] + np.einsum("uk,unk->un", P, Q[items])
         + noise * rng.normal(size=items.shape))
    r = np.clip(r, 1, 5).astype(np.float32)

    def part(u0, u1, a, b):
        return {"x": jnp.asarray(items[u0:u1, a:b], jnp.int32),
                "y": jnp.asarray(r[u0:u1, a:b]),
                "n": jnp.full((u1 - u0,), b - a, jnp.int32)}
    return (part(0, U, 0, PER), part(0, U, PER, PER + TEST),      # training users
            part(U, U + U_NEW, 0, PER + TEST))                    # never seen in training


def _model():
    return MatrixFactorization(num_items=I, dim=K_DIM, l2=L2)


def _fedrecon(**kw):
    args = dict(client_optimizer=optax.sgd(0.2), server_optimizer=optax.sgd(1.0),
                local_epochs=2, batch_size=4, recon_steps=5,
                engine=EngineOptions(chunk_size=None))
    return fedrecon(_model(), **{**args, **kw})


def _spy():
    """sparse_mean that also returns what it received (the clients' updates, weights) in
    its metrics, so a jitted round can show them."""
    def apply(update, weights, agg_state, key):
        delta, agg_state, metrics = sparse_mean(I).apply(update, weights, agg_state, key)
        return delta, agg_state, {**metrics, "update": update, "weights": weights}
    return Aggregator(lambda p: (), apply)


# One FedRecon shared by the update-level tests (one compilation): full-batch steps, so the
# float64 references need no example order.
LR_R, LR_C, RECON_STEPS, EPOCHS = 0.1, 0.05, 4, 3


@functools.cache
def _spied():
    alg = _fedrecon(client_optimizer=optax.sgd(LR_C), recon_optimizer=optax.sgd(LR_R),
                    recon_steps=RECON_STEPS, local_epochs=EPOCHS, batch_size=PER,
                    weighting="examples", aggregator=_spy())
    return alg, jax.jit(alg.apply)


def _received(state, population, users, key):
    """(new state, what the aggregator received (NumPy), weights) for cohort ``users``."""
    new, m = _spied()[1](state, make_cohort(population, jnp.asarray(users, jnp.int32)), key)
    return new, jax.tree.map(np.asarray, m["update"]), np.asarray(m["weights"])


def _random_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"item": jnp.asarray(rng.normal(size=(I, K_DIM)) * 0.5, jnp.float32),
            "item_bias": jnp.asarray(rng.normal(size=I) * 0.3, jnp.float32),
            "mu": jnp.asarray(3.1, jnp.float32)}


# ----------------------------------------------------------------------------- split
_split = jax.jit(support_query_split, static_argnums=2)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.8])
def test_support_query_split_properties(fraction):
    n = jnp.asarray([0, 1, 2, 3, 7, 10, 13, 13], jnp.int32)
    N = 13
    keys = client_keys(jax.random.key(3), jnp.arange(8))
    sp = jax.tree.map(np.asarray, _split(keys, n, N, fraction))
    for k, nk in enumerate(np.asarray(n)):
        s, q = sp.support[k, :sp.n_support[k]], sp.query[k, :sp.n_query[k]]
        assert sp.n_support[k] + sp.n_query[k] == nk
        want_s = 0 if nk <= 1 else min(max(int(np.floor(fraction * nk + 0.5)), 1), nk - 1)
        assert sp.n_support[k] == want_s
        if nk >= 2:
            assert sp.n_support[k] >= 1 and sp.n_query[k] >= 1
        if nk == 1:                         # a single rating is a query (cold-start) rating
            assert sp.n_support[k] == 0 and list(q) == [0]
        assert not set(s) & set(q)                                   # disjoint
        assert sorted(set(s) | set(q)) == list(range(nk))            # all real slots, once
        assert len(set(s)) == len(s) and len(set(q)) == len(q)
        np.testing.assert_array_equal(np.flatnonzero(sp.is_query[k]), np.sort(q))
    # independent of the padded length; a different key gives another split
    sp_long = jax.tree.map(np.asarray, _split(keys, n, N + 7, fraction))
    for k, nk in enumerate(np.asarray(n)):
        m = sp.n_support[k]
        assert set(sp_long.support[k, :m]) == set(sp.support[k, :m])
        assert not sp_long.is_query[k, N:].any()
    other = np.asarray(_split(client_keys(jax.random.key(4), jnp.arange(8)), n, N,
                             fraction).is_query)
    assert not np.array_equal(other, sp.is_query)


# ----------------------------------------------------------------------------- R and U
def test_reconstruction_moves_only_the_private_parameters():
    """R == float64 full-batch SGD on (p_u, b_u) from zeros over the support slots, with
    the rows and mu frozen (they are inputs, returned untouched; only p_u, b_u come out)."""
    params = _random_params()
    rng = np.random.default_rng(1)
    K, N, steps, lr = 3, 9, 7, 0.15
    items = jnp.asarray(np.stack([rng.choice(I, N, replace=False) for _ in range(K)]),
                        jnp.int32)
    ratings = jnp.asarray(rng.uniform(1, 5, size=(K, N)), jnp.float32)
    slots = jnp.asarray(np.stack([rng.permutation(N) for _ in range(K)]), jnp.int32)
    n = jnp.asarray([6, 1, 0], jnp.int32)
    rows = gather_rows(params, items)
    rows_before = jax.tree.map(np.array, rows)
    keys = client_keys(jax.random.key(0), jnp.arange(K))
    private, stats = jax.jit(lambda r, s, y, n, k: reconstruct(
        _model(), optax.sgd(lr), r, params["mu"], s, y, n, k, steps=steps,
        batch_size=N))(rows, slots, ratings, n, keys)
    assert set(private) == {"user", "user_bias"}
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, rows), rows_before)
    for k in range(K):
        s = np.asarray(slots[k, :n[k]])
        it = np.asarray(items[k])[s]
        p, bu = np_reconstruct(np.asarray(params["item"], np.float64)[it],
                               np.asarray(params["item_bias"], np.float64)[it],
                               float(params["mu"]), np.asarray(ratings[k], np.float64)[s],
                               steps, lr, L2)
        np.testing.assert_allclose(np.asarray(private["user"][k]), p, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(private["user_bias"][k]), bu, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats.steps), [steps, steps, 0])


def test_client_update_equals_reconstruct_then_global_sgd_reference():
    """Each user's sparse update == NumPy: reconstruct (p_u, b_u) on the support set, then
    SGD on its query rows and mu with (p_u, b_u) fixed. Support-only items are untouched
    (zero delta, not marked); ``examples`` weights are the query sizes."""
    train, _, _ = _low_rank()
    n = np.array([16, 9, 2, 1, 5, 16])                 # padded users, a cold-start user
    pop = {**train, "n": train["n"].at[:6].set(jnp.asarray(n, jnp.int32))}
    steps, epochs, lr_r, lr_c = RECON_STEPS, EPOCHS, LR_R, LR_C
    params = _random_params(2)
    _, upd, weights = _received(_spied()[0].init(params), pop, np.arange(6),
                                jax.random.key(7))
    P = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for u in range(6):
        x, y = np.asarray(pop["x"][u]), np.asarray(pop["y"][u], np.float64)
        q_slots = np.flatnonzero(upd.mask[u])
        s_slots = np.setdiff1d(np.arange(n[u]), q_slots)
        assert len(q_slots) + len(s_slots) == n[u] and q_slots.max() < n[u]
        assert weights[u] == len(q_slots)
        p, bu = np_reconstruct(P["item"][x[s_slots]], P["item_bias"][x[s_slots]], P["mu"],
                               y[s_slots], steps, lr_r, L2)
        dq, db, dmu = np_global_update(p, bu, P["item"][x[q_slots]],
                                       P["item_bias"][x[q_slots]], P["mu"], y[q_slots],
                                       epochs, lr_c, L2)
        np.testing.assert_allclose(upd.rows["item"][u, q_slots], dq, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(upd.rows["item_bias"][u, q_slots], db, rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(upd.dense["mu"][u], dmu, rtol=1e-4, atol=1e-7)
        untouched = np.setdiff1d(np.arange(PER), q_slots)     # support and padding slots
        assert not upd.rows["item"][u, untouched].any()
        assert not upd.rows["item_bias"][u, untouched].any()
        np.testing.assert_array_equal(upd.index[u], np.asarray(pop["x"][u]))


# ----------------------------------------------------------------------------- privacy
def test_no_private_state_persists_between_rounds():
    """The state is (params, opt_state, agg_state, round) with no user-indexed array; a
    second round on the same cohort from the same globals sends exactly the first
    round's updates (reconstruction restarts from the same init), and changing one user's
    ratings changes only that user's own update."""
    train, _, _ = _low_rank()
    state = _spied()[0].init(_model().init_global(jax.random.key(0)))
    assert state._fields == ("params", "opt_state", "agg_state", "round")
    users = np.arange(5, 11)
    state1, first, _ = _received(state, train, users, jax.random.key(3))
    for leaf in jax.tree.leaves(state1):
        assert jnp.ndim(leaf) == 0 or leaf.shape[0] != U
    assert int(state1.round) == 1
    assert not np.array_equal(state1.params["item"], state.params["item"])
    _, again, _ = _received(state1._replace(params=state.params), train, users,
                            jax.random.key(3))
    jax.tree.map(np.testing.assert_array_equal, first, again)
    # user 8 (cohort slot 3) rates differently: only its own update changes
    changed = {**train, "y": train["y"].at[8].add(0.5)}
    _, other, _ = _received(state, changed, users, jax.random.key(3))
    keep = np.arange(6) != 3
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other)):
        np.testing.assert_array_equal(a[keep], b[keep])
    assert not np.array_equal(first.rows["item"][3], other.rows["item"][3])


def test_dp_sparse_gaussian_aggregates_fedrecon_updates():
    from fedjax_lite.privacy.sparse_dp import dp_sparse_gaussian
    train, _, _ = _low_rank()
    alg = _fedrecon(aggregator=dp_sparse_gaussian(I, 0.5, 1.0, 10.0),
                    item_aggregation="all", batch_size=PER, recon_steps=1, local_epochs=1)
    state = alg.init(_model().init_global(jax.random.key(0)))
    new, m = jax.jit(alg.apply)(state, make_cohort(train, jnp.arange(10)),
                                jax.random.key(2))
    assert float(m["noise_std"]) == pytest.approx(0.05)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(new.params))


# ----------------------------------------------------------------------------- evaluation
def test_evaluate_train_test_equals_a_float64_reference():
    """Reconstruct from ALL training ratings (full batch), predict the test ratings,
    clip to the scale: RMSE/MAE over every test rating."""
    train, test, _ = _low_rank()
    params = _random_params(3)
    steps, lr = 6, 0.1
    ev = evaluate_train_test(_model(), recon_steps=steps, recon_optimizer=optax.sgd(lr),
                             batch_size=PER, key=jax.random.key(0),
                             engine=EngineOptions(chunk_size=16))
    n_tr = np.full(U, PER); n_tr[:3] = [3, 1, 0]
    n_te = np.full(U, TEST); n_te[5] = 2
    tr = {**train, "n": jnp.asarray(n_tr, jnp.int32)}
    te = {**test, "n": jnp.asarray(n_te, jnp.int32)}
    out = jax.jit(ev)(_fedrecon().init(params), tr, te)
    P = {k: np.asarray(v, np.float64) for k, v in params.items()}
    errs = []
    for u in range(U):
        x, y = np.asarray(train["x"][u, :n_tr[u]]), np.asarray(train["y"][u, :n_tr[u]])
        p, bu = np_reconstruct(P["item"][x], P["item_bias"][x], P["mu"], y.astype(float),
                               steps, lr, L2)
        xt, yt = np.asarray(test["x"][u, :n_te[u]]), np.asarray(test["y"][u, :n_te[u]])
        pred = np.clip(np_predict(p, bu, P["item"][xt], P["item_bias"][xt], P["mu"]), 1, 5)
        errs.append(pred - yt)
    e = np.concatenate(errs)
    np.testing.assert_allclose(float(out["eval_rmse"]), np.sqrt(np.mean(e ** 2)), rtol=1e-4)
    np.testing.assert_allclose(float(out["eval_mae"]), np.mean(np.abs(e)), rtol=1e-4)
    np.testing.assert_allclose(float(out["eval_loss"]), np.mean(e ** 2), rtol=2e-4)


def test_fedrecon_learns_and_serves_users_never_seen_in_training():
    """Low-rank ratings + N(0, 0.1^2) noise: after training on U users, held-out RMSE of
    the training users (reconstructed from their training ratings) and of U_NEW users
    never seen in training (reconstructed from half of their ratings, scored on the
    other half) falls far below the mean predictor's (the training mean, scored on all of
    the users' ratings: the query half is a random half), and the unseen users gain far
    more from the trained globals than reconstruction alone gives them (before
    training)."""
    train, test, new_users = _low_rank()
    model = _model()
    alg = _fedrecon(recon_steps=10)
    round_fn = jax.jit(build_round(alg, num_clients=U, clients_per_round=U))
    # evaluation reconstructs by 20 full-batch steps (cheaper to compile than minibatches)
    kw = dict(recon_steps=20, recon_optimizer=optax.sgd(0.5), batch_size=PER + TEST)
    ev_train = jax.jit(evaluate_train_test(model, key=jax.random.key(8), **kw))
    ev_new = jax.jit(evaluate_reconstruction(model, support_fraction=0.5,
                                             key=jax.random.key(9), **kw))
    state = alg.init(model.init_global(jax.random.key(0)))
    mean = float(np.asarray(train["y"]).mean())
    rmse0 = lambda d: float(np.sqrt(np.mean((np.asarray(d["y"]) - mean) ** 2)))
    before = float(ev_new(state, new_users)["eval_rmse"])
    for r in range(150):
        state, metrics = round_fn(state, train, round_key(jax.random.key(5), r))
    seen = float(ev_train(state, train, test)["eval_rmse"])
    unseen = ev_new(state, new_users)
    print(f"FedRecon RMSE: training users {seen:.3f} (mean predictor {rmse0(test):.3f}); "
          f"unseen users {float(unseen['eval_rmse']):.3f} (mean predictor "
          f"{rmse0(new_users):.3f}, before training {before:.3f})")
    assert seen < 0.35 * rmse0(test), (seen, rmse0(test))
    assert float(unseen["eval_rmse"]) < 0.5 * rmse0(new_users), (unseen, rmse0(new_users))
    assert float(unseen["eval_rmse"]) < 0.5 * before, (unseen, before)
    assert float(unseen["eval_mae"]) < float(unseen["eval_rmse"])
