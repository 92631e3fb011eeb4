#!/usr/bin/env python
"""Privacy vs accuracy of DP-FedAvg and DP-FTRL on the quickstart task, and DP's round cost.

Task: ``configs/quickstart.yaml`` (synthetic_logistic, 1000 clients, 50 per round, 100
rounds, 5 local epochs of batch 16, client SGD 0.1, server SGD 1) with
``algorithm.weighting: uniform`` and ``data.test_split: clients`` in EVERY run (DP runs
must hold out whole clients for testing -- the engine's default for them -- and the
plaintext references use the same split, so all rows share training population and
test set). About 20% of the 1000 clients are held out, by a hash of (seed, client id):
the number of training clients K, hence q = 50 / K and epsilon, differ slightly between
seeds; they are read from each run's ``summary.json`` (never assumed) and reported per
seed. DP runs clip every client's whole update to L2 norm ``--clip`` (0.5), noise the
sum, divide by the fixed 50, and are accounted at delta = ``--delta`` (1e-5) by
``fedjax_lite.privacy.accounting`` (dp-accounting). Every run goes through
``fedjax_lite.experiment.runner.run`` (what ``fedjax-lite run`` does) in a temporary
directory, once per seed (``--seeds``, default 3; a seed regenerates data, init and
cohorts). Comparisons:

1. sampling: DP-FedAvg with Poisson sampling (``algorithm.sampling: poisson``, add/remove
   neighbours, RDP) vs fixed-size cohorts (``sampling: fixed``, replace-one neighbours,
   sensitivity 2S, RDP of sampling without replacement) at the same noise multipliers
   ``--noise``;
2. accountant: the PLD epsilon of the same Poisson configs, computed with
   ``fedjax_lite.privacy.accounting.epsilon(..., accountant="pld")`` from the setup each
   run reports (epsilon depends only on the config and K, not on the training
   randomness, so nothing is rerun);
3. clipping: fixed clip norms 0.1 / 0.5 / 2.0 vs adaptive clipping (Andrew et al. 2021,
   ``aggregator.target_quantile`` 0.5, default clip learning rate and count noise)
   started at 0.1 and 2.0, all Poisson at z = ``--adaptive-z``;
4. DP-FedAvg (Poisson) vs DP-FTRL (``aggregator.name: dp_ftrl``, ``sampling: epochs``:
   every client once per epoch of ceil(K / 50) rounds, a fresh tree every epoch;
   zero-out neighbours, no amplification claimed) with server SGD, and DP-FTRLM (server
   momentum 0.9, learning rate ``--ftrlm-lr`` = 0.1: the same effective step
   lr / (1 - 0.9) = 1 as the others, not tuned) at matched epsilon:
   ``privacy.target_epsilon`` in ``--targets`` with ``aggregator.noise_multiplier: null``
   calibrates z for each;
5. references: plaintext FedAvg (uniform weighting, no clipping; quickstart's fixed
   cohorts and Poisson sampling) and "clipping only, z = 0" (no privacy guarantee);
6. round throughput: plain FedAvg's compiled round vs DP-FedAvg's on the same task,
   built with the public API (``core.build_round`` + ``algorithms.fedavg`` +
   ``privacy.gaussian.dp_gaussian`` / ``privacy.ftrl.dp_ftrl``), in ONE process after
   the runs, the variants alternated round by round (``--repeats`` rounds each after
   ``--warmup``); reported: median of the per-repetition clients/s ratios.

The runs go to ``--jobs`` worker processes (default 2); the throughput part runs alone,
after them, in the main process.

    python benchmarks/dp_tradeoff.py                      # writes results/dp_tradeoff.{json,md,png}
    python benchmarks/dp_tradeoff.py --render-only        # rebuild .md/.png from the .json
    python benchmarks/dp_tradeoff.py --seeds 1 --rounds 10 --noise 1 --targets 8 \
        --repeats 5 --out /tmp/dp_smoke                   # smoke test
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (machine_info, cpu_pressure; imports no JAX at module level)

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "quickstart.yaml"


# ----------------------------------------------------------------------------- settings

def _fmt(v: float) -> str:
    return f"{v:g}"


def settings(args) -> list[dict]:
    """Every configuration the benchmark runs (duplicates merged by overrides)."""
    base = ["algorithm.weighting=uniform", "data.test_split=clients", "checkpoint_every=0",
            f"rounds={args.rounds}"]
    dp = ["aggregator.name=dp_gaussian", f"privacy.delta={args.delta}",
          "privacy.accountant=rdp"]
    out = []

    def add(key, group, method, label, overrides, **info):
        out.append({"key": key, "group": group, "method": method, "label": label,
                    "overrides": base + overrides, **info})

    # 5. references
    add("plaintext_fixed", "reference", "plaintext FedAvg",
        "plaintext FedAvg (uniform weights, fixed cohorts of 50)", [],
        sampling="fixed", clip="none")
    add("plaintext_poisson", "reference", "plaintext FedAvg",
        "plaintext FedAvg (uniform weights, Poisson sampling)",
        ["algorithm.sampling=poisson"], sampling="poisson", clip="none")
    add("clip_only_poisson", "reference", "clipping only",
        f"clipping only, z = 0, clip {_fmt(args.clip)}, Poisson (no privacy)",
        ["algorithm.sampling=poisson"] + dp + [f"aggregator.clip_norm={args.clip}",
                                               "aggregator.noise_multiplier=0"],
        sampling="poisson", clip=args.clip)
    # 1. sampling, at the same noise multipliers
    for z in args.noise:
        for sampling in ("poisson", "fixed"):
            add(f"dpfedavg_{sampling}_z{_fmt(z)}", "sampling",
                f"DP-FedAvg, {sampling}", f"DP-FedAvg {sampling}, z = {_fmt(z)}",
                [f"algorithm.sampling={sampling}"] + dp
                + [f"aggregator.clip_norm={args.clip}", f"aggregator.noise_multiplier={z}"],
                sampling=sampling, clip=args.clip, z=z)
    # 3. fixed vs adaptive clipping, Poisson, same z
    za = args.adaptive_z
    for c in sorted(set(args.clips) | {args.clip}):
        add(f"dpfedavg_poisson_z{_fmt(za)}" if c == args.clip else
            f"dpfedavg_poisson_z{_fmt(za)}_clip{_fmt(c)}", "clipping",
            "DP-FedAvg, poisson", f"DP-FedAvg Poisson, z = {_fmt(za)}, fixed clip {_fmt(c)}",
            ["algorithm.sampling=poisson"] + dp
            + [f"aggregator.clip_norm={c}", f"aggregator.noise_multiplier={za}"],
            sampling="poisson", clip=c, z=za)
    for c in args.adaptive_starts:
        add(f"dpfedavg_poisson_z{_fmt(za)}_adaptive{_fmt(c)}", "clipping",
            "DP-FedAvg, poisson, adaptive clip",
            f"DP-FedAvg Poisson, z = {_fmt(za)}, adaptive clip (quantile 0.5) from {_fmt(c)}",
            ["algorithm.sampling=poisson"] + dp
            + [f"aggregator.clip_norm={c}", f"aggregator.noise_multiplier={za}",
               "aggregator.target_quantile=0.5"],
            sampling="poisson", clip=c, z=za, adaptive=True)
    # 4. matched epsilon: z calibrated by privacy.target_epsilon
    calibrated = dp + ["aggregator.noise_multiplier=null", f"aggregator.clip_norm={args.clip}"]
    for e in args.targets:
        te = [f"privacy.target_epsilon={e}"]
        add(f"dpfedavg_poisson_eps{_fmt(e)}", "matched", "DP-FedAvg, poisson, calibrated",
            f"DP-FedAvg Poisson, target epsilon {_fmt(e)}",
            ["algorithm.sampling=poisson"] + calibrated + te,
            sampling="poisson", clip=args.clip, target_epsilon=e)
        ftrl = ["algorithm.sampling=epochs"] + calibrated + te + ["aggregator.name=dp_ftrl"]
        add(f"dpftrl_eps{_fmt(e)}", "matched", "DP-FTRL, epochs, server SGD",
            f"DP-FTRL (epochs, tree per epoch, server SGD), target epsilon {_fmt(e)}",
            ftrl, sampling="epochs", clip=args.clip, target_epsilon=e)
        add(f"dpftrlm_eps{_fmt(e)}", "matched", "DP-FTRLM, epochs, server momentum 0.9",
            f"DP-FTRLM (epochs, tree per epoch, server SGD lr {_fmt(args.ftrlm_lr)} "
            f"momentum 0.9), target epsilon {_fmt(e)}",
            ftrl + ["algorithm.server_optimizer={name: sgd, learning_rate: "
                    f"{args.ftrlm_lr}, momentum: 0.9}}"],
            sampling="epochs", clip=args.clip, target_epsilon=e)
    merged: dict[tuple, dict] = {}
    for s in out:
        k = tuple(s["overrides"])
        if k in merged:
            merged[k].setdefault("also_in", []).append(s["group"])
        else:
            merged[k] = s
    return list(merged.values())


# ------------------------------------------------------------------------- one run

def _import_engine() -> None:
    """Imports the engine now (the code the benchmark measures is the code on disk when
    it starts, even if the working tree changes while it runs)."""
    from fedjax_lite.experiment.host import configure_host
    configure_host()                      # every core a JAX device, as the CLI does
    import fedjax_lite.algorithms  # noqa: F401
    import fedjax_lite.core  # noqa: F401
    import fedjax_lite.experiment.builders  # noqa: F401
    import fedjax_lite.experiment.outputs  # noqa: F401
    import fedjax_lite.experiment.runner  # noqa: F401
    import fedjax_lite.models  # noqa: F401
    import fedjax_lite.privacy.accounting  # noqa: F401
    import fedjax_lite.privacy.ftrl  # noqa: F401
    import fedjax_lite.privacy.gaussian  # noqa: F401


def _worker_init() -> None:
    _import_engine()


def run_one(overrides: list[str], seed: int) -> dict:
    """One ``runner.run`` in a temporary directory; what the benchmark keeps of it."""
    from fedjax_lite.experiment import config as cfg
    from fedjax_lite.experiment.outputs import read_metrics
    from fedjax_lite.experiment.runner import run
    full = overrides + [f"seed={seed}"]
    try:
        config = cfg.load(str(BASE_CONFIG), full)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            run(config, tmp, progress=False)
            summary = json.loads((Path(tmp) / "summary.json").read_text())
            rows = read_metrics(os.path.join(tmp, "metrics.jsonl"))
        elapsed = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 -- reported with the config, not fixed here
        return {"seed": seed, "overrides": full,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=8)}
    return {"seed": seed, "accuracy": summary["final"]["eval_accuracy"],
            "eval_loss": summary["final"].get("eval_loss"),
            "num_clients": summary["num_clients"],
            "clients_per_round": summary["clients_per_round"],
            "sampling": summary["sampling"], "privacy": summary.get("privacy"),
            "clients_per_s": summary.get("clients_per_s"),
            "compile_s": summary.get("compile_s"),
            "run_s": elapsed,
            "clip_norm_curve": [[r["round"], r["clip_norm"]] for r in rows
                                if r.get("clip_norm") is not None]}


# ---------------------------------------------------------------------- accounting

def other_epsilons(priv: dict, rounds: int) -> dict:
    """Epsilons of the same release under another accountant / relation, from the
    setup the run reported (dp-accounting through fedjax_lite.privacy.accounting)."""
    from fedjax_lite.privacy import accounting
    setup = accounting.PrivacySetup(
        noise_multiplier=priv["noise_multiplier"], population=priv["population"],
        cohort_size=priv["clients_per_round"], sampling=priv["sampling"],
        neighboring=priv["neighboring"], accountant=priv["accountant"],
        mechanism="ftrl" if priv["mechanism"] == "dp_ftrl" else "gaussian",
        restart_every=priv["restart_every"])
    out = {}

    def eps(**change):
        from dataclasses import replace
        try:
            e = accounting.epsilon(replace(setup, **change), rounds, priv["delta"])
            return None if math.isinf(e) else e
        except accounting.AccountingError as err:
            return f"n/a: {err}"

    if priv["noise_multiplier"] == 0:
        return out
    out["epsilon_rdp_recomputed"] = eps(accountant="rdp")
    out["epsilon_pld"] = eps(accountant="pld")
    if priv["neighboring"] == "add_remove":
        out["epsilon_rdp_zero_out"] = eps(neighboring="zero_out")
    return out


# ---------------------------------------------------------------------- throughput

def measure_throughput(args, poisson_slots: int | None) -> dict:
    """Plain FedAvg's round vs DP rounds on the quickstart task (seed 0 data, whole test
    clients held out as in the runs), compiled like the runner does (engine options from
    the config, population on the devices), alternated round by round in this process.
    ``poisson_slots``: the static Poisson cohort of the seed-0 DP run at z = 1 (a DP run
    sizes it so that an overflow stop costs <= delta / 10); None: ``poisson_bound``'s
    default (tail 1e-12)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from fedjax_lite.algorithms import fedavg
    from fedjax_lite.core import Sampling, build_round, poisson_bound, round_key
    from fedjax_lite.experiment import config as cfg
    from fedjax_lite.experiment.builders import build_data, build_optimizer, engine_options
    from fedjax_lite.models import logistic_regression
    from fedjax_lite.privacy.ftrl import dp_ftrl
    from fedjax_lite.privacy.gaussian import dp_gaussian

    config = cfg.load(str(BASE_CONFIG), ["algorithm.weighting=uniform", "seed=0",
                                         "data.test_split=clients"])
    a = config.algorithm
    train, _ = build_data(config)
    K, C = train.num_clients, a.clients_per_round
    engine = engine_options(config.engine, train.n)
    where = (NamedSharding(engine.mesh, PartitionSpec()) if engine.mesh is not None
             else jax.local_devices()[0])
    population = jax.device_put(train.arrays(), where)
    model = logistic_regression(int(np.prod(train.feature_shape)))
    init_key, run_key = jax.random.split(jax.random.key(0))
    bound = poisson_slots or poisson_bound(K, C / K)[0]
    z = 1.0

    def algorithm(aggregator=None):
        return fedavg(model, client_optimizer=build_optimizer(a.client_optimizer),
                      server_optimizer=build_optimizer(a.server_optimizer),
                      local_epochs=a.local_epochs, batch_size=a.batch_size,
                      weighting="uniform", aggregator=aggregator, engine=engine)

    variants = {
        "fedavg_fixed": ("plain FedAvg, fixed cohort of 50 (quickstart's round)",
                         algorithm(), Sampling()),
        "dpfedavg_fixed": (f"DP-FedAvg (dp_gaussian, clip {_fmt(args.clip)}, z = 1), "
                           "fixed cohort of 50", algorithm(dp_gaussian(args.clip, z, C)),
                           Sampling()),
        "fedavg_poisson": (f"plain FedAvg, Poisson q = {C}/{K} ({bound} slots)",
                           algorithm(), Sampling("poisson", bound)),
        "dpfedavg_poisson": (f"DP-FedAvg (dp_gaussian, clip {_fmt(args.clip)}, z = 1), "
                             f"Poisson q = {C}/{K} ({bound} slots): the runs' DP round",
                             algorithm(dp_gaussian(args.clip, z, C)),
                             Sampling("poisson", bound)),
        "dpftrl_epochs": (f"DP-FTRL (dp_ftrl, clip {_fmt(args.clip)}, z = 1, tree of "
                          f"{-(-K // C)} rounds), epochs sampling",
                          algorithm(dp_ftrl(args.clip, z, C, restart_every=-(-K // C))),
                          Sampling("epochs", key=run_key)),
    }
    fns, states = {}, {}
    for name, (_, alg, sampling) in variants.items():
        state = alg.init(model.init(init_key))
        fns[name] = jax.jit(build_round(alg, num_clients=K, clients_per_round=C,
                                        sampling=sampling)).lower(
            state, population, round_key(run_key, 0)).compile()
        states[name] = state
    names = list(variants)
    times = {n: [] for n in names}
    load_before, psi_before = os.getloadavg(), tp.cpu_pressure()
    for rep in range(args.warmup + args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]   # rotate the order
        for n in order:
            t0 = time.perf_counter()
            states[n], _ = fns[n](states[n], population, round_key(run_key, rep))
            jax.block_until_ready(states[n])
            dt = time.perf_counter() - t0
            if rep >= args.warmup:
                times[n].append(dt)
    load_after, psi_after = os.getloadavg(), tp.cpu_pressure()
    res = {"clients_per_round": C, "num_clients": K, "poisson_slots": bound,
           "noise_multiplier": z, "clip_norm": args.clip, "warmup": args.warmup,
           "repeats": args.repeats, "engine": {"chunk_size": engine.chunk_size,
                                               "devices": 1 if engine.mesh is None
                                               else engine.mesh.devices.size},
           "loadavg_before": load_before, "loadavg_after": load_after,
           "cpu_pressure_before": psi_before, "cpu_pressure_after": psi_after,
           "variants": {}, "ratios": {}}
    for n in names:
        med = statistics.median(times[n])
        res["variants"][n] = {"what": variants[n][0], "median_s": med,
                              "min_s": min(times[n]), "clients_per_s": C / med,
                              "times_s": times[n]}

    def ratio(dp_name, plain_name, what):
        per_rep = [tp_ / td for tp_, td in zip(times[plain_name], times[dp_name])]
        r = statistics.median(per_rep)
        res["ratios"][f"{dp_name}/{plain_name}"] = {
            "what": what, "median_clients_per_s_ratio": r,
            "q1": statistics.quantiles(per_rep, n=4)[0] if len(per_rep) > 1 else r,
            "q3": statistics.quantiles(per_rep, n=4)[2] if len(per_rep) > 1 else r,
            "within_2x": r >= 0.5}

    ratio("dpfedavg_fixed", "fedavg_fixed",
          "DP mechanism alone (same fixed cohort of 50)")
    ratio("dpfedavg_poisson", "fedavg_fixed",
          "DP-FedAvg round as run (Poisson, padded cohort) vs quickstart's plain round")
    ratio("dpfedavg_poisson", "fedavg_poisson", "DP mechanism alone under Poisson sampling")
    ratio("dpftrl_epochs", "fedavg_fixed", "DP-FTRL round as run vs quickstart's plain round")
    return res


# ------------------------------------------------------------------------- outputs

def _acc(r):
    return f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}"


def _eps(v):
    if v is None:
        return "-"
    if isinstance(v, str):
        return "n/a"
    return f"{v:.2f}"


def _ps(r: dict, field: str, digits: int = 2) -> str:
    """A row's per-seed value: the mean, and the seeds' values when they differ at the
    shown precision (K, hence q and epsilon, depends on the seed)."""
    vals = r.get(f"{field}_per_seed")
    if vals is None:
        return _eps(r.get(field)) if digits == 2 else str(r.get(field, "-"))
    if any(isinstance(v, str) for v in vals):
        return "n/a"
    if all(v is None for v in vals):
        return "-"
    shown = [f"{v:.{digits}f}" for v in vals]
    mean = f"{statistics.mean(vals):.{digits}f}"
    return mean if len(set(shown)) == 1 else f"{mean} ({' / '.join(shown)})"


def markdown(res: dict) -> str:
    rows = {r["key"]: r for r in res["rows"]}
    s, a = res["setup"], res["args"]
    src0, src1 = res["source_at_start"], res["source_at_end"]
    changed = (f" (the working tree changed during the run, to {src1['git_commit'][:7]}"
               f"{' + modifications' if src1['fedjax_lite_dirty'] else ''}; the engine was "
               "imported at the start)" if res["source_changed_during_run"] else "")
    Ks = s.get("num_clients_per_seed", [])
    qs = s.get("sampling_probability_per_seed", [])
    C = s.get("clients_per_round")
    L = ["# DP trade-off on the quickstart task",
         "",
         f"Training clients K = {' / '.join(map(str, Ks))} for seeds "
         f"{' / '.join(map(str, s.get('seeds', [])))} (whole clients held out for testing, "
         f"`data.test_split: clients`, in every run), {C} per round: Poisson q = C / K = "
         f"{' / '.join(f'{q:.4f}' for q in qs)}; {a['rounds']} rounds, delta = "
         f"{a['delta']:g}, clip {_fmt(a['clip'])}, uniform weighting. Test accuracy: final "
         f"round, mean ± std over seeds; epsilon by dp-accounting, mean over seeds with the "
         f"seeds' values in parentheses where they differ. "
         f"Machine: {res['machine']['cpu_model']}, {res['machine']['cpu_affinity']} cores, "
         f"JAX {res['machine']['jax']} {res['machine']['backend']}; git "
         f"{src0['git_commit'][:7]}"
         f"{' (fedjax_lite modified)' if src0['fedjax_lite_dirty'] else ''}{changed}; "
         f"{res['runtime_s'] / 60:.1f} min; `{res['command'].strip()}`.", ""]

    def ok(k):
        return k in rows and "accuracy_mean" in rows[k]

    L += ["## 1-2. Poisson vs fixed-size cohorts at the same noise; RDP vs PLD", "",
          "| z | Poisson: ε RDP (add/remove) | Poisson: ε PLD | Poisson: accuracy | "
          "fixed C of K: ε RDP (replace-one, 2S) | fixed: accuracy |",
          "|---|---|---|---|---|---|"]
    for z in a["noise"]:
        kp, kf = f"dpfedavg_poisson_z{_fmt(z)}", f"dpfedavg_fixed_z{_fmt(z)}"
        if not (ok(kp) and ok(kf)):
            continue
        p, f = rows[kp], rows[kf]
        L.append(f"| {_fmt(z)} | {_ps(p, 'epsilon')} | {_ps(p, 'epsilon_pld')} | "
                 f"{_acc(p)} | {_ps(f, 'epsilon')} | {_acc(f)} |")
    L += ["", "PLD for fixed cohorts: n/a (dp-accounting's PLD accountant does not support "
          "sampling without replacement). PLD epsilons are computed from each run's "
          "reported setup (z, K, C, rounds, delta) with "
          "`fedjax_lite.privacy.accounting.epsilon(accountant='pld')`, not rerun: epsilon "
          "depends only on the config and K, not on the training randomness.", ""]

    za = a["adaptive_z"]
    L += [f"## 3. Fixed vs adaptive clipping (Poisson, z = {_fmt(za)})", "",
          "| clipping | initial clip | final clip (mean over seeds) | ε RDP | accuracy |",
          "|---|---|---|---|---|"]
    for r in sorted(res["rows"], key=lambda r: (bool(r.get("adaptive")), r["clip"]
                                                if isinstance(r["clip"], float) else 0)):
        if r.get("z") == za and r["sampling"] == "poisson" and "accuracy_mean" in r and (
                "clipping" in [r["group"]] + r.get("also_in", [])):
            kind = "adaptive, quantile 0.5" if r.get("adaptive") else "fixed"
            fc = r.get("final_clip_norm_mean")
            L.append(f"| {kind} | {_fmt(r['clip'])} | "
                     f"{'-' if fc is None else f'{fc:.3f}'} | {_ps(r, 'epsilon')} | "
                     f"{_acc(r)} |")
    L += ["", "Final clip: the clip norm averaged over the last evaluation window (rounds "
          f"{a['rounds'] - 4}-{a['rounds']}), then over seeds.", ""]

    L += ["## 4. DP-FedAvg vs DP-FTRL at matched epsilon (z calibrated by "
          "`privacy.target_epsilon`)", "",
          "| target ε | DP-FedAvg Poisson: z | ε | accuracy | DP-FTRL epochs, SGD: z | ε | "
          f"accuracy | DP-FTRLM (lr {_fmt(a['ftrlm_lr'])}, momentum 0.9): z | ε | accuracy |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for e in a["targets"]:
        cells = [_fmt(e)]
        for k in (f"dpfedavg_poisson_eps{_fmt(e)}", f"dpftrl_eps{_fmt(e)}",
                  f"dpftrlm_eps{_fmt(e)}"):
            if ok(k):
                r = rows[k]
                cells += [_ps(r, "noise_multiplier", 3), _ps(r, "epsilon"), _acc(r)]
            else:
                cells += ["failed", "-", "-"]
        L.append("| " + " | ".join(cells) + " |")
    zo = [_ps(rows[f"dpfedavg_poisson_eps{_fmt(e)}"], "epsilon_rdp_zero_out")
          for e in a["targets"] if ok(f"dpfedavg_poisson_eps{_fmt(e)}")]
    ftrl = next((rows[f"dpftrl_eps{_fmt(e)}"] for e in a["targets"]
                 if ok(f"dpftrl_eps{_fmt(e)}")), {})
    L += ["", "DP-FedAvg: add/remove neighbours, Poisson amplification; the same runs' ε "
          f"under zero-out neighbours (DP-FTRL's relation): {', '.join(zo)}. DP-FTRL: "
          "zero-out neighbours, no amplification, each client once per epoch of "
          f"ceil(K / C) = {' / '.join(str(v) for v in ftrl.get('restart_every_per_seed', []))}"
          " rounds, a fresh tree every epoch.", ""]

    L += ["## 5. References", "", "| setting | accuracy | ε |", "|---|---|---|"]
    for k in ("plaintext_fixed", "plaintext_poisson", "clip_only_poisson"):
        if ok(k):
            L.append(f"| {rows[k]['label']} | {_acc(rows[k])} | "
                     f"{'no guarantee' if k.startswith('clip') else '-'} |")
    L.append("")

    t = res.get("throughput")
    if t:
        L += ["## 6. Round throughput (one process, variants alternated round by round)", "",
              f"Seed-0 data (K = {t['num_clients']}); {t['repeats']} rounds of each after "
              f"{t['warmup']} warm-up rounds, the order of the variants rotated every "
              f"repetition; clients/s = {t['clients_per_round']} / median round time; "
              f"load average {t['loadavg_before'][0]:.1f} before, "
              f"{t['loadavg_after'][0]:.1f} after.", "",
              "| round | median ms | clients/s |", "|---|---|---|"]
        for v in t["variants"].values():
            L.append(f"| {v['what']} | {v['median_s'] * 1e3:.2f} | "
                     f"{v['clients_per_s']:,.0f} |")
        L += ["", "| ratio (DP clients/s / plain clients/s, median over repetitions) | "
              "median | IQR | within 2x |", "|---|---|---|---|"]
        for k, v in t["ratios"].items():
            L.append(f"| {v['what']} (`{k}`) | {v['median_clients_per_s_ratio']:.2f} | "
                     f"{v['q1']:.2f}-{v['q3']:.2f} | {'yes' if v['within_2x'] else 'NO'} |")
        L.append("")

    L += ["## All runs", "", "| setting | K per seed | accountant / neighbours | z | ε | "
          "ε PLD | accuracy per seed | mean ± std |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "accuracy_mean" not in r:
            L.append(f"| {r['label']} | | FAILED: {r['errors'][0]} | | | | | |")
            continue
        acct = (f"{r['accountant']} / {r['neighboring']}" if r.get("accountant") else "-")
        z = "-" if r.get("noise_multiplier") is None else _ps(r, "noise_multiplier", 3)
        eps = ("no guarantee" if r["key"].startswith("clip_only") else _ps(r, "epsilon"))
        L.append(f"| {r['label']} | {' / '.join(map(str, r['num_clients_per_seed']))} | "
                 f"{acct} | {z} | {eps} | {_ps(r, 'epsilon_pld')} | "
                 f"{' / '.join(f'{v:.4f}' for v in r['accuracy_per_seed'])} | {_acc(r)} |")
    errors = [r for r in res["rows"] if r.get("errors")]
    if errors:
        L += ["", "## Failures", ""]
        for r in errors:
            for e in r["errors"]:
                L.append(f"* {r['label']}: `{e}`")
    return "\n".join(L) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    rows = [r for r in res["rows"] if "accuracy_mean" in r]
    by = {r["key"]: r for r in rows}
    a = res["args"]
    Ks = res["setup"]["num_clients_per_seed"]
    K = "/".join(map(str, Ks))
    C = res["setup"]["clients_per_round"]
    q = f"{C}/K"
    clip = _fmt(a["clip"])
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(19, 7.6),
                                     gridspec_kw={"width_ratios": [2.1, 1.1, 1.1]})

    def eps_of(r, field="epsilon"):
        v = r.get(field)
        return v if isinstance(v, float) else None

    def line(keys, label, field="epsilon", **kw):
        pts = sorted(((eps_of(by[k], field), by[k]) for k in keys
                      if k in by and eps_of(by[k], field)), key=lambda p: p[0])
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1]["accuracy_mean"] for p in pts],
                        yerr=[p[1]["accuracy_std"] for p in pts], label=label, capsize=3,
                        **kw)

    zs = [f"dpfedavg_poisson_z{_fmt(z)}" for z in a["noise"]]
    line(zs, f"DP-FedAvg, Poisson q={q}, RDP add/remove, clip {clip}", marker="o",
         color="C0")
    line(zs, "same runs at their PLD add/remove epsilon", field="epsilon_pld", marker="o",
         mfc="none", ls="--", color="C0", alpha=0.7)      # epsilon depends on the config only
    for k, z in zip(zs, a["noise"]):
        if k in by and eps_of(by[k]):
            ax.annotate(f"z={_fmt(z)}", (by[k]["epsilon"], by[k]["accuracy_mean"]),
                        textcoords="offset points", xytext=(5, 6), fontsize=8, color="C0")
    zf = [f"dpfedavg_fixed_z{_fmt(z)}" for z in a["noise"]]
    line(zf, f"DP-FedAvg, fixed cohorts of {C}, RDP replace-one (2S), clip {clip}",
         marker="s", color="C3")
    for k, z in zip(zf, a["noise"]):
        if k in by and eps_of(by[k]):
            ax.annotate(f"z={_fmt(z)}", (by[k]["epsilon"], by[k]["accuracy_mean"]),
                        textcoords="offset points", xytext=(5, -12), fontsize=8, color="C3")
    line([f"dpfedavg_poisson_eps{_fmt(e)}" for e in a["targets"]],
         f"DP-FedAvg, Poisson, RDP add/remove, clip {clip}, z calibrated to target epsilon",
         marker="D", ls=":", color="C2")
    line([f"dpftrl_eps{_fmt(e)}" for e in a["targets"]],
         f"DP-FTRL, epochs (tree/epoch), RDP zero-out, clip {clip}, server SGD",
         marker="^", color="C1")
    line([f"dpftrlm_eps{_fmt(e)}" for e in a["targets"]],
         f"DP-FTRLM, epochs, RDP zero-out, clip {clip}, server lr {_fmt(a['ftrlm_lr'])} "
         "momentum 0.9",
         marker="v", color="C4")
    for k, style, lab in (("plaintext_fixed", dict(color="k", ls="-"),
                           "plaintext FedAvg (no clip, no noise; fixed cohorts)"),
                          ("clip_only_poisson", dict(color="gray", ls="--"),
                           f"clipping only, z = 0, clip {clip} (no privacy)")):
        if k in by:
            ax.axhline(by[k]["accuracy_mean"], label=lab, lw=1, **style)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xlabel(f"epsilon (delta = {a['delta']:g}, after {a['rounds']} rounds; mean over "
                  "seeds; log scale)")
    ax.set_ylabel(f"final test accuracy (mean ± std over {len(res['seeds'])} seeds)")
    ax.set_title(f"Accuracy vs epsilon, quickstart task (K = {K} training clients by seed, "
                 f"{C}/round)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2,
              title="method: sampling, accountant / neighbours, clip norm",
              title_fontsize=8)

    za = _fmt(a["adaptive_z"])
    clip_rows = [r for r in rows if r.get("z") == a["adaptive_z"]
                 and r["sampling"] == "poisson"
                 and "clipping" in [r["group"]] + r.get("also_in", [])]
    clip_rows.sort(key=lambda r: (bool(r.get("adaptive")), r["clip"]))
    labels = [("adaptive from " if r.get("adaptive") else "fixed ") + _fmt(r["clip"])
              for r in clip_rows]
    bx.errorbar(range(len(clip_rows)), [r["accuracy_mean"] for r in clip_rows],
                yerr=[r["accuracy_std"] for r in clip_rows], fmt="o", capsize=4)
    for i, r in enumerate(clip_rows):
        bx.plot([i] * len(r["accuracy_per_seed"]), r["accuracy_per_seed"], ".", color="gray",
                alpha=0.6)
    bx.set_xticks(range(len(clip_rows)), labels, rotation=25, ha="right", fontsize=8)
    bx.set_ylabel("final test accuracy (mean ± std; dots: seeds)")
    bx.set_xlabel("clipping (initial clip norm)")
    eps_a = next((r["epsilon"] for r in clip_rows if r.get("epsilon")), None)
    bx.set_title(f"Clip norm at z = {za}, Poisson (epsilon {_eps(eps_a)})")
    bx.grid(True, axis="y", alpha=0.3)

    for i, r in enumerate(r for r in clip_rows if r.get("adaptive")):
        for j, (seed, curve) in enumerate(zip(res["seeds"], r["clip_norm_curves"])):
            if curve:
                cx.plot([p[0] for p in curve], [p[1] for p in curve], color=f"C{i}",
                        alpha=0.8, label=f"adaptive from {_fmt(r['clip'])}" if j == 0 else None)
    for r in clip_rows:
        if not r.get("adaptive"):
            cx.axhline(r["clip"], color="gray", lw=0.8, ls=":")
    cx.set_yscale("log")
    cx.set_xlabel("round")
    cx.set_ylabel("clip norm (mean over each 5-round window; log scale)")
    cx.set_title("Adaptive clip norm (target quantile 0.5)\n"
                 "one line per seed; dotted: the fixed clips")
    cx.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    cx.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:g}".lstrip("0.")[:1] in "25" else ""))
    cx.grid(True, which="both", alpha=0.3)
    cx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main

# git HEAD, dirty flag and source hash without JAX (the runs' worker processes import
# the engine at the start, ``machine_info()`` runs at the end); recsys_quality, scaling
# and startup import it from here
source_state = tp.source_state


def _mean(values: list):
    """Mean of the float values; a list of only None gives None, of strings the first."""
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if nums and len(nums) == len(values):
        return statistics.mean(nums)
    return next((v for v in values if v is not None), None)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--noise", type=_floats, default=_floats("0.5,1,2,4"),
                    help="noise multipliers z > 0 for the sampling comparison")
    ap.add_argument("--targets", type=_floats, default=_floats("2,4,8"),
                    help="target epsilons for DP-FedAvg vs DP-FTRL")
    ap.add_argument("--clip", type=float, default=0.5, help="clip norm of the DP runs")
    ap.add_argument("--clips", type=_floats, default=_floats("0.1,2.0"),
                    help="other fixed clip norms for the clipping comparison")
    ap.add_argument("--adaptive-starts", type=_floats, default=_floats("0.1,2.0"),
                    help="initial clip norms of the adaptive-clipping runs")
    ap.add_argument("--adaptive-z", type=float, default=1.0,
                    help="noise multiplier of the clipping comparison")
    ap.add_argument("--ftrlm-lr", type=float, default=0.1,
                    help="DP-FTRLM server learning rate (momentum 0.9)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per setting")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes for the runs")
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds per variant "
                    "in the throughput part (0: skip it)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "results"))
    ap.add_argument("--render-only", action="store_true", help="rebuild dp_tradeoff.md "
                    "and .png from the dp_tradeoff.json already in --out (no runs)")
    args = ap.parse_args(argv)
    if args.render_only:
        out = Path(args.out)
        res = json.loads((out / "dp_tradeoff.json").read_text())
        (out / "dp_tradeoff.md").write_text(markdown(res))
        plot(res, out / "dp_tradeoff.png")
        print(markdown(res))
        return
    if args.adaptive_z not in args.noise:
        print(f"note: --adaptive-z {args.adaptive_z} is not in --noise; its fixed-clip "
              "row is run for the clipping comparison only", flush=True)
    t_start = time.perf_counter()
    source_at_start = source_state()
    _import_engine()
    todo = settings(args)
    seeds = list(range(args.seeds))
    print(f"{len(todo)} settings x {len(seeds)} seeds = {len(todo) * len(seeds)} runs on "
          f"{args.jobs} worker(s)", flush=True)
    results: dict[tuple[int, int], dict] = {}
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn"),
                                initializer=_worker_init) as pool:
        futures = {pool.submit(run_one, s["overrides"], seed): (i, seed)
                   for i, s in enumerate(todo) for seed in seeds}
        for fut in cf.as_completed(futures):
            i, seed = futures[fut]
            r = results[(i, seed)] = fut.result()
            msg = (f"FAILED {r['error']}" if "error" in r else
                   f"accuracy {r['accuracy']:.4f}  epsilon "
                   f"{_eps((r['privacy'] or {}).get('epsilon'))}  "
                   f"({r['run_s']:.0f} s, compile {r['compile_s'] or 0:.0f} s)")
            print(f"[{len(results):3d}/{len(futures)} {time.perf_counter() - t_start:6.0f} s] "
                  f"{todo[i]['label']}, seed {seed}: {msg}", flush=True)
    runs_s = time.perf_counter() - t_start

    rows, setup = [], None
    for i, s in enumerate(todo):
        runs = [results[(i, seed)] for seed in seeds]
        row = dict(s, seeds=seeds)
        errors = [f"seed {r['seed']}: {r['error']} (config {BASE_CONFIG.name} with "
                  f"--set {' '.join(r['overrides'])})" for r in runs if "error" in r]
        if errors:
            row["errors"] = errors
            row["tracebacks"] = [r["traceback"] for r in runs if "error" in r]
        good = [r for r in runs if "error" not in r]
        if good:
            accs = [r["accuracy"] for r in good]
            row.update(accuracy_per_seed=accs, accuracy_mean=statistics.mean(accs),
                       accuracy_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                       seeds=[r["seed"] for r in good],
                       num_clients_per_seed=[r["num_clients"] for r in good],
                       clients_per_round=good[0]["clients_per_round"],
                       static_cohort_size_per_seed=[r["sampling"]["static_cohort_size"]
                                                    for r in good],
                       clients_per_s_per_seed=[r.get("clients_per_s") for r in good],
                       compile_s_per_seed=[r["compile_s"] for r in good])
            privs = [r["privacy"] for r in good]
            if privs[0]:
                # K (held-out test clients are drawn per seed), hence q, epsilon and a
                # calibrated z, can differ between seeds: kept per seed, averaged
                row.update(accountant=privs[0]["accountant"],
                           neighboring=privs[0]["neighboring"], delta=privs[0]["delta"],
                           assumes_per_seed=[p["assumes"] for p in privs])
                for field in ("epsilon", "noise_multiplier", "sampling_probability",
                              "population", "restart_every", "delta_overflow_stop"):
                    row[f"{field}_per_seed"] = [p.get(field) for p in privs]
                    row[field] = _mean(row[f"{field}_per_seed"])
                others = [other_epsilons(p, args.rounds) for p in privs]
                for field in others[0]:
                    row[f"{field}_per_seed"] = [o[field] for o in others]
                    row[field] = _mean(row[f"{field}_per_seed"])
                for p, o in zip(privs, others):
                    rec = o.get("epsilon_rdp_recomputed")
                    if isinstance(rec, float) and p["epsilon"] is not None and \
                            not math.isclose(rec, p["epsilon"], rel_tol=1e-9):
                        row["warning"] = (f"recomputed RDP epsilon {rec} != the run's "
                                          f"{p['epsilon']}")
                if row.get("adaptive"):
                    curves = [r["clip_norm_curve"] for r in good]
                    finals = [c[-1][1] for c in curves if c]
                    row.update(clip_norm_curves=curves, final_clip_norm_per_seed=finals,
                               final_clip_norm_mean=statistics.mean(finals) if finals
                               else None)
            if setup is None and privs[0] and privs[0]["sampling"] == "poisson" and (
                    privs[0]["noise_multiplier"] > 0):
                setup = {"num_clients_per_seed": row["num_clients_per_seed"],
                         "clients_per_round": row["clients_per_round"],
                         "sampling_probability_per_seed": row["sampling_probability_per_seed"],
                         "seeds": row["seeds"], "from_run": s["key"]}
        rows.append(row)

    throughput = None
    if args.repeats > 0:
        print("throughput: compiling the rounds ...", flush=True)
        ref = next((r for r in rows if r["key"] == "dpfedavg_poisson_z1"
                    and 0 in r.get("seeds", []) and "static_cohort_size_per_seed" in r), None)
        slots = (ref["static_cohort_size_per_seed"][ref["seeds"].index(0)] if ref else None)
        throughput = measure_throughput(args, slots)
        for k, v in throughput["variants"].items():
            print(f"  {v['what']:80s} {v['median_s'] * 1e3:7.2f} ms "
                  f"{v['clients_per_s']:9,.0f} clients/s", flush=True)
        for k, v in throughput["ratios"].items():
            print(f"  ratio {k:36s} {v['median_clients_per_s_ratio']:.2f} "
                  f"(IQR {v['q1']:.2f}-{v['q3']:.2f})", flush=True)
    machine = tp.machine_info()
    source_at_end = source_state()
    if source_at_end != source_at_start:
        print(f"WARNING: the repository changed during the benchmark: {source_at_start} at "
              f"the start, {source_at_end} at the end (every process imported the engine "
              "at the start)", flush=True)
    runtime = time.perf_counter() - t_start
    res = {"machine": machine, "command": " ".join(
               ["python benchmarks/dp_tradeoff.py"] + (sys.argv[1:] if argv is None else argv)),
           "base_config": str(BASE_CONFIG.relative_to(REPO)), "args": vars(args),
           "source_at_start": source_at_start, "source_at_end": source_at_end,
           "source_changed_during_run": source_at_end != source_at_start,
           "seeds": seeds, "setup": setup or {}, "runtime_s": runtime,
           "runs_s": runs_s, "rows": rows, "throughput": throughput}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dp_tradeoff.json").write_text(json.dumps(res, indent=1))
    (out / "dp_tradeoff.md").write_text(markdown(res))
    plot(res, out / "dp_tradeoff.png")
    print(markdown(res))
    print(f"runtime {runtime / 60:.1f} min (runs {runs_s / 60:.1f} min); wrote "
          f"{out / 'dp_tradeoff.json'}, .md, .png", flush=True)
    for r in rows:
        if r.get("warning"):
            print("WARNING", r["label"], r["warning"])
        for e in r.get("errors", []):
            print("ERROR", r["label"], e)


if __name__ == "__main__":
    main()
