"""Unreliable and Byzantine clients (core.faults, data.choose_attackers/flip_labels)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms import fedavg
from fedjax_lite.core import EngineOptions, make_cohort
from fedjax_lite.core.faults import DROPOUT_STREAM, Faults, apply_faults
from fedjax_lite.data import choose_attackers, flip_labels, from_ragged, synthetic_logistic
from fedjax_lite.models import logistic_regression

C = 6
INDEX = jnp.array([5, 0, 3, 7, 2, 9], jnp.int32)
ATTACKERS = jnp.zeros(10, bool).at[jnp.array([0, 7])].set(True)   # rows 0 and 7
UPDATES = {"a": jnp.arange(C * 3, dtype=jnp.float32).reshape(C, 3) + 1.0,
           "b": jnp.linspace(-1, 1, C, dtype=jnp.float32)}
BAD = np.array([False, True, False, True, False, False])           # cohort positions


@pytest.mark.parametrize("attack, expected", [
    ("sign_flip", lambda u: -2.5 * u), ("scale", lambda u: 2.5 * u)])
def test_update_attacks_hit_attackers_only(attack, expected):
    faults = Faults(attack=attack, attackers=ATTACKERS, scale=2.5)
    out, w, m = apply_faults(faults, UPDATES, jnp.ones(C), INDEX, jax.random.key(0))
    for k in UPDATES:
        u = np.asarray(UPDATES[k])
        want = np.where(BAD.reshape((C,) + (1,) * (u.ndim - 1)), expected(u), u)
        np.testing.assert_allclose(np.asarray(out[k]), want, rtol=1e-6)
    assert int(m["attackers_in_cohort"]) == 2 and int(m["reporting_clients"]) == C
    np.testing.assert_array_equal(np.asarray(w), np.ones(C))


def test_gaussian_attack_replaces_updates_with_noise():
    faults = Faults(attack="gaussian", attackers=ATTACKERS, noise_std=100.0)
    out, _, _ = apply_faults(faults, UPDATES, jnp.ones(C), INDEX, jax.random.key(0))
    a = np.asarray(out["a"])
    np.testing.assert_array_equal(a[~BAD], np.asarray(UPDATES["a"])[~BAD])
    assert np.all(np.abs(a[BAD] - np.asarray(UPDATES["a"])[BAD]) > 1e-3)
    assert 20 < np.abs(a[BAD]).mean() < 300          # N(0, 100^2) scale


def test_dropout_zeroes_weights_with_its_own_stream():
    key = jax.random.key(3)
    _, w, m = apply_faults(Faults(dropout=0.5), UPDATES, jnp.arange(1.0, C + 1), INDEX, key)
    reports = np.asarray(jax.random.uniform(jax.random.fold_in(key, DROPOUT_STREAM), (C,))) >= 0.5
    np.testing.assert_array_equal(np.asarray(w), np.where(reports, np.arange(1.0, C + 1), 0))
    assert int(m["reporting_clients"]) == reports.sum()


@pytest.fixture(scope="module")
def population():
    pop = synthetic_logistic(num_clients=10, num_features=3, mean_examples=6, seed=1)
    return jax.device_put(pop.arrays())


def test_survivors_only_aggregation_is_exact(population):
    """FedAvg with dropout == FedAvg run on the survivors alone (same client keys)."""
    model = logistic_regression(3)
    make = lambda faults: fedavg(model, client_optimizer=optax.sgd(0.3),
                                 server_optimizer=optax.sgd(1.0), local_epochs=2, batch_size=4,
                                 faults=faults, engine=EngineOptions(chunk_size=None, unroll=1))
    key = jax.random.key(11)
    with_dropout = make(Faults(dropout=0.5))
    state0 = with_dropout.init(model.init(None))
    state1, metrics = jax.jit(with_dropout.apply)(state0, make_cohort(population, INDEX), key)
    agg_key, _ = jax.random.split(key)
    reports = np.asarray(jax.random.uniform(jax.random.fold_in(agg_key, DROPOUT_STREAM),
                                            (C,))) >= 0.5
    assert 0 < reports.sum() < C and int(metrics["reporting_clients"]) == reports.sum()
    survivors = make_cohort(population, INDEX[np.flatnonzero(reports)])
    reference, _ = jax.jit(make(Faults()).apply)(state0, survivors, key)
    for k in ("w", "b"):
        np.testing.assert_allclose(np.asarray(state1.params[k]),
                                   np.asarray(reference.params[k]), rtol=1e-6, atol=1e-7)


def test_round_without_survivors_keeps_model_and_server_state(population):
    model = logistic_regression(3)
    alg = fedavg(model, client_optimizer=optax.sgd(0.3), server_optimizer=optax.adam(0.1),
                 local_epochs=1, batch_size=4, faults=Faults(dropout=0.999999),
                 engine=EngineOptions(chunk_size=None, unroll=1))
    # a state whose Adam moments are non-zero: a zero pseudo-gradient would still move it
    state = alg.init({"w": jnp.ones(3), "b": jnp.zeros(())})
    state = state._replace(opt_state=jax.tree.map(lambda a: a + 0.5, state.opt_state))
    new, metrics = jax.jit(alg.apply)(state, make_cohort(population, INDEX), jax.random.key(0))
    assert int(metrics["reporting_clients"]) == 0
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                    jax.tree.leaves((new.params, new.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_attackers_are_a_fixed_seeded_subset():
    a = choose_attackers(50, 0.2, seed=3)
    assert a.dtype == bool and a.sum() == 10
    np.testing.assert_array_equal(a, choose_attackers(50, 0.2, seed=3))
    assert not np.array_equal(a, choose_attackers(50, 0.2, seed=4))
    with pytest.raises(ValueError, match="attack fraction=1.5 must be in"):
        choose_attackers(50, 1.5, seed=0)


def test_label_flip_touches_attackers_real_labels_only():
    pop = from_ragged([np.zeros((3, 1)), np.zeros((2, 1))], [np.array([0, 1, 2]), np.array([1, 0])])
    flipped = flip_labels(pop, np.array([True, False]), num_classes=3)
    np.testing.assert_array_equal(flipped.y[0], [2, 1, 0])
    np.testing.assert_array_equal(flipped.y[1], pop.y[1])      # honest, and its padding
    assert flipped.y[1, 2] == 0                               # padding untouched
