"""Population-sized client state (core.client_state) and error feedback on the uplink
(core.faults.uplink, Stich et al. 2018 / Karimireddy et al. 2019), against float64 NumPy
references written here: the residual recursion, the telescoping sum, which rows survive
(padding, dropouts, clients outside the cohort), privacy of the residuals, convergence
on a tiny linear regression, checkpointing and every algorithm's wiring."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms import (ServerState, ServerStateEF, fedavg, fednova, fedprox,
                                    fedsgd, scaffold)
from fedjax_lite.core import (EngineOptions, build_round, client_state, compression,
                              make_cohort)
from fedjax_lite.core.aggregators import Aggregator, weighted_mean
from fedjax_lite.core.faults import DROPOUT_STREAM, Faults, apply_faults, uplink
from fedjax_lite.models.base import Model

P, N, D = 10, 8, 6                      # population rows, examples per client, features
ENGINE = EngineOptions(chunk_size=None, unroll=1)


def _np_top_k(v, k):
    out = np.zeros_like(v)
    keep = np.argsort(-np.abs(v))[:k]
    out[keep] = v[keep]
    return out


def _flat(tree):
    """[rows, D'] of a {'b', 'w'} pytree with a leading row axis (ravel_pytree order)."""
    leaves = [np.asarray(tree[k], np.float64) for k in sorted(tree)]
    return np.concatenate([a.reshape(a.shape[0], -1) for a in leaves], axis=1)


# --------------------------------------------------------------------------- the API


def test_zeros_gather_scatter_against_numpy():
    rng = np.random.default_rng(0)
    like = {"a": jnp.ones((3,), jnp.float32), "b": jnp.ones((), jnp.float32)}
    z = client_state.zeros(P, like)
    assert z["a"].shape == (P, 3) and z["b"].shape == (P,) and z["a"].dtype == jnp.float32
    assert client_state.num_rows(z) == P
    state = {"a": jnp.asarray(rng.normal(size=(P, 3)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=P), jnp.float32)}
    cohort = make_cohort({"n": jnp.ones(P, jnp.int32)}, jnp.array([7, 2, 5, 0]),
                         jnp.array([True, True, False, True]))          # slot 2: padding
    rows = jax.jit(client_state.gather)(state, cohort)
    np.testing.assert_array_equal(rows["a"], np.asarray(state["a"])[[7, 2, 5, 0]])
    new = {"a": rows["a"] + 1.0, "b": rows["b"] - 1.0}
    keep = jnp.array([False, True, False, False])                       # slot 1 kept
    out = jax.jit(client_state.scatter)(state, cohort, new, keep)
    for k in state:
        want = np.array(state[k])
        want[[7, 0]] = np.asarray(new[k])[[0, 3]]
        np.testing.assert_array_equal(np.asarray(out[k]), want)
    with pytest.raises(ValueError, match="state has 10 rows but the population has 12"):
        client_state.gather(state, make_cohort({"n": jnp.ones(12, jnp.int32)},
                                               jnp.array([1, 2])))
    with pytest.raises(ValueError, match="share one leading axis"):
        client_state.num_rows({"a": jnp.zeros((3, 2)), "b": jnp.zeros(4)})
    with pytest.raises(ValueError, match="positive int"):
        client_state.zeros(0, like)


# ------------------------------------------------------------ the uplink, unit level


def test_error_feedback_matches_float64_reference_and_telescopes():
    """Six rounds of random updates through ``uplink`` (top-k 25%, dropout 0.3, a
    padding slot every round) against mem-SGD's recursion in float64; then, per client,
    sum of what it sent = sum of the updates it reported - its final residual."""
    rng = np.random.default_rng(1)
    shapes = {"b": (2,), "w": (2, 3)}
    dim, k = 8, 2
    faults = Faults(dropout=0.3, compressor=compression.top_k(0.25), error_feedback=True,
                    num_clients=P)
    step = jax.jit(functools.partial(uplink, faults))
    residuals = client_state.zeros(P, {n: jnp.zeros(s) for n, s in shapes.items()})
    ref_e = np.zeros((P, dim))
    sent_sum, update_sum = np.zeros((P, dim)), np.zeros((P, dim))   # float64 of JAX's
    ref_sent_sum, ref_update_sum = np.zeros((P, dim)), np.zeros((P, dim))
    pop = {"n": jnp.ones(P, jnp.int32)}
    for r in range(6):
        index = rng.permutation(P)[:5]
        mask = np.arange(5) != r % 5
        updates = {n: jnp.asarray(rng.normal(size=(5,) + s), jnp.float32)
                   for n, s in shapes.items()}
        key = jax.random.key(100 + r)
        out, weights, residuals, metrics = step(updates, jnp.asarray(mask, jnp.float32),
                                                make_cohort(pop, jnp.asarray(index),
                                                            jnp.asarray(mask)),
                                                key, residuals)
        reports = np.asarray(jax.random.uniform(jax.random.fold_in(key, DROPOUT_STREAM),
                                                (5,))) >= 0.3
        np.testing.assert_array_equal(np.asarray(weights) > 0, reports & mask)
        u, got = _flat(updates), _flat(out)
        for c in np.flatnonzero(reports & mask):
            row = index[c]
            v = u[c] + ref_e[row]
            want = _np_top_k(v, k)
            np.testing.assert_allclose(got[c], want, rtol=1e-6, atol=1e-6)
            ref_e[row] = v - want
            ref_sent_sum[row] += want
            ref_update_sum[row] += u[c]
            sent_sum[row] += got[c]
            update_sum[row] += u[c]
        np.testing.assert_allclose(_flat(residuals), ref_e, rtol=1e-6, atol=1e-6)
        assert float(metrics["residual_norm"]) > 0
    final = _flat(residuals)
    assert np.count_nonzero(final.any(axis=1)) >= 5      # several clients hold memory
    np.testing.assert_allclose(ref_sent_sum, ref_update_sum - ref_e, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sent_sum, update_sum - final, rtol=0, atol=1e-5)


def test_configuration_errors():
    with pytest.raises(ValueError, match="needs a compressor"):
        fedavg(_model(), client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0),
               local_epochs=1, batch_size=4, faults=Faults(error_feedback=True,
                                                           num_clients=P))
    with pytest.raises(ValueError, match="needs num_clients"):
        fedsgd(_model(), server_optimizer=optax.sgd(1.0),
               faults=Faults(compressor=compression.top_k(0.5), error_feedback=True))
    with pytest.raises(ValueError, match="use uplink"):
        apply_faults(_ef(0.5), {"a": jnp.ones((2, 3))}, jnp.ones(2), jnp.arange(2),
                     jax.random.key(0))


# ------------------------------------------------- in the round: a linear regression


def _model() -> Model:
    return Model(init=lambda key: {"w": jnp.zeros(D), "b": jnp.zeros(())},
                 apply=lambda p, x: x @ p["w"] + p["b"],
                 loss=lambda pred, y: 0.5 * jnp.square(pred - y),
                 predict=lambda pred: pred, num_classes=1)


def _population(seed=0):
    rng = np.random.default_rng(seed)
    w_star = rng.normal(size=D)
    x = rng.normal(size=(P, N, D))
    y = x @ w_star + 0.01 * rng.normal(size=(P, N))
    n = np.full(P, N, np.int32)
    return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32),
            "n": jnp.asarray(n)}, w_star


def _ef(fraction, **kw):
    return Faults(compressor=compression.top_k(fraction), error_feedback=True,
                  num_clients=P, **kw)


def _recording() -> Aggregator:
    """The weighted mean, reporting every row it received and the weights."""
    return Aggregator(lambda p: (), lambda d, w, s, k: (weighted_mean(d, w), s,
                                                        {"seen": d, "weights": w}))


@functools.lru_cache(maxsize=None)
def _fedavg(faults: Faults):
    alg = fedavg(_model(), client_optimizer=optax.sgd(0.05), server_optimizer=optax.sgd(1.0),
                 local_epochs=1, batch_size=4, faults=faults, aggregator=_recording(),
                 engine=ENGINE)
    return alg.init, jax.jit(alg.apply)


INDEX = jnp.array([3, 8, 1, 6, 0, 9])
MASK = jnp.array([True, True, True, True, False, True])     # slot 4 (row 0): padding
EF_FAULTS = _ef(0.3, dropout=0.4)


def _start():
    """A FedAvg+EF state whose residuals are non-zero everywhere, a round key under
    which some cohort clients drop out, and the padded cohort."""
    pop, _ = _population()
    init, _ = _fedavg(EF_FAULTS)
    state = init(_model().init(None))
    rng = np.random.default_rng(2)
    state = state._replace(
        params={"w": jnp.asarray(rng.normal(size=D), jnp.float32), "b": jnp.float32(0.3)},
        residuals=jax.tree.map(lambda a: jnp.asarray(0.1 * rng.normal(size=a.shape),
                                                     jnp.float32), state.residuals))
    return state, jax.random.key(4), make_cohort(pop, INDEX, MASK)


def test_residuals_survive_only_for_rows_that_did_not_send():
    state, key, cohort = _start()
    _, apply = _fedavg(EF_FAULTS)
    new, m = apply(state, cohort, key)
    assert isinstance(new, ServerStateEF)
    # the clients' raw updates Delta_i: the same round without compression or dropout
    _, plain = _fedavg(Faults())
    _, raw = plain(ServerState(*state[:4]), cohort, key)
    sent = np.asarray(m["weights"]) > 0
    assert 0 < sent.sum() < MASK.sum()                  # some members dropped out
    old, now = _flat(state.residuals), _flat(new.residuals)
    delta, seen = _flat(raw["seen"]), _flat(m["seen"])
    k = int(np.ceil(0.3 * (D + 1)))
    for c, row in enumerate(np.asarray(INDEX)):
        if sent[c]:
            v = delta[c] + old[row]
            np.testing.assert_allclose(seen[c], _np_top_k(v, k), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(now[row], v - seen[c], rtol=1e-5, atol=1e-6)
            assert not np.array_equal(now[row], old[row])
        else:                                           # dropped out or padding slot
            np.testing.assert_array_equal(now[row], old[row])
    outside = np.setdiff1d(np.arange(P), np.asarray(INDEX))
    np.testing.assert_array_equal(now[outside], old[outside])
    np.testing.assert_array_equal(now[0], old[0])       # the padding slot's row


def test_a_clients_residual_reaches_the_server_only_through_its_own_upload():
    state, key, cohort = _start()
    _, apply = _fedavg(EF_FAULTS)
    _, base = apply(state, cohort, key)
    sent = np.flatnonzero(np.asarray(base["weights"]) > 0)
    slot, row = sent[0], int(INDEX[sent[0]])
    bump = lambda r: jax.tree.map(lambda a: a.at[r].add(5.0), state.residuals)
    _, m = apply(state._replace(residuals=bump(row)), cohort, key)
    changed = np.any(_flat(m["seen"]) != _flat(base["seen"]), axis=1)
    assert changed[slot] and changed.sum() == 1
    bumped = bump(2)                                                   # row 2: not sampled
    new, m = apply(state._replace(residuals=bumped), cohort, key)
    np.testing.assert_array_equal(_flat(m["seen"]), _flat(base["seen"]))
    np.testing.assert_array_equal(_flat(new.residuals)[2], _flat(bumped)[2])


def test_error_feedback_reaches_a_lower_error_than_plain_top_k():
    pop, w_star = _population(seed=3)
    errors = {}
    for name, faults in [("plain", Faults(compressor=compression.top_k(0.15))),
                         ("ef", _ef(0.15))]:
        alg = fedavg(_model(), client_optimizer=optax.sgd(0.05),
                     server_optimizer=optax.sgd(1.0), local_epochs=1, batch_size=4,
                     faults=faults, engine=ENGINE)
        fn = jax.jit(build_round(alg, num_clients=P, clients_per_round=5))
        state = alg.init(_model().init(None))
        for r in range(30):
            state, _ = fn(state, pop, jax.random.key(r))
        errors[name] = float(np.linalg.norm(np.asarray(state.params["w"]) - w_star))
    assert errors["ef"] < 0.75 * errors["plain"], errors


def test_lossless_error_feedback_is_the_plain_round_and_state_keeps_its_structure():
    state, key, cohort = _start()
    init, plain = _fedavg(Faults())
    assert type(init(_model().init(None))) is ServerState       # no residuals field
    _, lossless = _fedavg(_ef(1.0))
    a, _ = plain(ServerState(*state[:4]), cohort, key)
    # sending everything: what arrives is Delta_i + e_i and the memory empties
    b, m = lossless(state, cohort, key)
    _, raw = plain(ServerState(*state[:4]), cohort, key)
    old, now = _flat(state.residuals), _flat(b.residuals)
    rows = np.asarray(INDEX)
    real = np.asarray(MASK)
    np.testing.assert_allclose(_flat(m["seen"])[real], _flat(raw["seen"])[real]
                               + old[rows[real]], rtol=1e-6, atol=1e-6)
    assert not now[rows[real]].any()
    np.testing.assert_array_equal(now[2], old[2])
    # ... so from empty memories it is the plain round
    zero = state._replace(residuals=jax.tree.map(jnp.zeros_like, state.residuals))
    b, _ = lossless(zero, cohort, key)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_state_is_checkpointable_and_resume_is_bitwise(tmp_path):
    from fedjax_lite.experiment.checkpoint import Checkpointer
    state, key, cohort = _start()
    _, apply = _fedavg(EF_FAULTS)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(state))
    one, _ = apply(state, cohort, key)
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, one, jax.random.key(0), {"round": 1})
    _, restored, _, _ = ckpt.restore(jax.tree.map(jnp.zeros_like, one), jax.random.key(0))
    ckpt.close()
    assert isinstance(restored, ServerStateEF)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    k2 = jax.random.fold_in(key, 1)
    two_direct, _ = apply(one, cohort, k2)
    two_resumed, _ = apply(restored, cohort, k2)
    for a, b in zip(jax.tree.leaves(two_direct), jax.tree.leaves(two_resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["fedprox", "fedsgd", "fednova", "scaffold"])
def test_every_algorithm_carries_residuals(name):
    """top-k 30% with error feedback: the state gains ``residuals``; cohort rows that
    sent hold memory, the others none; from empty memories the first round is plain
    top-k's."""
    pop, _ = _population()
    build = {
        "fedprox": lambda f: fedprox(_model(), client_optimizer=optax.sgd(0.05),
                                     server_optimizer=optax.sgd(1.0), local_epochs=1,
                                     batch_size=4, mu=0.1, faults=f, engine=ENGINE),
        "fedsgd": lambda f: fedsgd(_model(), server_optimizer=optax.sgd(0.1), faults=f,
                                   engine=ENGINE),
        "fednova": lambda f: fednova(_model(), client_optimizer=optax.sgd(0.05),
                                     server_optimizer=optax.sgd(1.0), local_epochs=1,
                                     batch_size=4, faults=f, engine=ENGINE),
        "scaffold": lambda f: scaffold(_model(), num_clients=P,
                                       client_optimizer=optax.sgd(0.05),
                                       server_optimizer=optax.sgd(1.0), local_epochs=1,
                                       batch_size=4, faults=f, engine=ENGINE),
    }[name]
    cohort = make_cohort(pop, INDEX, MASK)
    key = jax.random.key(5)
    outs = {}
    for label, faults in [("plain", Faults(compressor=compression.top_k(0.3))),
                          ("ef", _ef(0.3))]:
        alg = build(faults)
        state = alg.init({"w": jnp.full(D, 0.2), "b": jnp.zeros(())})
        outs[label], _ = jax.jit(alg.apply)(state, cohort, key)
    assert not hasattr(outs["plain"], "residuals")
    assert type(outs["ef"]).__name__.endswith("EF")
    for a, b in zip(jax.tree.leaves(outs["plain"].params), jax.tree.leaves(outs["ef"].params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    held = _flat(outs["ef"].residuals).any(axis=1)
    members = np.zeros(P, bool)
    members[np.asarray(INDEX)[np.asarray(MASK)]] = True
    np.testing.assert_array_equal(held, members)
