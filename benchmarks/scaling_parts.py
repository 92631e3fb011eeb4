#!/usr/bin/env python
"""Scale-out measurements (issue 11), part two; run through ``benchmarks/scaling.py``.

Workload W throughout (``benchmarks/throughput.py``: 64 examples x 100 features per client,
binary logistic regression, 5 local epochs of batch 16, FedAvg).

- ``storage``: rounds of C clients with the population on the device vs kept on the
  host (``data.storage: host``: the cohort drawn on the device, gathered on the host and
  prefetched one round ahead), alternated round by round in one process; ratio =
  median over pairs of t_device / t_host (1.0 = the host path hides its gathering).
- ``devices``: clients/s of rounds of C clients sharded over 1, 2, 4, 8 (virtual) devices
  with the ``shard_map`` and ``pmap`` backends, one child process per setting (JAX fixes
  its device count at start), the settings run round-robin ``--repeats`` times.
- ``mmap``: a population of K clients written block by block into a prepared folder
  (``PreparedWriter``; never whole in memory), then ``fedjax-lite run`` with
  ``data: {kind: prepared}`` (mmap storage) in a child process: peak RSS of the run
  (``ru_maxrss`` of the child, page cache of the files not counted) against the
  population's size, and its round time.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _algorithm(mesh=None, backend="shard_map", population_sharded=False):
    import jax
    import optax
    from fedjax_lite.algorithms import fedavg
    from fedjax_lite.core import EngineOptions
    from fedjax_lite.models import logistic_regression
    model = logistic_regression(tp.DIM)
    alg = fedavg(model, client_optimizer=optax.sgd(tp.CLIENT_LR),
                 server_optimizer=optax.sgd(tp.SERVER_LR), local_epochs=tp.EPOCHS,
                 batch_size=tp.BATCH,
                 engine=EngineOptions(chunk_size=64, mesh=mesh, backend=backend,
                                      population_sharded=population_sharded))
    return alg, alg.init(model.init(jax.random.key(0)))


def storage_part(cohorts, rounds: int) -> list[dict]:
    import jax
    from fedjax_lite.core import Sampling, build_round, client_mesh, round_key
    from fedjax_lite.core.round import build_cohort_round
    from fedjax_lite.core.sampling import build_sampler
    from fedjax_lite.data import Population
    from fedjax_lite.experiment import distributed
    from fedjax_lite.experiment.storage import HostRounds
    out = []
    devices = jax.local_devices()
    mesh = client_mesh(devices) if len(devices) > 1 else None
    _, put, jit = distributed.placement(mesh)
    for C in cohorts:
        K = 4 * C
        x, y, n = tp.make_data(K)
        host = Population(x, y, n, tp.np.arange(K))
        pop = put({"x": x, "y": y, "n": n})
        alg, state0 = _algorithm(mesh)
        root = jax.random.key(1)
        dev_fn = jit(build_round(alg, num_clients=K, clients_per_round=C))
        hr = HostRounds(host, build_sampler(num_clients=K, clients_per_round=C,
                                            sampling=Sampling()), put, root, 10 ** 6, jit)
        hr.cohort_round = jit(build_cohort_round(alg, num_clients=K))
        states = {"device": state0, "host": state0}

        def device(st, r):
            return dev_fn(st, pop, round_key(root, r))

        for r in range(2):                                   # compile + warm up
            states["device"] = jax.block_until_ready(device(states["device"], r))[0]
            states["host"] = jax.block_until_ready(hr(states["host"], r))[0]
        pairs = []
        for r in range(2, rounds + 2):
            times = {}
            for name, fn in ((("device", device), ("host", hr)) if r % 2 == 0
                             else (("host", hr), ("device", device))):
                t = time.perf_counter()
                states[name] = jax.block_until_ready(fn(states[name], r))[0]
                times[name] = time.perf_counter() - t
            pairs.append(times)
        same = all(bool(tp.np.array_equal(a, b)) for a, b in zip(
            jax.tree.leaves(states["device"].params), jax.tree.leaves(states["host"].params)))
        ratio = [p["device"] / p["host"] for p in pairs]
        row = {"cohort": C, "population": K, "rounds": rounds,
               "device_clients_per_s": C / statistics.median(p["device"] for p in pairs),
               "host_clients_per_s": C / statistics.median(p["host"] for p in pairs),
               "host_vs_device_median": statistics.median(ratio),
               "host_vs_device_range": [min(ratio), max(ratio)],
               "identical_params": same}
        print(row, flush=True)
        out.append(row)
        hr.close()
    return out


def devices_child(count: int, backend: str, cohort: int, rounds: int) -> dict:
    """Runs in a fresh process with ``count`` virtual devices."""
    import jax
    from fedjax_lite.core import build_round, client_mesh, round_key
    from fedjax_lite.experiment import distributed
    devices = jax.local_devices()
    assert len(devices) == count, (len(devices), count)
    mesh = client_mesh(devices) if count > 1 else None
    _, put, jit = distributed.placement(mesh)
    x, y, n = tp.make_data(cohort)
    pop = put({"x": x, "y": y, "n": n})
    alg, state = _algorithm(mesh, backend)
    f = jit(build_round(alg, num_clients=cohort, clients_per_round=cohort))
    root = jax.random.key(1)
    for r in range(2):
        state = jax.block_until_ready(f(state, pop, round_key(root, r)))[0]
    times = []
    for r in range(2, rounds + 2):
        t = time.perf_counter()
        state = jax.block_until_ready(f(state, pop, round_key(root, r)))[0]
        times.append(time.perf_counter() - t)
    return {"devices": count, "backend": backend, "cohort": cohort,
            "round_s": statistics.median(times),
            "clients_per_s": cohort / statistics.median(times)}


def devices_part(counts, cohorts, rounds: int, repeats: int) -> list[dict]:
    runs: dict = {}
    for rep in range(repeats):
        for C in cohorts:
            for d in counts:
                for backend in (("shard_map", "pmap") if d > 1 else ("shard_map",)):
                    env = {**os.environ,
                           "XLA_FLAGS": f"--xla_force_host_platform_device_count={d}"}
                    res = subprocess.run(
                        [sys.executable, __file__, "devices-child", str(d), backend, str(C),
                         str(rounds)], env=env, capture_output=True, text=True, cwd=REPO)
                    if res.returncode:
                        raise RuntimeError(res.stderr[-2000:])
                    row = json.loads(res.stdout.strip().splitlines()[-1])
                    print(row, flush=True)
                    runs.setdefault((C, d, backend), []).append(row["clients_per_s"])
    return [{"cohort": C, "devices": d, "backend": b, "clients_per_s": statistics.median(v),
             "repeats": v} for (C, d, b), v in sorted(runs.items())]


def layout_child(layout: str, cohort: int, rounds: int) -> dict:
    """One process: rounds of ``cohort`` clients (population = cohort) with the
    population replicated on every device or sharded over them; its own peak RSS."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    from fedjax_lite.core import build_round, client_mesh, round_key
    from fedjax_lite.data import Population
    from fedjax_lite.experiment.storage import put_sharded
    mesh = client_mesh(jax.local_devices())
    x, y, n = tp.make_data(cohort)
    if layout == "sharded":
        pop = put_sharded(Population(x, y, n, tp.np.arange(cohort)), mesh)
    else:
        pop = jax.device_put({"x": x, "y": y, "n": n}, NamedSharding(mesh, PartitionSpec()))
    del x, y, n
    alg, state = _algorithm(mesh, population_sharded=layout == "sharded")
    f = jax.jit(build_round(alg, num_clients=cohort, clients_per_round=cohort))
    root = jax.random.key(1)
    times = []
    for r in range(rounds + 2):     # two untimed: compiling, and the state's placement
        t = time.perf_counter()
        state = jax.block_until_ready(f(state, pop, round_key(root, r)))[0]
        times.append(time.perf_counter() - t)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status")
               if line.startswith("VmHWM"))
    return {"layout": layout, "cohort": cohort, "devices": len(jax.local_devices()),
            "round_s": statistics.median(times[2:]), "peak_rss_bytes": hwm * 1024,
            "population_bytes": cohort * (tp.N_EX * tp.DIM * 4 + tp.N_EX * 4 + 4)}


def layout_part(cohorts, rounds: int) -> list[dict]:
    out = []
    for C in cohorts:
        for layout in ("replicated", "sharded"):
            res = subprocess.run([sys.executable, __file__, "layout-child", layout, str(C),
                                  str(rounds)], capture_output=True, text=True, cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
            if res.returncode:
                raise RuntimeError(res.stderr[-2000:])
            row = json.loads(res.stdout.strip().splitlines()[-1])
            print(row, flush=True)
            out.append(row)
    return out


def write_population(folder: str, num_clients: int, test_clients: int,
                     block: int = 20000) -> float:
    """A workload-W population of ``num_clients`` clients (plus ``test_clients`` test
    clients) written block by block; returns the seconds it took."""
    import numpy as np
    from fedjax_lite.data import prepared as prep
    t = time.perf_counter()
    teacher = (np.random.default_rng(7).standard_normal(tp.DIM, dtype=np.float32)
               / np.float32(np.sqrt(tp.DIM) / 2))
    for split, K in (("train", num_clients), ("test", test_clients)):
        w = prep.PreparedWriter(folder, split, K, tp.N_EX, (tp.DIM,))
        for s in range(0, K, block):
            b = min(block, K - s)
            # one teacher for every block (make_data's own draw for seed 0), fresh
            # features and shifts per block
            x, y, n = tp.make_data(b, seed=s + 1 + (0 if split == "train" else 10 ** 9),
                                   teacher=teacher)
            w.write(s, x, y, n, np.arange(s, s + b))
        w.close()
    prep.write_meta(folder, {"workload": "W", "num_clients": num_clients})
    return time.perf_counter() - t


def mmap_part(sizes, cohort: int, rounds: int, folder_root: str) -> list[dict]:
    import shutil
    import yaml
    out = []
    for K in sizes:
        folder = os.path.join(folder_root, f"W_{K}")
        shutil.rmtree(folder, ignore_errors=True)
        write_s = write_population(folder, K, min(K, 2000))
        cfg = {"rounds": rounds, "eval_every": rounds, "checkpoint_every": 0,
               "data": {"kind": "prepared", "path": folder, "storage": "mmap"},
               "model": {"kind": "logistic_regression"},
               "algorithm": {"name": "fedavg", "clients_per_round": min(cohort, K),
                             "local_epochs": tp.EPOCHS, "batch_size": tp.BATCH,
                             "client_optimizer": {"name": "sgd", "learning_rate": 0.1}}}
        cfg_path = os.path.join(folder_root, f"W_{K}.yaml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(cfg, f)
        run_dir = os.path.join(folder_root, f"run_{K}")
        shutil.rmtree(run_dir, ignore_errors=True)
        t = time.perf_counter()
        res = subprocess.run([sys.executable, __file__, "mmap-child", cfg_path, run_dir],
                             capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t
        if res.returncode:
            raise RuntimeError(res.stderr[-2000:])
        peak = json.loads(res.stdout.strip().splitlines()[-1])["maxrss_kb"]
        summary = json.loads(Path(run_dir, "summary.json").read_text())
        size = (K * tp.N_EX * tp.DIM * 4 + K * tp.N_EX * 4 + K * 4)
        row = {"population": K, "cohort": min(cohort, K), "rounds": rounds,
               "population_bytes": size, "write_s": write_s,
               "peak_rss_bytes": peak * 1024,
               "round_s": summary["train_s"] / rounds,
               "clients_per_s": summary["clients_per_s"], "run_wall_s": wall,
               "storage": summary.get("storage"),
               "eval_accuracy": summary["final"].get("eval_accuracy")}
        print(row, flush=True)
        out.append(row)
        shutil.rmtree(folder, ignore_errors=True)
    return out


def mmap_child(cfg_path: str, run_dir: str) -> None:
    """``fedjax-lite run`` in this process, then its peak resident memory."""
    sys.path.insert(0, str(REPO))
    from fedjax_lite.experiment.cli import main
    code = main(["run", cfg_path, "--out", run_dir, "--no-progress"])
    if code:
        raise SystemExit(code)
    # VmHWM: this process's own peak (ru_maxrss would keep the peak of the process it
    # was forked from, across exec)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status")
               if line.startswith("VmHWM"))
    print(json.dumps({"maxrss_kb": hwm}))


if __name__ == "__main__":
    if sys.argv[1] == "mmap-child":
        mmap_child(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "layout-child":
        sys.path.insert(0, str(REPO))
        from fedjax_lite.experiment.host import configure_host
        configure_host()
        print(json.dumps(layout_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    elif sys.argv[1] == "devices-child":
        sys.path.insert(0, str(REPO))
        d, backend, C, rounds = int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), \
            int(sys.argv[5])
        print(json.dumps(devices_child(d, backend, C, rounds)))
