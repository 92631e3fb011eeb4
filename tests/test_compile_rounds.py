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
