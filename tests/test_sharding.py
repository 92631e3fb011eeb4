"""The cohort sharded over devices (jax.shard_map) == the same round on one device.

JAX fixes its device count at import, so the comparison runs in a subprocess that
exposes 4 virtual CPU devices. PLATFORM.md's trap: inside shard_map, grad w.r.t. a
replicated argument can come back summed over devices; a stateful client optimizer
(Adam) and a cohort size not divisible by the device count are used on purpose.
"""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, numpy as np, jax, jax.numpy as jnp, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from fedjax_lite.data import synthetic_logistic, split_examples
    from fedjax_lite.models import logistic_regression
    from fedjax_lite.algorithms import fedavg
    from fedjax_lite.core import EngineOptions, build_evaluate, build_round, client_mesh, round_key
    assert jax.device_count() == 4, jax.devices()
    train, test = split_examples(synthetic_logistic(num_clients=23, num_features=6,
                                                    mean_examples=9, seed=3),
                                 0.3, np.random.default_rng(0))
    model = logistic_regression(6)
    mesh = client_mesh()
    out = {}
    for name, engine in [("one", EngineOptions(chunk_size=2)),
                         ("sharded", EngineOptions(chunk_size=2, mesh=mesh))]:
        alg = fedavg(model, client_optimizer=optax.adam(0.05), server_optimizer=optax.sgd(1.0),
                     local_epochs=2, batch_size=4, engine=engine)
        where = NamedSharding(mesh, P()) if engine.mesh is not None else jax.devices()[0]
        pop = jax.device_put(train.arrays(), where)
        tst = jax.device_put(test.arrays(), where)
        round_fn = jax.jit(build_round(alg, num_clients=23, clients_per_round=10))
        state = alg.init(model.init(jax.random.key(0)))
        losses = []
        for r in range(3):
            state, m = round_fn(state, pop, round_key(jax.random.key(1), r))
            losses.append(float(m["train_loss"]))
        ev = jax.jit(build_evaluate(model, engine))(state.params, tst)
        out[name] = {"w": np.asarray(state.params["w"]).tolist(),
                     "b": float(state.params["b"]), "losses": losses,
                     "eval": {k: float(v) for k, v in ev.items()}}
    print(json.dumps(out))
""")


def test_sharded_round_equals_single_device():
    env = {**os.environ, "PYTHONPATH": ROOT,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, sharded = out["one"], out["sharded"]
    assert max(abs(a - b) for a, b in zip(one["w"], sharded["w"])) < 1e-6
    assert abs(one["b"] - sharded["b"]) < 1e-6
    assert max(abs(a - b) for a, b in zip(one["losses"], sharded["losses"])) < 1e-6
    for k, v in one["eval"].items():
        assert abs(v - sharded["eval"][k]) < 1e-6, k
    # the model actually moved (the comparison is not between two untouched models)
    assert max(abs(a) for a in one["w"]) > 1e-2
