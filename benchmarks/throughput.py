#!/usr/bin/env python
"""Throughput of one FedAvg round (workload W) for four implementations.

Workload W: C clients x 64 examples x 100 float32 features, binary logistic regression
(zero init, sigmoid cross-entropy, loss = mean over the batch), 5 local epochs of batch 16
(4 steps/epoch, 20 SGD steps per client, client lr 0.1), a fresh random shuffle of each
client's examples every epoch, example-weighted mean of the client deltas, server SGD with
lr 1 (FedAvg).

Implementations:
  engine          fedjax_lite's jitted round (public API only: fedavg + build_round)
  per_client_jit  Python loop over clients; one jitted call = one client's 5 epochs
                  (jax.random.permutation per epoch, 20 steps in lax.scan)
  per_step_jit    FedJAX-style (its for_each_client jit backend): Python loop over
                  clients and steps, one jitted call per step; host-side NumPy shuffle
                  and batching per epoch
  numpy_batched   NumPy, all clients at once in matmul (einsum) form, per-epoch
                  per-client shuffle with rng.permuted
  reference_kernel  a hardware yardstick, NOT a valid implementation of W: the fastest
                  recipe in ../shared/PLATFORM.md (which measured it at 155,267 clients/s
                  on one core and 250,931 on two at C=10000, on a machine doing ~450
                  GFLOP/s on a 4096^2 matmul): contiguous batches of pre-shuffled data
                  (no per-epoch reshuffle), steps-major layout, chunks of <= 16 clients in
                  lax.map, step scan unrolled 4x, hand-written gradient, no optimizer
                  state, cohort sharded over every device. Running it on the machine at
                  hand says how far that machine is from the one behind PLATFORM.md's
                  numbers.

Throughput = clients / median wall time of one round (training + aggregation + server
step; no compile, no evaluation). Every (implementation, C) runs in its own subprocess
(``--one IMPL C``) so that its peak RSS (ru_maxrss) can be reported.

    python benchmarks/throughput.py                    # full run (~5-10 min on 2 cores)
    python benchmarks/throughput.py --check            # correctness cross-check, tiny case
    python benchmarks/throughput.py --sizes 100,1000 --impls engine,numpy_batched
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# ---- workload W ----------------------------------------------------------------------
N_EX = 64          # examples per client
DIM = 100          # features
EPOCHS = 5
BATCH = 16
STEPS = N_EX // BATCH  # steps per epoch
CLIENT_LR = 0.1
SERVER_LR = 1.0
DATA_SEED = 0

IMPLS = ("engine", "per_client_jit", "per_step_jit", "numpy_batched", "reference_kernel")
# Python-loop baselines are linear in C; above this many clients only the first
# LOOP_CAP clients are trained per timed round (clients/s is reported, see clients_timed).
DEFAULT_LOOP_CAP = {"per_client_jit": 10000, "per_step_jit": 1000}

REPO = Path(__file__).resolve().parents[1]


def make_data(C: int, seed: int = DATA_SEED, teacher: np.ndarray | None = None):
    """x float32[C,64,100] ~ N(0,1), y int32[C,64] from a shared noisy linear teacher
    with a per-client shift (mild heterogeneity), n int32[C] = 64. ``teacher``: use this
    w instead of the seed's own draw (blocks of one population)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((C, N_EX, DIM), dtype=np.float32)
    w_true = (rng.standard_normal(DIM, dtype=np.float32) / np.float32(np.sqrt(DIM) / 2))
    if teacher is not None:
        w_true = teacher
    shift = rng.standard_normal((C, 1), dtype=np.float32) * np.float32(0.5)
    logits = x @ w_true + shift + rng.standard_normal((C, N_EX), dtype=np.float32) * 0.5
    y = (logits > 0).astype(np.int32)
    n = np.full((C,), N_EX, np.int32)
    return x, y, n


def zero_params():
    return {"w": np.zeros((DIM,), np.float32), "b": np.zeros((), np.float32)}


def np_loss(params, x, y) -> float:
    """Mean sigmoid cross-entropy over every example of every client (float64)."""
    z = x.astype(np.float64) @ np.asarray(params["w"], np.float64) + float(params["b"])
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


# ---- baselines 2 and 3: JAX, Python loops --------------------------------------------
def _jax_parts():
    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax

    def loss(params, xb, yb):
        z = xb @ params["w"] + params["b"]
        return jnp.mean(optax.sigmoid_binary_cross_entropy(z, yb.astype(z.dtype)))

    def sgd_step(params, xb, yb):
        g = jax.grad(loss)(params, xb, yb)
        return jax.tree.map(lambda p, gp: p - CLIENT_LR * gp, params, g)

    def train_with_perms(params, x, y, perms):
        """One client's 5 epochs; perms int[E, 64] are the epochs' example orders."""
        xb = x[perms].reshape(EPOCHS * STEPS, BATCH, DIM)
        yb = y[perms].reshape(EPOCHS * STEPS, BATCH)
        out, _ = lax.scan(lambda p, b: (sgd_step(p, *b), None), params, (xb, yb))
        return jax.tree.map(jnp.subtract, out, params)  # delta

    def client_perms(key):
        return jax.vmap(lambda k: jax.random.permutation(k, N_EX))(
            jax.random.split(key, EPOCHS))

    # The loops accumulate sum_k n_k * delta_k inside the per-client jitted call (no
    # stacking of C small arrays afterwards: jitting a function of a C-long list of
    # deltas recompiles a C-input program, minutes at C = 10000).
    def accumulate(acc, delta, n_k):
        return jax.tree.map(lambda a, d: a + n_k.astype(d.dtype) * d, acc, delta)

    @jax.jit
    def client_keyed(params, acc, x, y, n_k, round_key, k):
        perms = client_perms(jax.random.fold_in(round_key, k))
        return accumulate(acc, train_with_perms(params, x, y, perms), n_k)

    @jax.jit
    def client_perm(params, acc, x, y, n_k, perms):
        return accumulate(acc, train_with_perms(params, x, y, perms), n_k)

    @jax.jit
    def client_final(params, acc, final, n_k):      # FedJAX's client_final
        return accumulate(acc, jax.tree.map(jnp.subtract, final, params), n_k)

    @jax.jit
    def server(params, acc, total_n):
        delta = jax.tree.map(lambda a: a / total_n.astype(a.dtype), acc)
        # server SGD on the pseudo-gradient -delta
        return jax.tree.map(lambda p, d: p - SERVER_LR * (-d), params, delta)

    return dict(jax=jax, client_keyed=client_keyed, client_perm=client_perm,
                step=jax.jit(sgd_step), client_final=client_final, server=server)


def per_client_jit_round(parts, params, x, y, n, round_key, perms=None):
    """Python loop over clients, one jitted call per client's whole local training."""
    C = x.shape[0]
    acc = parts["jax"].tree.map(lambda p: p * 0, params)
    for k in range(C):
        if perms is None:
            acc = parts["client_keyed"](params, acc, x[k], y[k], n[k], round_key, np.int32(k))
        else:
            acc = parts["client_perm"](params, acc, x[k], y[k], n[k], perms[k])
    return parts["server"](params, acc, n.sum())


def per_step_jit_round(parts, params, x, y, n, rng, perms=None):
    """FedJAX for_each_client-style: host shuffle + batching, one jitted call per step."""
    step = parts["step"]
    C = x.shape[0]
    acc = parts["jax"].tree.map(lambda p: p * 0, params)
    for k in range(C):
        p = params
        xk, yk = x[k], y[k]
        for e in range(EPOCHS):
            perm = rng.permutation(N_EX) if perms is None else perms[k, e]
            xs, ys = xk[perm], yk[perm]
            for s in range(STEPS):
                p = step(p, xs[s * BATCH:(s + 1) * BATCH], ys[s * BATCH:(s + 1) * BATCH])
        acc = parts["client_final"](params, acc, p, n[k])
    return parts["server"](params, acc, n.sum())


# ---- baseline 4: NumPy batched over clients -------------------------------------------
def numpy_batched_round(params, x, y, n, rng, perms=None, dtype=np.float32,
                        batch=BATCH):
    C = x.shape[0]
    lr = dtype(CLIENT_LR)
    w0 = np.asarray(params["w"], dtype)
    b0 = dtype(params["b"])
    W = np.repeat(w0[None], C, axis=0)                     # [C, D]
    b = np.full((C,), b0, dtype)                           # [C]
    flat = (np.arange(C) * N_EX)[:, None]                 # row offset of each client
    xf = x.reshape(C * N_EX, *x.shape[2:])
    base = np.broadcast_to(np.arange(N_EX), (C, N_EX))
    for e in range(EPOCHS):
        idx = rng.permuted(base, axis=1) if perms is None else perms[:, e]
        # one flat row gather (a copy, [C, 64, D]); np.take on a flat index is ~2.5x
        # faster than x[rows, idx] and ~10x faster than take_along_axis here
        xs = np.take(xf, flat + idx, axis=0)
        ys = np.take(y.reshape(-1), flat + idx).astype(dtype)
        if xs.dtype != dtype:
            xs = xs.astype(dtype)
        for s in range(N_EX // batch):
            xb = xs[:, s * batch:(s + 1) * batch]          # [C, B, D]
            yb = ys[:, s * batch:(s + 1) * batch]
            # batched matmuls over the client axis (= einsum "cbf,cf->cb" and
            # "cb,cbf->cf"; np.matmul dispatches to BLAS, ~2x faster than np.einsum)
            z = np.matmul(xb, W[:, :, None])[..., 0] + b[:, None]
            p = dtype(0.5) * (dtype(1) + np.tanh(dtype(0.5) * z))   # stable sigmoid
            g = (p - yb) * dtype(1.0 / batch)              # d mean-loss / d z
            W -= lr * np.matmul(g[:, None, :], xb)[:, 0]
            b -= lr * g.sum(axis=1)
    wts = (n / n.sum()).astype(dtype)
    dw = wts @ (W - w0)
    db = wts @ (b - b0)
    return {"w": (w0 + dtype(SERVER_LR) * dw).astype(dtype),
            "b": np.asarray(b0 + dtype(SERVER_LR) * db, dtype)}


# ---- reference kernel (yardstick) ----------------------------------------------------
REF_CHUNK = 16


def reference_kernel(C: int):
    """``(round_fn, layout)``: ``layout(x, y, n)`` puts the data steps-major and padded
    ([S, C', B, D], shards of whole chunks; padding clients have weight 0);
    ``round_fn(params, xs, ys, wts) -> params`` is one FedAvg round on it with the epochs'
    example order fixed (batches are contiguous slices of the stored order)."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = jax.local_devices()
    shards = len(devices)
    per_shard = -(-C // shards)
    chunks = -(-per_shard // REF_CHUNK)
    K = -(-per_shard // chunks)
    padded = shards * chunks * K
    mesh = Mesh(np.array(devices), ("clients",))

    def layout(x, y, n):
        pad = padded - C
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
        y = np.concatenate([y, np.zeros((pad,) + y.shape[1:], y.dtype)]).astype(np.float32)
        wts = np.concatenate([n, np.zeros(pad, n.dtype)]).astype(np.float32)
        xs = x.reshape(padded, STEPS, BATCH, DIM).transpose(1, 0, 2, 3)
        ys = y.reshape(padded, STEPS, BATCH).transpose(1, 0, 2)
        put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
        return (put(np.ascontiguousarray(xs), P(None, "clients")),
                put(np.ascontiguousarray(ys), P(None, "clients")), put(wts, P("clients")))

    def shard(w0, b0, xs, ys, wts):
        def one(c):
            xc = lax.dynamic_slice_in_dim(xs, c * K, K, axis=1)       # [S, K, B, D]
            yc = lax.dynamic_slice_in_dim(ys, c * K, K, axis=1)
            wc = lax.dynamic_slice_in_dim(wts, c * K, K)

            def step(carry, s):
                w, b = carry
                xb, yb = xc[s % STEPS], yc[s % STEPS]
                z = jnp.einsum("kbd,kd->kb", xb, w) + b[:, None]
                r = (jax.nn.sigmoid(z) - yb) / BATCH
                return (w - CLIENT_LR * jnp.einsum("kbd,kb->kd", xb, r),
                        b - CLIENT_LR * r.sum(1)), None

            w = jnp.broadcast_to(w0, (K, DIM))
            b = jnp.broadcast_to(b0, (K,))
            (w, b), _ = lax.scan(step, (w, b), jnp.arange(EPOCHS * STEPS), unroll=4)
            return wc @ (w - w0), wc @ (b - b0)

        dw, db = lax.map(one, jnp.arange(chunks))
        tot = lax.psum(jnp.sum(wts), "clients")
        return (lax.psum(dw.sum(0), "clients") / tot, lax.psum(db.sum(0), "clients") / tot)

    sharded = jax.shard_map(shard, mesh=mesh,
                            in_specs=(P(), P(), P(None, "clients"), P(None, "clients"),
                                      P("clients")),
                            out_specs=(P(), P()), check_vma=False)

    @jax.jit
    def round_fn(params, xs, ys, wts):
        dw, db = sharded(params["w"], params["b"], xs, ys, wts)
        return {"w": params["w"] + SERVER_LR * dw, "b": params["b"] + SERVER_LR * db}

    return round_fn, layout


# ---- engine ---------------------------------------------------------------------------
def engine_options(args):
    import jax
    from fedjax_lite.core import EngineOptions, client_mesh
    kw = {}
    devices = jax.local_devices()[:args.devices] if args.devices else jax.local_devices()
    if len(devices) > 1:
        kw["mesh"] = client_mesh(devices)
    if args.chunk_size is not None:
        kw["chunk_size"] = None if args.chunk_size.lower() == "none" else int(args.chunk_size)
    if args.unroll is not None:
        kw["unroll"] = args.unroll
    return EngineOptions(**kw)


def build_engine(C, opts, batch_size=BATCH):
    import jax
    import optax
    from fedjax_lite.algorithms import fedavg
    from fedjax_lite.core import build_round
    from fedjax_lite.models import logistic_regression

    model = logistic_regression(DIM)
    alg = fedavg(model, client_optimizer=optax.sgd(CLIENT_LR),
                 server_optimizer=optax.sgd(SERVER_LR), local_epochs=EPOCHS,
                 batch_size=batch_size, engine=opts)
    round_fn = jax.jit(build_round(alg, num_clients=C, clients_per_round=C))
    state = alg.init(model.init(jax.random.key(0)))
    return round_fn, state


# ---- one (implementation, C) measurement, in its own process --------------------------
def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_pressure() -> str | None:
    """/proc/pressure/cpu 'some' line: other processes competing for the 2 cores."""
    try:
        return open("/proc/pressure/cpu").readline().strip()
    except OSError:
        return None


def time_rounds(one_round, warmup: int, repeats: int, info: dict) -> list[float]:
    """Wall times of ``one_round(r)`` (which must block until its result is ready) for
    r >= warmup; the first call's time goes to ``info["first_call_s"]``."""
    times = []
    for r in range(warmup + repeats):
        t0 = time.perf_counter()
        one_round(r)
        dt = time.perf_counter() - t0
        if r == 0:
            info["first_call_s"] = dt
        if r >= warmup:
            times.append(dt)
    return times


def run_one(impl: str, C: int, args) -> dict:
    import jax
    repeats, warmup = args.repeats, args.warmup
    x, y, n = make_data(C)
    cap = {"per_client_jit": args.per_client_cap, "per_step_jit": args.per_step_cap}.get(impl)
    timed = min(C, cap) if cap else C
    info: dict = {"impl": impl, "C": C, "clients_timed": timed,
                  "loadavg_start": os.getloadavg()}

    if impl == "engine":
        from jax.sharding import NamedSharding, PartitionSpec
        opts = engine_options(args)
        info["engine_options"] = {**opts._asdict(), "mesh": None if opts.mesh is None
                                  else [str(d) for d in opts.mesh.devices]}
        round_fn, state = build_engine(C, opts)
        where = (NamedSharding(opts.mesh, PartitionSpec()) if opts.mesh is not None
                 else jax.local_devices()[0])
        population = jax.device_put({"x": x, "y": y, "n": n}, where)
        jax.block_until_ready(population)
        del x  # the device copy is the only one the engine needs
        gc.collect()
        root = jax.random.key(1)
        info["setup_peak_rss_mb"] = rss_mb()
        carry = {"state": state}

        def one_round(r):
            carry["state"], carry["metrics"] = round_fn(carry["state"], population,
                                                        jax.random.fold_in(root, r))
            jax.block_until_ready(carry["state"])

        times = time_rounds(one_round, warmup, repeats, info)
        info["final_train_loss"] = float(carry["metrics"]["train_loss"])
    elif impl in ("per_client_jit", "per_step_jit"):
        parts = _jax_parts()
        params = jax.device_put(zero_params())
        xs, ys, ns = x[:timed], y[:timed], n[:timed]
        root = jax.random.key(1)
        rng = np.random.default_rng(1)
        info["setup_peak_rss_mb"] = rss_mb()
        carry = {"params": params}

        def one_round(r):
            if impl == "per_client_jit":
                carry["params"] = per_client_jit_round(parts, carry["params"], xs, ys, ns,
                                                       jax.random.fold_in(root, r))
            else:
                carry["params"] = per_step_jit_round(parts, carry["params"], xs, ys, ns, rng)
            jax.block_until_ready(carry["params"])

        times = time_rounds(one_round, warmup, repeats, info)
    elif impl == "numpy_batched":
        params = zero_params()
        rng = np.random.default_rng(1)
        info["setup_peak_rss_mb"] = rss_mb()
        carry = {"params": params}

        def one_round(r):
            carry["params"] = numpy_batched_round(carry["params"], x, y, n, rng)

        times = time_rounds(one_round, warmup, repeats, info)
    elif impl == "reference_kernel":
        round_fn, layout = reference_kernel(C)
        xs, ys, wts = layout(x, y, n)
        del x
        gc.collect()
        params = jax.device_put(zero_params())
        info["setup_peak_rss_mb"] = rss_mb()
        carry = {"params": params}

        def one_round(r):
            carry["params"] = round_fn(carry["params"], xs, ys, wts)
            jax.block_until_ready(carry["params"])

        times = time_rounds(one_round, warmup, repeats, info)
    else:
        raise SystemExit(f"unknown implementation {impl!r}; choose from {IMPLS}")

    med = statistics.median(times)
    info.update(
        times_s=times, median_s=med, min_s=min(times),
        clients_per_s=timed / med, clients_per_s_best=timed / min(times),
        round_s_extrapolated=C * med / timed,
        peak_rss_mb=rss_mb(), loadavg_end=os.getloadavg(), cpu_pressure=cpu_pressure(),
    )
    return info


# ---- correctness check ------------------------------------------------------------------
def check(args) -> None:
    import jax
    C, R = 8, 3
    x, y, n = make_data(C, seed=123)
    rng = np.random.default_rng(7)
    perms = np.stack([np.stack([rng.permutation(N_EX) for _ in range(EPOCHS)])
                      for _ in range(C)]).astype(np.int32)           # [C, E, 64]
    parts = _jax_parts()
    p2 = p3 = jax.device_put(zero_params())
    p4 = zero_params()
    p64 = {k: v.astype(np.float64) for k, v in zero_params().items()}
    dummy = np.random.default_rng(0)
    ok = True

    def close(name, a, b, rtol=1e-4, atol=1e-5):
        nonlocal ok
        err = max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))))
                  for k in ("w", "b"))
        good = all(np.allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=rtol, atol=atol)
                   for k in ("w", "b"))
        print(f"  {'ok ' if good else 'BAD'} {name}: max |diff| = {err:.2e}")
        ok &= good

    print(f"check: C={C}, {R} rounds, identical per-epoch permutations for the baselines")
    for r in range(R):
        p2 = per_client_jit_round(parts, p2, x, y, n, None, perms=perms)
        p3 = per_step_jit_round(parts, p3, x, y, n, dummy, perms=perms)
        p4 = numpy_batched_round(p4, x, y, n, dummy, perms=perms)
        p64 = numpy_batched_round(p64, x, y, n, dummy, perms=perms, dtype=np.float64)
        close(f"round {r}: per_client_jit vs numpy_batched", p2, p4)
        close(f"round {r}: per_step_jit   vs numpy_batched", p3, p4)
        close(f"round {r}: numpy float32  vs numpy float64", p4, p64)
    base_loss = np_loss(p4, x, y)
    print(f"  baselines' loss after {R} rounds: {base_loss:.6f} "
          f"(initial {np_loss(zero_params(), x, y):.6f})")

    # Engine, shuffle-free variant: batch = all 64 examples => 1 step/epoch, the order of
    # the examples cannot matter, so the engine must match the baselines to rounding.
    opts = engine_options(args)
    root = jax.random.key(1)
    pop = jax.device_put({"x": x, "y": y, "n": n})
    fn, st = build_engine(C, opts, batch_size=N_EX)
    q = zero_params()
    for r in range(R):
        st, _ = fn(st, pop, jax.random.fold_in(root, r))
        q = numpy_batched_round(q, x, y, n, dummy, perms=np.zeros((C, EPOCHS, N_EX), np.int64)
                                + np.arange(N_EX), dtype=np.float64, batch=N_EX)
    close(f"engine (batch 64, {R} rounds) vs numpy float64", st.params, q)

    # Engine with W's batch 16: its own shuffles, so compare the model's loss.
    fn, st = build_engine(C, opts)
    for r in range(R):
        st, m = fn(st, pop, jax.random.fold_in(root, r))
    eng_loss = np_loss(st.params, x, y)
    rel = abs(eng_loss - base_loss) / base_loss
    good = rel < 0.02
    ok &= good
    print(f"  {'ok ' if good else 'BAD'} engine (batch 16) loss after {R} rounds: "
          f"{eng_loss:.6f} vs baselines {base_loss:.6f} (rel diff {rel:.2%}, tol 2%)")
    wdiff = np.asarray(st.params["w"]) - p4["w"]
    print(f"      |w_engine - w_baseline| / |w_baseline| = "
          f"{np.linalg.norm(wdiff) / np.linalg.norm(p4['w']):.3f} (different shuffles)")

    # Reference kernel: FedAvg with every epoch in stored order (no reshuffle).
    ident = np.zeros((C, EPOCHS, N_EX), np.int64) + np.arange(N_EX)
    kfn, layout = reference_kernel(C)
    xs, ys, wts = layout(x, y, n)
    pk, q = jax.device_put(zero_params()), zero_params()
    for r in range(R):
        pk = kfn(pk, xs, ys, wts)
        q = numpy_batched_round(q, x, y, n, dummy, perms=ident, dtype=np.float64)
    close(f"reference_kernel ({R} rounds, stored order) vs numpy float64", pk, q)

    # Engine: chunking is a speed knob only -> whole-cohort (chunk None) == chunked.
    from fedjax_lite.core import EngineOptions
    fa, sa = build_engine(C, EngineOptions(chunk_size=None, unroll=1))
    fb, sb = build_engine(C, EngineOptions(chunk_size=3, unroll=4))
    for r in range(R):
        sa, _ = fa(sa, pop, jax.random.fold_in(root, r))
        sb, _ = fb(sb, pop, jax.random.fold_in(root, r))
    close("engine chunk None/unroll 1 vs chunk 3/unroll 4", sa.params, sb.params)
    print("check:", "PASSED" if ok else "FAILED")
    if not ok:
        raise SystemExit(1)


# ---- driver -----------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def source_state() -> dict:
    """git HEAD, whether fedjax_lite/ has uncommitted changes and a hash of its sources
    (no JAX import: the reproductions record it before and after they run)."""
    h = hashlib.sha256()
    for f in sorted((REPO / "fedjax_lite").rglob("*.py")):
        h.update(f.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                     "fedjax_lite"], capture_output=True, text=True).stdout)
    except OSError:
        commit, dirty = "", None
    return {"git_commit": commit, "fedjax_lite_dirty": dirty,
            "fedjax_lite_source_sha256": h.hexdigest()[:16]}


def machine_info() -> dict:
    import jax
    import optax
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)), "memory_gib": mem,
        "python": platform.python_version(), "numpy": np.__version__,
        "jax": jax.__version__, "optax": optax.__version__,
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **source_state(),
        "matmul_gflops": matmul_gflops(),
    }


def matmul_gflops(size: int = 4096, repeats: int = 5) -> float:
    """Best-of-``repeats`` float32 ``size``x``size`` jnp matmul rate of this process: a
    yardstick for comparing runs on different machines (../shared/PLATFORM.md measured
    ~450 GFLOP/s with 4096^2 on the machine behind its numbers)."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda m: m @ m)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return round(2 * size ** 3 / best / 1e9, 1)


def run_child(argv: list[str]) -> tuple[dict | None, str]:
    """Runs one measurement in a fresh process; (its RESULT dict, "") or (None, error)."""
    proc = subprocess.run(argv, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return None, f"({proc.returncode}) " + "\n".join(tail)
    return json.loads(lines[-1][len("RESULT "):]), ""


def child_argv(args, impl, C):
    argv = [sys.executable, os.path.abspath(__file__), "--one", impl, str(C),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--per-client-cap", str(args.per_client_cap), "--devices", str(args.devices),
            "--per-step-cap", str(args.per_step_cap)]
    if args.chunk_size is not None:
        argv += ["--chunk-size", args.chunk_size]
    if args.unroll is not None:
        argv += ["--unroll", str(args.unroll)]
    return argv


def fmt_rate(v):
    return "-" if v is None else f"{v:,.0f}"


def table(results, sizes, impls) -> str:
    by = {(r["impl"], r["C"]): r for r in results}
    head = ["implementation"] + [f"C={c} clients/s" for c in sizes] + [f"C={c} MB" for c in sizes]
    rows = []
    for impl in impls:
        row = [impl]
        for c in sizes:
            r = by.get((impl, c))
            if r is None or "error" in r:
                row.append("error" if r else "-")
            else:
                star = "*" if r["clients_timed"] < c else ""
                row.append(f"{fmt_rate(r['clients_per_s'])}{star}")
        for c in sizes:
            r = by.get((impl, c))
            row.append("-" if r is None or "error" in r else f"{r['peak_rss_mb']:.0f}")
        rows.append(row)
    if "engine" in impls and "per_step_jit" in impls:
        row = ["speedup engine/per_step_jit"]
        for c in sizes:
            a, b = by.get(("engine", c)), by.get(("per_step_jit", c))
            ok = a and b and "error" not in a and "error" not in b
            row.append(f"{a['clients_per_s'] / b['clients_per_s']:.1f}x" if ok else "-")
        row += [""] * len(sizes)
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    notes = sorted({(r["impl"], r["C"], r["clients_timed"]) for r in results
                    if "error" not in r and r["clients_timed"] < r["C"]})
    for impl, c, t in notes:
        out.append(f"* {impl} at C={c}: {t} of the {c} clients timed per round "
                   f"(linear in C), clients/s = {t} / median time")
    return "\n".join(out)


def plot(results, sizes, impls, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for impl in impls:
        pts = sorted((r["C"], r["clients_per_s"]) for r in results
                     if r["impl"] == impl and "error" not in r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.set_xlabel("clients per round C")
    ax.set_ylabel("clients / s (median round)")
    ax.set_title("FedAvg round throughput, workload W, CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (median, min)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds (compile + warm-up)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--out", default=str(REPO / "results"))
    ap.add_argument("--chunk-size", default=None,
                    help="engine EngineOptions.chunk_size (int or 'none'); default: engine's")
    ap.add_argument("--unroll", type=int, default=None,
                    help="engine EngineOptions.unroll; default: engine's")
    ap.add_argument("--devices", type=int, default=0,
                    help="engine: devices to shard the cohort over (0: all, i.e. every core)")
    ap.add_argument("--per-client-cap", type=int, default=DEFAULT_LOOP_CAP["per_client_jit"],
                    help="max clients timed per round for per_client_jit")
    ap.add_argument("--per-step-cap", type=int, default=DEFAULT_LOOP_CAP["per_step_jit"],
                    help="max clients timed per round for per_step_jit")
    ap.add_argument("--check", action="store_true", help="cross-check implementations, exit")
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "C"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        ap.error("--repeats and --warmup must be >= 1")

    if args.check:
        check(args)
        return
    if args.one:
        # as the CLI does: every CPU core a JAX device, glibc heap kept (before jax import)
        from fedjax_lite.experiment.host import configure_host
        configure_host()
        res = run_one(args.one[0], int(args.one[1]), args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    sizes = [int(s) for s in args.sizes.split(",") if s]
    impls = [s for s in args.impls.split(",") if s]
    for impl in impls:
        if impl not in IMPLS:
            ap.error(f"--impls: unknown implementation {impl!r}; choose from {IMPLS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    t_start = time.time()
    for C in sizes:
        for impl in impls:
            t0 = time.time()
            r, err = run_child(child_argv(args, impl, C))
            if r is None:
                print(f"{impl:15s} C={C:6d}: FAILED " + err.replace("\n", " / "))
                results.append({"impl": impl, "C": C, "error": err})
                continue
            r["process_wall_s"] = time.time() - t0
            results.append(r)
            print(f"{impl:15s} C={C:6d}: {r['clients_per_s']:>11,.0f} clients/s  "
                  f"median {r['median_s'] * 1e3:9.2f} ms  min {r['min_s'] * 1e3:9.2f} ms  "
                  f"({r['clients_timed']} clients)  peak {r['peak_rss_mb']:6.0f} MB  "
                  f"load {r['loadavg_end'][0]:.1f}  [{r['process_wall_s']:.0f} s]", flush=True)

    txt = table(results, sizes, impls)
    print()
    print(txt)
    doc = {
        "benchmark": "throughput of one FedAvg round",
        "machine": machine_info(),
        "workload": {
            "name": "W", "examples_per_client": N_EX, "features": DIM, "dtype": "float32",
            "model": "binary logistic regression, zero init, sigmoid cross-entropy, "
                     "mean over batch",
            "local_epochs": EPOCHS, "batch_size": BATCH, "steps_per_epoch": STEPS,
            "client_optimizer": f"sgd(lr={CLIENT_LR})",
            "server_optimizer": f"sgd(lr={SERVER_LR})",
            "shuffle": "fresh random permutation of each client's examples every epoch",
            "aggregation": "example-weighted mean of client deltas",
            "clients_per_round": sizes,
        },
        "method": {
            "metric": "clients_per_s = clients_timed / median round wall time "
                      "(training + aggregation + server step; no compile, no evaluation)",
            "repeats": args.repeats, "warmup_rounds": args.warmup,
            "peak_rss": "ru_maxrss of a fresh subprocess per (impl, C), includes the "
                        "host data (x is 25.6 KB per client) and, for JAX, the runtime",
            "clients_timed": "Python-loop baselines may train only the first clients_timed "
                             "clients per timed round (cost is linear in C)",
            "per_client_cap": args.per_client_cap, "per_step_cap": args.per_step_cap,
        },
        "results": results,
        "table": txt,
        "total_wall_s": time.time() - t_start,
    }
    (out / "throughput.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(results, sizes, impls, out / "throughput.png")
    print(f"\nwrote {out / 'throughput.json'} and {out / 'throughput.png'} "
          f"({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
