"""Engine backends (shard_map, pmap, one device) and micro-cohorts give the same round.

* ``engine.backend``: the cohort split over 8 (or 4) virtual CPU devices by
  ``jax.shard_map`` or ``jax.pmap`` == the same round on one device, for FedAvg (the
  shard_map grad trap of PLATFORM.md would show), also in micro-cohorts, and FCF
  (recommenders use map_cohort too); cohorts not divisible by the device count (7 on 8,
  13 on 4) are padded with clients that add nothing. JAX fixes its device count at import, so these run in a
  subprocess (as tests/test_sharding.py does).
* ``engine.micro_cohort``: a running sum over micro-cohorts == the one-shot round, for
  mean and dp_gaussian (the same noise key) with FedAvg and FedProx; aggregators that
  need every update at once are a ConfigError naming the key.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms import fedavg, fedprox, scaffold
from fedjax_lite.core import EngineOptions, build_round, round_key
from fedjax_lite.core.aggregators import median, mean
from fedjax_lite.core.faults import Faults
from fedjax_lite.data import synthetic_logistic
from fedjax_lite.experiment.config import ConfigError, parse
from fedjax_lite.models import logistic_regression
from fedjax_lite.privacy.gaussian import dp_gaussian

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, numpy as np, jax, jax.numpy as jnp, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from fedjax_lite.data import synthetic_logistic
    from fedjax_lite.models import logistic_regression
    from fedjax_lite.models.mf import MatrixFactorization
    from fedjax_lite.algorithms import fedavg
    from fedjax_lite.algorithms.fcf import fcf
    from fedjax_lite.core import (EngineOptions, build_round, client_mesh, make_cohort,
                                  map_cohort, round_key)
    assert jax.device_count() == 8, jax.devices()
    out = {}

    def engines(devices, chunk):
        mesh = client_mesh(jax.devices()[:devices])
        return mesh, [("one", EngineOptions(chunk_size=chunk)),
                      ("shard_map", EngineOptions(chunk_size=chunk, mesh=mesh)),
                      ("pmap", EngineOptions(chunk_size=chunk, mesh=mesh, backend="pmap"))]

    def place(tree, engine, mesh):
        where = NamedSharding(mesh, P()) if engine.mesh is not None else jax.devices()[0]
        return jax.device_put(tree, where)

    # map_cohort alone: per-client outputs of a 13-client cohort on 4 devices (chunks of 2,
    # so 2 padding slots) and of a 7-client cohort on 8 devices (1 padding slot)
    pop = synthetic_logistic(num_clients=20, num_features=3, mean_examples=6, seed=1).arrays()
    chunk_fn = lambda x, y, n, s: (jnp.sum(x, (1, 2)) * n + s, n)
    for C, devices in [(13, 4), (7, 8)]:
        mesh, cases = engines(devices, 2)
        index = (jnp.arange(C) * 3) % 20
        for name, engine in cases:
            sums, n = jax.jit(lambda p: map_cohort(
                chunk_fn, make_cohort(p, index), (jnp.arange(C, dtype=jnp.float32),),
                engine))(place(pop, engine, mesh))
            out[f"map_{C}_{name}"] = np.asarray(sums).tolist() + np.asarray(n).tolist()

    # FedAvg rounds, a cohort of 7 on 8 devices; and pmap with micro-cohorts of 3 (three
    # micro-cohorts, the last one padded, each padded to the 8 devices)
    pop = synthetic_logistic(num_clients=23, num_features=4, mean_examples=7, seed=3)
    model = logistic_regression(4)
    mesh, cases = engines(8, 2)
    cases.append(("pmap_micro", EngineOptions(chunk_size=2, mesh=mesh, backend="pmap",
                                              micro_cohort=3)))
    for name, engine in cases:
        alg = fedavg(model, client_optimizer=optax.sgd(0.3, momentum=0.5),
                     server_optimizer=optax.sgd(1.0), local_epochs=1, batch_size=4,
                     engine=engine)
        round_fn = jax.jit(build_round(alg, num_clients=23, clients_per_round=7))
        data = place(pop.arrays(), engine, mesh)
        state = alg.init(model.init(jax.random.key(0)))
        losses = []
        for r in range(2):
            state, m = round_fn(state, data, round_key(jax.random.key(1), r))
            losses.append(float(m["train_loss"]))
        out[f"fedavg_{name}"] = (np.asarray(state.params["w"]).tolist()
                                 + [float(state.params["b"])] + losses)

    # FCF: sparse item updates and private user factors, 7 users of 20 on 8 devices
    rng = np.random.default_rng(0)
    U, I = 20, 12
    items = np.stack([rng.choice(I, 6, replace=False) for _ in range(U)])
    ratings = rng.integers(1, 6, size=items.shape).astype(np.float32)
    data = {"x": jnp.asarray(items, jnp.int32), "y": jnp.asarray(ratings),
            "n": jnp.asarray(rng.integers(2, 7, size=U), jnp.int32)}
    mf = MatrixFactorization(num_items=I, dim=2, l2=0.001)
    mesh, cases = engines(8, 2)
    for name, engine in cases:
        alg = fcf(mf, num_users=U, init_key=jax.random.key(1),
                  client_optimizer=optax.sgd(0.2), server_optimizer=optax.sgd(1.0),
                  local_epochs=2, batch_size=2, engine=engine)
        round_fn = jax.jit(build_round(alg, num_clients=U, clients_per_round=7))
        state = alg.init(mf.init_global(jax.random.key(2)))
        state, m = round_fn(state, place(data, engine, mesh), round_key(jax.random.key(3), 0))
        out[f"fcf_{name}"] = (np.asarray(state.params["item"]).ravel().tolist()
                              + np.asarray(state.private["user"]).ravel().tolist()
                              + [float(m["train_loss"])])
    print(json.dumps(out))
""")


class _MultiDevice:
    """SCRIPT in a subprocess with 8 virtual CPU devices, started at once and read when
    a test needs its results (so the in-process tests below run alongside it)."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        self.proc = subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = None

    def __getitem__(self, key):
        if self.out is None:
            stdout, stderr = self.proc.communicate(timeout=600)
            assert self.proc.returncode == 0, stderr[-3000:]
            self.out = {k: np.asarray(v) for k, v in
                        json.loads(stdout.strip().splitlines()[-1]).items()}
        return self.out[key]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module")
def multi_device():
    run = _MultiDevice()
    yield run
    run.close()


# ------------------------------------------------------------------- micro-cohorts

POP = synthetic_logistic(num_clients=24, num_features=4, mean_examples=8, size_sigma=0.8,
                         seed=5)
MODEL = logistic_regression(4)


def _rounds(build, engine, aggregator, faults=Faults(), rounds=2):
    alg = build(MODEL, client_optimizer=optax.sgd(0.3), server_optimizer=optax.sgd(1.0),
                local_epochs=2, batch_size=3, engine=engine, aggregator=aggregator,
                faults=faults)
    round_fn = jax.jit(build_round(alg, num_clients=24, clients_per_round=11))
    state = alg.init(MODEL.init(jax.random.key(0)))
    data = POP.arrays()
    metrics = []
    for r in range(rounds):
        state, m = round_fn(state, data, round_key(jax.random.key(7), r))
        metrics.append({k: float(v) for k, v in m.items()})
    return state, metrics


def _fedprox(model, **kw):
    return fedprox(model, mu=0.1, straggler_fraction=0.3, **kw)


@pytest.mark.usefixtures("multi_device")   # starts the subprocess: it runs alongside
@pytest.mark.parametrize("build,aggregator,faults", [
    (fedavg, mean(), Faults(dropout=0.3, attack="sign_flip", scale=2.0,
                            attackers=jnp.arange(24) % 5 == 0)),
    (_fedprox, dp_gaussian(0.05, 1.0, 11.0), Faults(dropout=0.2)),
], ids=["fedavg-mean-faults", "fedprox-dp_gaussian"])
def test_micro_cohorts_equal_the_one_shot_round(build, aggregator, faults):
    """11 clients in micro-cohorts of 4 (3 groups, the last padded) == all at once:
    parameters, the aggregator's state and every metric (the DP noise is the same draw)."""
    one, m_one = _rounds(build, EngineOptions(chunk_size=2), aggregator, faults)
    micro, m_micro = _rounds(build, EngineOptions(chunk_size=2, micro_cohort=4), aggregator,
                             faults)
    assert np.max(np.abs(np.asarray(one.params["w"]))) > 1e-2
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(micro)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    for r, (a, b) in enumerate(zip(m_one, m_micro)):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (r, k)


def test_micro_cohort_refusals_name_the_key():
    """Config: median (and the other whole-cohort aggregators, non-FedAvg algorithms,
    compression) + engine.micro_cohort is a ConfigError naming both; the engine raises
    ValueError for the same at build time."""
    base = {"engine": {"micro_cohort": 8}}
    assert parse(base).engine.micro_cohort == 8
    with pytest.raises(ConfigError, match=r"engine\.micro_cohort.*aggregator median"):
        parse({**base, "aggregator": {"name": "median"}})
    with pytest.raises(ConfigError, match=r"engine\.micro_cohort.*secure_mean"):
        parse({**base, "aggregator": {"name": "secure_mean"},
               "algorithm": {"weighting": "uniform"}})
    with pytest.raises(ConfigError, match=r"engine\.micro_cohort.*scaffold"):
        parse({**base, "algorithm": {"name": "scaffold"}})
    with pytest.raises(ConfigError, match=r"engine\.micro_cohort.*compression"):
        parse({**base, "compression": {"kind": "qsgd"}})
    with pytest.raises(ConfigError, match=r"engine\.micro_cohort"):
        parse({"engine": {"micro_cohort": 0}})
    with pytest.raises(ConfigError, match=r"engine\.backend"):
        parse({"engine": {"backend": "xmap"}})
    assert parse({"engine": {"backend": "pmap"}}).engine.backend == "pmap"
    engine = EngineOptions(micro_cohort=4)
    sgd = dict(client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0),
               local_epochs=1, batch_size=2, engine=engine)
    with pytest.raises(ValueError, match=r"engine\.micro_cohort.*every client's update"):
        fedavg(MODEL, aggregator=median(), **sgd)
    with pytest.raises(ValueError, match=r"engine\.micro_cohort.*scaffold"):
        scaffold(MODEL, num_clients=24, **sgd)


# ------------------------------------------------- backends (8-device subprocess)

@pytest.mark.parametrize("cohort", [13, 7])
def test_map_cohort_pads_non_divisible_cohorts_exactly(multi_device, cohort):
    """Per-client outputs (cohort order, padding dropped) are the one-device ones."""
    one = multi_device[f"map_{cohort}_one"]
    counts = synthetic_logistic(num_clients=20, num_features=3, mean_examples=6,
                                seed=1).n[(np.arange(cohort) * 3) % 20]
    np.testing.assert_array_equal(one[cohort:], counts)
    for backend in ("shard_map", "pmap"):
        np.testing.assert_allclose(multi_device[f"map_{cohort}_{backend}"], one,
                                   rtol=1e-6, atol=1e-6, err_msg=backend)


def test_fedavg_round_same_on_one_device_shard_map_and_pmap(multi_device):
    """7 clients on 8 devices (one padding slot), two rounds with momentum clients: the
    grad trap (grad w.r.t. the replicated model summed over devices) would show."""
    one = multi_device["fedavg_one"]
    assert np.max(np.abs(one[:4])) > 1e-2            # the model moved
    for name in ("shard_map", "pmap", "pmap_micro"):
        np.testing.assert_allclose(multi_device[f"fedavg_{name}"], one, rtol=1e-5,
                                   atol=1e-6, err_msg=name)


def test_fcf_round_same_on_one_device_shard_map_and_pmap(multi_device):
    one = multi_device["fcf_one"]
    for name in ("shard_map", "pmap"):
        np.testing.assert_allclose(multi_device[f"fcf_{name}"], one, rtol=1e-5, atol=1e-6,
                                   err_msg=name)
