"""Runs one experiment: data -> compiled round -> rounds loop -> outputs.

Per-round randomness: ``init_key, run_key = split(key(seed))``; round r (0-based) uses
``fold_in(run_key, r)``, so a resumed run replays exactly the rounds an uninterrupted
one would.

Outputs in ``out_dir``: ``config.yaml`` (resolved), ``metrics.jsonl`` (round 0, every
``eval_every`` rounds and the last round), ``summary.json``, ``curves.png``,
``params.npz``, ``checkpoints/``.

With several processes (``jax.distributed``, :mod:`.distributed`) every process calls
:func:`run` alike: the mesh spans all processes' devices, every process computes every
round, process 0 alone writes the files above (all take part in checkpoints).
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time

import jax
import yaml

from fedjax_lite.core import Sampling, build_round, build_rounds, round_key
from fedjax_lite.core import client_state
from fedjax_lite.core.round import build_cohort_round
from fedjax_lite.core.sampling import build_sampler
from fedjax_lite.data import check_cohort_size
from fedjax_lite.experiment import config as cfg
from fedjax_lite.experiment import build_recsys, distributed, storage
from fedjax_lite.experiment.builders import (apply_label_attack, build_algorithm, build_data,
                                             build_model, cohort_bound, engine_options)
from fedjax_lite.experiment.blocks import RoundSource, all_finite
from fedjax_lite.experiment.checkpoint import CheckpointError, Checkpointer, check_resume
from fedjax_lite.experiment.config_schema import OutputError
from fedjax_lite.experiment.evaluation import Evaluation
from fedjax_lite.experiment.interrupt import Interrupted, Interrupts
from fedjax_lite.experiment.outputs import (MetricsWriter, NullWriter, plot_curves,
                                            read_metrics, save_params, save_per_user,
                                            write_json)
from fedjax_lite.experiment.window import EMPTY as EMPTY_WINDOW
from fedjax_lite.experiment.window import add_round, metrics_row


class DataError(ValueError):
    """Bad input data (file, client, example named in the message)."""


class SamplingError(RuntimeError):
    """A Poisson draw exceeded the static cohort bound (the round is discarded)."""


class DivergenceError(RuntimeError):
    """A non-finite loss; the last good state is checkpointed before this is raised."""


def run(config: cfg.Config, out_dir: str, *, resume: bool = False,
        progress: bool = True, interrupts: Interrupts | None = None) -> dict:
    """Runs ``config``, writing outputs to ``out_dir``; returns the summary dict.

    Raises:
      ConfigError (bad config / resume mismatch), DataError (bad data),
      DivergenceError (non-finite loss), FileNotFoundError (missing files),
      OutputError (the output folder), CheckpointError (no usable checkpoint),
      Interrupted (a signal in ``interrupts``: the last finished round is checkpointed).
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"--out {out_dir} is a file, not a folder")
    config_path = os.path.join(out_dir, "config.yaml")
    resolved = cfg.to_dict(config)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    # nothing is created before validation passes: the checkpoint folder is opened only
    # if it exists, and created after the run's data, model and program are built
    ckpt = Checkpointer(ckpt_dir, create=False) if os.path.isdir(ckpt_dir) else None
    latest = ckpt.latest_round() if ckpt is not None else None
    if not resume and latest is not None:
        raise OutputError(f"{out_dir} already holds a run (checkpoints up to round "
                          f"{latest}); pass --resume to continue it or choose another "
                          "--out (nothing was overwritten)")
    if resume:
        check_resume(config, resolved, config_path, latest)
    recommender = config.algorithm.name in cfg.RECOMMENDATION_ALGORITHMS
    try:
        if recommender:
            rec_data = build_recsys.build_ratings_data(config)
            train, test = rec_data.train, rec_data.test
        elif (storage.requested(config) == "mmap" or config.data.kind == "prepared"
              or getattr(config.data, "prepared", None)):
            train, test = storage.load(config, out_dir, lambda: build_data(config))
            check_cohort_size(train, config.algorithm.clients_per_round)
        else:
            train, test = build_data(config)
    except cfg.ConfigError:           # the data contradicts a key (e.g. model.num_classes)
        raise
    except (ValueError, FileNotFoundError) as e:
        raise DataError(str(e)) from e
    where_data = storage.resolve(config, train)   # device | host | mmap
    if config.algorithm.name == "ditto" and test.num_clients != train.num_clients:
        raise DataError(f"ditto evaluates client k's personal model on test client k, but "
                        f"the test data has {test.num_clients} clients and the training "
                        f"data {train.num_clients}"
                        + (f" ({config.data.test_path})" if getattr(
                            config.data, "test_path", None) else ""))
    if where_data != "device" and config.algorithm.name in storage.DEVICE_ONLY:
        raise cfg.ConfigError(
            f"config key 'data.storage': {where_data} storage is available to fcf among "
            f"the recommenders (its private factors follow the ratings to the host); "
            f"{config.algorithm.name} evaluates from the whole population: use device")
    if where_data != "device" and config.engine.compile_rounds > 1:
        raise cfg.ConfigError(
            f"config key 'engine.compile_rounds': {config.engine.compile_rounds} rounds "
            f"per program need the population on the device (data.storage is "
            f"{where_data}{' (auto)' if storage.requested(config) == 'auto' else ''}); "
            "set data.storage: device or engine.compile_rounds: 1")
    train = apply_label_attack(config, train)
    K, C = train.num_clients, config.algorithm.clients_per_round
    sampling_kind = config.algorithm.sampling
    ledger, setup = None, None
    if config.is_private:       # (dp-accounting is imported only for DP runs)
        from fedjax_lite.experiment import privacy_run
        _, setup = privacy_run.resolve(config, K)
        ledger = privacy_run.Ledger(setup, config.privacy.delta,
                                    config.privacy.target_epsilon)
    bound, overflow_p = cohort_bound(config, K, ledger)
    check_static_cohort(config, bound)
    init_key, run_key = jax.random.split(jax.random.key(config.seed))
    engine = distributed.spread(engine_options(config.engine, train.n))
    if where_data == "device":
        engine = engine._replace(population_sharded=storage.shard_population(
            config, train, engine, recommender))
    primary, several = distributed.is_primary(), distributed.processes() > 1
    progress = progress and primary
    try:
        if recommender:
            model = build_recsys.build_mf(config, train)
            algorithm = build_recsys.build_recommender(config, model, engine, train=train,
                                                       init_key=init_key, privacy=setup)
        else:
            model = build_model(config, train.feature_shape)
            algorithm = build_algorithm(config, model, engine, num_clients=K, privacy=setup)
    except cfg.ConfigError:           # a builder's check that names the config key
        raise
    except ValueError as e:           # a builder's argument check (names the argument)
        raise cfg.ConfigError(f"config: {e}") from None
    # same config everywhere; every process has checked the folder before any writes
    distributed.check_same_config(resolved)
    # the population lives on the device(s) for the whole run (replicated over the mesh);
    # put: host values to there; jit: every output replicated (each process reads them)
    where, put, jit = distributed.placement(engine.mesh)
    os.makedirs(out_dir, exist_ok=True)
    if primary:
        with open(config_path, "w") as f:
            yaml.safe_dump(resolved, f, sort_keys=False)
    if ckpt is None:
        ckpt = Checkpointer(ckpt_dir)
    ckpt.sharding = where      # restores onto this run's devices, whatever saved it

    if config.is_private and config.privacy.secure_mode:
        run_key = distributed.from_primary(
            lambda: privacy_run.secret_run_key(ckpt.directory, resume))
    sampling = Sampling(sampling_kind, bound if sampling_kind == "poisson" else None,
                        run_key if sampling_kind == "epochs" else None)
    state = algorithm.init(model.init_global(init_key) if recommender else model.init(init_key))
    if several:                # global arrays, identical in every process
        state = put(state)
    on_device = where_data == "device"
    population = None
    if on_device:
        population = (storage.put_sharded(train, engine.mesh) if engine.population_sharded
                      else put(train.arrays()))

    t0 = time.perf_counter()
    if progress:
        print("fedjax-lite: compiling the round and the evaluation (kept in the compilation "
              "cache for later runs of these shapes) ...", file=sys.stderr, flush=True)
    host_rounds = None
    if on_device:
        one_round = build_round(algorithm, num_clients=K, clients_per_round=C,
                                sampling=sampling)
        round_fn = jit(one_round).lower(state, population, round_key(run_key, 0)).compile()
        step = lambda st, r: round_fn(st, population, round_key(run_key, r))
    else:      # host / mmap: the cohort is drawn on the device, gathered on the host
        host_rounds = storage.HostRounds(
            train, build_sampler(num_clients=K, clients_per_round=C, sampling=sampling),
            put, run_key, config.rounds, jit)
        host_rounds.cohort_round = jit(build_cohort_round(algorithm, num_clients=K)).lower(
            *host_rounds.inputs(state, host_rounds.first(0))).compile()
        step = host_rounds
    block_fn = None                   # engine.compile_rounds: K rounds per program
    if config.engine.compile_rounds > 1:
        block_fn = jit(build_rounds(one_round, config.engine.compile_rounds)).lower(
            state, population, run_key, 0).compile()
    evaluation = Evaluation(config, model, state, engine=engine, where_data=where_data,
                            train=train, test=test, population=population, put=put, jit=jit,
                            init_key=init_key, rec_data=rec_data if recommender else None)
    compile_s = time.perf_counter() - t0
    if progress:
        print(f"fedjax-lite: compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)

    start, elapsed_before = 0, 0.0
    writer_keep = None
    window = dict(EMPTY_WINDOW)
    if resume:
        start, state, _, meta = ckpt.restore(state, run_key)
        if others := distributed.differing([start, meta.get("state_sha256")]):
            raise CheckpointError(f"process(es) {others} restored another checkpoint than "
                                  f"process 0 (round {start}): is {ckpt.directory} the "
                                  "same folder, fully visible, on every host?")
        for bad, why in ckpt.skipped if primary else ():
            print(f"fedjax-lite: checkpoint of round {bad} is unusable ({why}); moved to "
                  f"{os.path.join(out_dir, 'checkpoints_unusable')}", file=sys.stderr)
        if ckpt.skipped and primary:
            print(f"fedjax-lite: resuming from round {start}, the newest usable checkpoint",
                  file=sys.stderr)
        elapsed_before = float(meta.get("wall_s", 0.0))
        window = dict(meta.get("window", window))
        writer_keep = start
    writer = (MetricsWriter(os.path.join(out_dir, "metrics.jsonl"), keep_until=writer_keep)
              if primary else NullWriter())
    t_start = time.perf_counter()

    def wall() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def save(round_num: int, st, window: dict) -> None:
        # the metrics window travels with the state, so a resumed run writes the same rows
        ckpt.save(round_num, st, run_key, {"round": round_num, "wall_s": wall(),
                                           "seed": config.seed, "window": window})

    def eval_row(round_num: int, st, window: dict) -> dict:
        ev = evaluation.metrics(st)
        if not math.isfinite(ev["eval_loss"]):
            raise DivergenceError(f"non-finite eval loss at round {round_num}")
        row = metrics_row(window, round_num, ev, wall(), C, show_loss, ledger)
        writer.write(row)
        return row

    # a DP run logs nothing computed from client data outside the mechanism (privacy_run)
    show_loss = not config.is_private or config.privacy.nonprivate_diagnostics
    total = {"rounds": 0, "time": 0.0}
    last_row = None
    if start == 0:
        last_row = eval_row(0, state, window)
    bar = progress_bar(config.rounds, start, progress)
    last_saved = start if resume else None
    if interrupts is not None:
        interrupts.out_dir = out_dir
        interrupts.phase = "training"
    # a signal stops every process after the same round (one all-gather per round)
    stop_signal = (lambda: None) if interrupts is None else (
        lambda: distributed.agreed_signal(interrupts.requested))
    source = RoundSource(
        step, block_fn, config.engine.compile_rounds, config.rounds, population,
        run_key, allow=lambda r, k: ledger is None or not ledger.would_exceed(r + k),
        boundary=lambda d: d % config.eval_every == 0 or d == config.rounds or bool(
            config.checkpoint_every and d % config.checkpoint_every == 0),
        params_checked=not show_loss)
    try:
        for r in range(start, config.rounds):
            # inside a compiled block the intermediate states exist only on the device:
            # signals and the budget are acted on at block boundaries
            if not source.in_block and (signum := stop_signal()) is not None:
                if last_saved != r:
                    save(r, state, window)
                raise Interrupted(signum, r)
            if not source.in_block and ledger is not None and ledger.would_exceed(r + 1):
                save(r, state, window)
                raise cfg.ConfigError(f"privacy budget: round {r + 1} would exceed "
                                      f"target epsilon {ledger.target}; stopped after "
                                      f"round {r} (checkpointed)")
            new_state, metrics, dt = source.next(state, r)
            loss = float(metrics["train_loss"])
            discard = (host_rounds.undo_last if host_rounds is not None
                       else lambda: None)       # host client state: unwrite the round
            if float(metrics.get("sampling_overflow", 0.0)) > 0:
                discard()
                save(r, state, window)
                raise SamplingError(
                    f"round {r + 1}: Poisson sampling drew more than the static cohort "
                    f"bound of {bound} clients (probability {overflow_p:.2g} per round); "
                    f"the round was discarded and the state after round {r} checkpointed; "
                    "raise algorithm.max_cohort_size")
            # DP runs judge divergence by the released model (post-processing), not by a
            # loss over client data that would single a client out
            finite = (all_finite(new_state.params) if not show_loss
                      else math.isfinite(loss))
            if not finite:
                discard()
                save(r, state, window)
                raise DivergenceError(
                    f"non-finite {'model' if not show_loss else 'training loss'} in round "
                    f"{r + 1}; stopped, the last good state (after round {r}) is "
                    f"checkpointed in {ckpt.directory}")
            state, done = new_state, r + 1
            window, silent = add_round(window, metrics, loss, dt, config, show_loss)
            if silent and primary:
                bar.write(f"round {done}: no sampled client reported; model unchanged")
            total = {"rounds": total["rounds"] + 1, "time": total["time"] + dt}
            if done % config.eval_every == 0 or done == config.rounds:
                last_row = eval_row(done, state, window)
                window = dict(EMPTY_WINDOW)
                shown = ({"loss": f"{loss:.4f}", "last_round_cps": f"{C / dt:,.0f}"}
                         if show_loss
                         else {"eps": f"{last_row.get('epsilon') or float('inf'):.3g}"})
                main_metric = ("eval_accuracy" if not recommender else "eval_rmse"
                               if "eval_rmse" in last_row else "eval_hr10")
                shown[main_metric[5:]] = f"{last_row[main_metric]:.4f}"
                bar.set_postfix(**shown, refresh=False)
            if config.checkpoint_every and done % config.checkpoint_every == 0:
                save(done, state, window)
                last_saved = done
            bar.update(1)
        if (signum := stop_signal()) is not None:            # during the last round
            if last_saved != config.rounds:
                save(config.rounds, state, window)
            raise Interrupted(signum, config.rounds)
    finally:
        bar.close()
        if host_rounds is not None:
            host_rounds.close()
        if interrupts is not None:
            interrupts.phase = "setup"        # writing outputs: a signal exits at once
    if last_saved != config.rounds:
        save(config.rounds, state, window)
    ckpt.close()
    if not primary:           # process 0 writes the outputs (every process has them)
        return {"rounds": config.rounds, "final": dict(last_row or {}), "wall_s": wall(),
                "train_s": total["time"], "process": jax.process_index()}

    save_params(os.path.join(out_dir, "params.npz"), state.params)
    if recommender and show_loss and evaluation.per_user is not None:
        # per-user held-out errors at the last evaluation (diagnostics: a user's own
        # numbers, not released by the server; never written for a strict DP run)
        save_per_user(os.path.join(out_dir, "per_user.npz"), evaluation.per_user,
                      rec_data.train.user_ids)
    rows = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    last_row = rows[-1] if rows else last_row
    summary = {
        "rounds": config.rounds,
        "final": dict(last_row or {}),
        "wall_s": wall(),
        # time in the rounds themselves (this process), without compiling, evaluating
        # and writing; wall_s counts from the end of compilation (and across resumes)
        "train_s": total["time"],
        "clients_per_s": (C * total["rounds"] / total["time"]) if total["rounds"] else None,
        "compile_s": compile_s,
        "seed": config.seed,
        "clients_per_round": C,
        "num_clients": train.num_clients,
        # example counts are facts about client data: not in a DP run's summary
        **({"num_train_examples": train.num_examples,
            "num_test_examples": test.num_examples} if show_loss else {}),
        "resumed_from_round": start if resume else None,
        "storage": where_data,
        "population_sharded": bool(engine.population_sharded),
        # where population-sized client state (control variates, residuals, ...) lived
        "client_state": (None if not any(getattr(state, f, None) is not None
                                         for f in client_state.FIELDS)
                         else "device" if on_device else "host"),
        "sampling": {"kind": sampling_kind, "static_cohort_size": bound,
                     "overflow_probability_per_round": overflow_p},
        **({} if ledger is None else {"privacy": ledger.summary(config, config.rounds)}),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "processes": jax.process_count(),
        "python": platform.python_version(),
    }
    write_json(os.path.join(out_dir, "summary.json"), summary)
    plot_curves(os.path.join(out_dir, "curves.png"), rows,
                title=f"{config.algorithm.name} on {config.data.kind}")
    return summary


def check_static_cohort(config: cfg.Config, cohort: int) -> None:
    """Aggregator settings that depend on the static cohort size, checked before anything
    compiles or is written (ConfigError naming the key)."""
    from fedjax_lite.experiment.config_checks import check_robust_cohort
    check_robust_cohort(config, cohort)          # krum / multi_krum
    g = config.aggregator
    if g.name not in ("secure_mean", "dp_secure_mean"):
        return
    from fedjax_lite.privacy import secagg
    try:
        secagg.check_bits(g.bits, cohort)
        secagg.check_graph(g.neighbors, cohort)
        if g.min_survivors is not None:
            secagg.check_min_survivors(g.min_survivors, cohort)
    except ValueError as e:
        raise cfg.ConfigError(f"config key {e}") from None


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "rounds"):
    """The rounds' progress bar on stderr (also a sweep group's)."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc,
                unit="round", dynamic_ncols=True, mininterval=0.5)


__all__ = ["DataError", "DivergenceError", "OutputError", "SamplingError", "run"]
