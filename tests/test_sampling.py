"""Cohort sampling (core.round): Poisson and epoch sampling with padded static cohorts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from fedjax_lite.algorithms import fedavg, scaffold
from fedjax_lite.core import EngineOptions, Sampling, build_round, make_cohort, poisson_bound
from fedjax_lite.core.sampling import epoch_cohort, poisson_bound_tail, poisson_cohort
from fedjax_lite.data import synthetic_logistic
from fedjax_lite.models import logistic_regression


def test_poisson_draws_each_client_independently_with_rate_q():
    K, q, bound, R = 200, 0.1, 60, 3000
    draw = jax.jit(jax.vmap(lambda k: poisson_cohort(k, K, q, bound)))
    index, mask, count = (np.asarray(a) for a in draw(jax.random.split(jax.random.key(0), R)))
    member = np.zeros((R, K), bool)
    for r in range(R):
        member[r, index[r][mask[r]]] = True
        assert np.all(np.diff(index[r][mask[r]]) > 0)          # distinct rows, ascending
    np.testing.assert_array_equal(member.sum(1), count)
    np.testing.assert_array_equal(mask.sum(1), np.minimum(count, bound))
    # every client's inclusion frequency ~ q (binomial z-test, all clients)
    freq = member.mean(0)
    assert np.max(np.abs(freq - q)) < 5 * np.sqrt(q * (1 - q) / R)
    # cohort sizes follow Binomial(K, q): mean, variance and a chi-square on the bins
    assert abs(count.mean() - K * q) < 4 * np.sqrt(K * q * (1 - q) / R)
    assert abs(count.var() / (K * q * (1 - q)) - 1) < 0.1
    # pairs of clients join independently: P(both) ~ q^2
    both = (member[:, 0] & member[:, 1]).mean()
    assert abs(both - q * q) < 5 * np.sqrt(q * q / R)


def test_poisson_bound_is_the_binomial_tail():
    b, p = poisson_bound(1000, 0.05)
    assert p == pytest.approx(stats.binom.sf(b, 1000, 0.05), rel=1e-6)
    assert p <= 1e-12 < stats.binom.sf(b - 1, 1000, 0.05)
    assert poisson_bound_tail(1000, 0.05, 60) == pytest.approx(stats.binom.sf(60, 1000, 0.05),
                                                               rel=1e-6)


def test_epoch_sampling_takes_every_client_once_per_epoch():
    K, C = 23, 5                                      # 5 rounds per epoch, last one padded
    key = jax.random.key(4)
    draw = jax.jit(lambda r: epoch_cohort(key, r, K, C))
    for epoch in range(3):
        seen = []
        for r in range(epoch * 5, epoch * 5 + 5):
            index, mask = (np.asarray(a) for a in draw(r))
            seen += list(index[mask])
        assert sorted(seen) == list(range(K))
    first = [np.asarray(draw(r)[0]) for r in (0, 5)]
    assert not np.array_equal(first[0], first[1])       # a fresh order each epoch


@pytest.fixture(scope="module")
def population():
    pop = synthetic_logistic(num_clients=30, num_features=3, mean_examples=8, seed=2)
    return jax.device_put(pop.arrays())


def _fedavg(chunk):
    model = logistic_regression(3)
    return model, fedavg(model, client_optimizer=optax.sgd(0.3), server_optimizer=optax.sgd(1.0),
                         local_epochs=2, batch_size=4, weighting="uniform",
                         engine=EngineOptions(chunk_size=chunk, unroll=1))


@pytest.mark.parametrize("chunk", [None, 4])
def test_padded_poisson_round_equals_the_round_on_its_members(population, chunk):
    """Padding slots train nothing and weigh nothing: a Poisson round over the padded
    static cohort gives exactly the round over its real members."""
    model, alg = _fedavg(chunk)
    K, bound = 30, 20
    round_fn = jax.jit(build_round(alg, num_clients=K, clients_per_round=6,
                                   sampling=Sampling("poisson", bound)))
    state = alg.init(model.init(None))
    key = jax.random.key(9)
    new, metrics = round_fn(state, population, key)
    sample_key, train_key = jax.random.split(key)
    index, mask, count = poisson_cohort(sample_key, K, 6 / K, bound)
    members = np.asarray(index)[np.asarray(mask)]
    assert 0 < len(members) < bound and float(metrics["cohort_size"]) == len(members)
    assert float(metrics["sampling_overflow"]) == 0.0
    ref, _ = jax.jit(alg.apply)(state, make_cohort(population, jnp.asarray(members)), train_key)
    for k in ("w", "b"):
        np.testing.assert_allclose(np.asarray(new.params[k]), np.asarray(ref.params[k]),
                                   rtol=1e-6, atol=1e-7)


def test_poisson_overflow_is_flagged(population):
    model, alg = _fedavg(None)
    round_fn = jax.jit(build_round(alg, num_clients=30, clients_per_round=15,
                                   sampling=Sampling("poisson", 2)))
    _, metrics = round_fn(alg.init(model.init(None)), population, jax.random.key(0))
    assert float(metrics["sampling_overflow"]) == 1.0 and float(metrics["cohort_size"]) > 2


def test_scaffold_never_writes_padding_slots_back(population):
    """Padding slots hold row 0's index: scattering their (unchanged) rows back must not
    overwrite row 0's new control variate when row 0 is a member."""
    model = logistic_regression(3)
    alg = scaffold(model, num_clients=30, client_optimizer=optax.sgd(0.3),
                   server_optimizer=optax.sgd(1.0), local_epochs=1, batch_size=4,
                   engine=EngineOptions(chunk_size=None, unroll=1))
    state = alg.init(model.init(None))
    index = jnp.array([0, 5, 0, 0], jnp.int32)
    mask = jnp.array([True, True, False, False])
    new, _ = jax.jit(alg.apply)(state, make_cohort(population, index, mask), jax.random.key(1))
    ref, _ = jax.jit(alg.apply)(state, make_cohort(population, index[:2]), jax.random.key(1))
    for k in ("w", "b"):
        np.testing.assert_allclose(np.asarray(new.client_c[k]), np.asarray(ref.client_c[k]),
                                   rtol=1e-6, atol=1e-7)
        assert np.any(np.asarray(new.client_c[k])[0] != 0)
