"""``fedjax-lite`` command line: a thin shell over the runner.

    fedjax-lite run CONFIG --out DIR [--set key.path=value ...] [--resume] [--no-progress]
                    [--coordinator HOST:PORT --num-processes N --process-id I]
                    [--heartbeat-timeout S]
    fedjax-lite compare CONFIG --algorithms a,b [--aggregators x,y] [--seeds 3]
                        [--target-accuracy 0.8] [--set ...] --out DIR
    fedjax-lite prepare CONFIG --out DIR [--set ...]
    fedjax-lite sweep CONFIG --grid key.path=v1,v2 [--grid ...] [--seeds 0,1,2]
                      [--set ...] --out DIR [--resume]
    fedjax-lite privacy --rounds R --sampling-rate q --noise-multiplier z --delta d
                        [--sampling poisson|fixed --population K] [--accountant rdp|pld]
                        [--target-epsilon e] [--neighboring ...] [--json]

Exit codes: 0 done; 2 bad config or data (one line naming the key / file / client);
3 divergence (non-finite loss; last good state checkpointed); 130 / 143 interrupted by
SIGINT / SIGTERM (the last finished round checkpointed: continue with --resume);
4 a multi-process run lost a process or could not start (one line naming it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

T0 = time.perf_counter()     # the process's wall time starts (about) here
CACHE_HELP = ("do not use JAX's persistent compilation cache (on by default, in "
              "$FEDJAX_LITE_COMPILE_CACHE or ~/.cache/fedjax_lite/jax; a second run of the "
              "same shapes then loads its programs instead of compiling them)")


def _add_overrides(parser: argparse.ArgumentParser,
                   help: str = "override a config value (repeatable)") -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY.PATH=VALUE", help=help)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedjax-lite",
                                description="Federated learning simulation in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one experiment from a YAML config")
    r.add_argument("config", help="path to a YAML config")
    r.add_argument("--out", required=True, help="output folder")
    _add_overrides(r)
    r.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    r.add_argument("--no-compile-cache", action="store_true", help=CACHE_HELP)
    d = r.add_argument_group(
        "several processes (jax.distributed)", "\n".join((
            "one process per host or GPU, all with the same CONFIG and --out (a shared",
            "folder); the client mesh spans every process's devices, process 0 writes",
            "the outputs. Under SLURM (srun), mpirun and on Cloud TPU pods JAX finds",
            "these values in the environment (also JAX_COORDINATOR_ADDRESS): no flags")))
    d.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="address of process 0, which serves the coordination service")
    d.add_argument("--num-processes", metavar="N", type=int, default=None,
                   help="how many processes take part")
    d.add_argument("--process-id", metavar="I", type=int, default=None,
                   help="this process's index, 0 .. N-1")
    d.add_argument("--heartbeat-timeout", metavar="S", type=float, default=30.0,
                   help="seconds without a heartbeat after which a process counts as lost "
                        "and the others stop (exit 4) naming it (default 30)")
    c = sub.add_parser("compare", help="run several algorithms/aggregators on identical "
                                       "data and cohorts, over seeds")
    c.add_argument("config", help="path to a YAML config (the shared settings)")
    c.add_argument("--algorithms", required=True, help="comma-separated, e.g. fedavg,fedprox")
    c.add_argument("--aggregators", default=None, help="comma-separated, e.g. mean,median")
    c.add_argument("--seeds", type=int, default=1, help="seeds per method (seed, seed+1, ...)")
    c.add_argument("--target-accuracy", type=float, default=None,
                   help="report rounds to reach this eval accuracy")
    c.add_argument("--out", required=True, help="output folder")
    _add_overrides(c)
    c.add_argument("--no-progress", action="store_true", help="hide progress bars")
    c.add_argument("--no-compile-cache", action="store_true", help=CACHE_HELP)
    c.add_argument("--resume", action="store_true",
                   help="continue a comparison in --out: finished runs are kept, "
                        "interrupted ones continue from their checkpoints")
    pr = sub.add_parser("prepare", help="write a config's population as memory-mapped "
                                        ".npy files (data.storage: mmap)")
    pr.add_argument("config", help="path to a YAML config (its data section is used)")
    pr.add_argument("--out", required=True,
                    help="the folder to write; runs read it with data.prepared: DIR")
    _add_overrides(pr)
    w = sub.add_parser("sweep", help="run a grid of configurations x seeds; members that "
                                     "differ only in numeric hyper-parameters and seeds "
                                     "run as ONE vmapped program",
                       description="Runs every member of the grid x seeds and writes "
                                   "comparison.md / comparison.json / curves.png (mean +- "
                                   "std over seeds, the best configuration). A member that "
                                   "diverges stops alone (listed in comparison.md) and the "
                                   "sweep still exits 0; a bad grid value exits 2 naming "
                                   "the member and key before anything runs.")
    w.add_argument("config", help="path to a YAML config (the shared settings)")
    w.add_argument("--grid", action="append", default=[], metavar="KEY.PATH=V1,V2,...",
                   help="a swept key and its comma-separated values, each parsed as YAML "
                        "(repeatable; the members are the cartesian product). Learning "
                        "rates, momentum, algorithm.mu, aggregator.clip_norm / "
                        "noise_multiplier / max_norm are vmapped; other keys split the "
                        "members into groups")
    w.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="comma-separated seeds, e.g. 0,1,2 (default: the config's seed); "
                        "seeds share one program when the data's seed is fixed "
                        "(--set data.seed=0)")
    w.add_argument("--out", required=True, help="output folder: members/NAME/ per member, "
                                                "comparison.md/.json, curves.png")
    _add_overrides(w, "override a config value for every member (repeatable)")
    w.add_argument("--no-progress", action="store_true", help="hide progress bars")
    w.add_argument("--no-compile-cache", action="store_true", help=CACHE_HELP)
    w.add_argument("--resume", action="store_true",
                   help="continue a sweep in --out: finished members are kept, groups and "
                        "members continue from their checkpoints")
    v = sub.add_parser("privacy", help="epsilon of DP-FedAvg (or the noise multiplier for "
                                       "a target epsilon), accounted with dp-accounting")
    v.add_argument("--rounds", type=int, required=True, help="rounds (compositions)")
    v.add_argument("--sampling-rate", type=float, required=True,
                   help="q: per-round inclusion probability (poisson) or C/K (fixed)")
    v.add_argument("--noise-multiplier", type=float, default=None,
                   help="z: noise std / clip norm (or give --target-epsilon)")
    v.add_argument("--target-epsilon", type=float, default=None,
                   help="solve for the smallest noise multiplier reaching this epsilon")
    v.add_argument("--delta", type=float, required=True)
    v.add_argument("--sampling", choices=("poisson", "fixed"), default="poisson")
    v.add_argument("--population", type=int, default=None,
                   help="K, the number of clients (required for --sampling fixed)")
    v.add_argument("--accountant", choices=("rdp", "pld"), default="rdp")
    v.add_argument("--neighboring", choices=("add_remove", "zero_out", "replace_one"),
                   default=None, help="default: add_remove (poisson), replace_one (fixed)")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    _document(p, sub)
    return p


EXIT_CODES = ("0 done; 2 bad config, data or input (one line naming the key, file or "
              "path); 3 diverged (non-finite loss; the last good state is checkpointed); "
              "130 / 143 interrupted by SIGINT / SIGTERM (the last finished round is "
              "checkpointed: continue with --resume); 4 a multi-process run lost a process "
              "or could not start (one line naming it)")


def _document(p: argparse.ArgumentParser, sub) -> None:
    """``--version``, and what run / compare accept and how they exit, in their --help."""
    import textwrap

    from fedjax_lite import __version__
    from fedjax_lite.experiment import config_schema as schema
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.epilog = "exit codes: " + EXIT_CODES
    lists = [("algorithms (algorithm.name)", schema.ALGORITHMS),
             ("aggregators (aggregator.name)", schema.AGGREGATORS),
             ("data kinds (data.kind)", tuple(schema.DATA_KINDS)),
             ("models (model.kind)", tuple(schema.MODEL_KINDS)),
             ("exit codes", (EXIT_CODES,))]
    epilog = "\n".join(textwrap.fill(f"{title}: {', '.join(names)}", 88,
                                     subsequent_indent="  ") for title, names in lists)
    for name in ("run", "compare", "sweep"):
        sub.choices[name].epilog = epilog
        sub.choices[name].formatter_class = argparse.RawDescriptionHelpFormatter


def privacy_command(args) -> int:
    """``fedjax-lite privacy``: prints epsilon (or the calibrated noise multiplier)."""
    from fedjax_lite.privacy import accounting

    def fail(msg: str) -> int:
        print(f"fedjax-lite privacy: {msg}", file=sys.stderr)
        return 2

    if args.rounds < 0:
        return fail(f"--rounds must be >= 0, got {args.rounds}")
    if not 0 < args.sampling_rate <= 1:
        return fail(f"--sampling-rate must be in (0, 1], got {args.sampling_rate}")
    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        return fail("give exactly one of --noise-multiplier and --target-epsilon")
    if args.sampling == "fixed":
        if not args.population or args.population < 1:
            return fail("--sampling fixed needs --population K (the number of clients)")
        population = args.population
        cohort = round(args.sampling_rate * population)
        if cohort < 1 or abs(cohort - args.sampling_rate * population) > 1e-6 * population:
            return fail(f"--sampling-rate {args.sampling_rate} x --population {population} "
                        "is not a whole cohort size")
    else:   # Poisson: only q matters; express it as C/K on a large population
        population = args.population or 10 ** 9
        cohort = args.sampling_rate * population
    setup = accounting.PrivacySetup(
        noise_multiplier=args.noise_multiplier or 1.0, population=population,
        cohort_size=cohort, sampling=args.sampling,
        neighboring=args.neighboring or accounting.default_neighboring(args.sampling),
        accountant=args.accountant)
    try:
        if args.target_epsilon is not None:
            z = accounting.calibrate(setup, args.rounds, args.delta, args.target_epsilon)
            from dataclasses import replace
            setup = replace(setup, noise_multiplier=z)
        eps = accounting.epsilon(setup, args.rounds, args.delta)
    except accounting.AccountingError as e:
        return fail(str(e))
    out = {"epsilon": eps, "delta": args.delta, "noise_multiplier": setup.noise_multiplier,
           "rounds": args.rounds, "sampling": args.sampling,
           "sampling_rate": args.sampling_rate, "neighboring": setup.neighboring,
           "accountant": args.accountant}
    if args.json:
        print(json.dumps(out))
    else:
        what = (f"noise_multiplier = {setup.noise_multiplier:.6g} reaches "
                if args.target_epsilon is not None else "")
        print(f"{what}epsilon = {eps:.6g} at delta = {args.delta:g} after {args.rounds} rounds"
              f" ({accounting.describe(setup)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "privacy":
        return privacy_command(args)
    from fedjax_lite.experiment.host import configure_host, enable_compile_cache
    configure_host()
    enable_compile_cache(not getattr(args, "no_compile_cache", False))
    errors: list[str] = []
    try:
        code = _main(args, errors)
    except BaseException as e:           # a bug (traceback): the other processes stop too
        from fedjax_lite.experiment import distributed
        if distributed.processes_started() > 1:
            if not isinstance(e, SystemExit):
                distributed.await_verdict()  # ... or a collective failed: a peer died
                import traceback
                traceback.print_exc()
            distributed.leave(1, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
        raise
    from fedjax_lite.experiment import distributed
    if code == 0 or code >= 128:         # done, or a signal every process stopped on
        distributed.finish()
    else:                                # this process's error: the others stop at once
        distributed.leave(code, errors[-1] if errors else f"exit {code}")
    return code


def _main(args, errors: list[str]) -> int:
    """The run / compare command; returns the exit code (messages appended to
    ``errors`` are also printed, one line each)."""
    from fedjax_lite.experiment import config as cfg
    from fedjax_lite.experiment import distributed

    def fail(code: int, message: str) -> int:
        errors.append(message)
        prefix = ("fedjax-lite" if distributed.processes_started() < 2 else
                  f"fedjax-lite [process {distributed.process_index()}]")
        print(f"{prefix}: {message}", file=sys.stderr)
        return code

    # several processes join first: an error one of them finds below (its config, data,
    # output folder) then stops the others at once, naming it
    several = distributed.wanted(getattr(args, "coordinator", None),
                                 getattr(args, "num_processes", None),
                                 getattr(args, "process_id", None))
    if several and args.command in ("compare", "sweep"):
        return fail(2, f"{args.command} runs within one process; launch it once, not under "
                       "srun / mpirun with several tasks")
    if several:
        try:
            distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   heartbeat_timeout=args.heartbeat_timeout)
        except distributed.DistributedError as e:
            return fail(e.exit_code, f"distributed: {e}")
    try:
        raw = cfg.load_raw(args.config)
        for assignment in args.overrides:
            cfg.set_override(raw, assignment)
        config = _validate(args, raw)
    except cfg.OutputError as e:
        return fail(2, f"output folder: {e}")
    except cfg.ConfigError as e:
        return fail(2, f"config error: {e}")

    from fedjax_lite.experiment.checkpoint import CheckpointError
    from fedjax_lite.experiment.interrupt import Interrupted, handling
    from fedjax_lite.experiment.runner import DataError, DivergenceError, SamplingError

    try:
        with handling() as interrupts:
            interrupts.on_exit = distributed.leave
            summary = _dispatch(args, raw, config, interrupts)
        if summary is None:                   # compare printed its table
            return 0
    except Interrupted as e:
        fail(e.exit_code, f"interrupted after round {e.round}; continue with --resume "
                          f"(--out {args.out})")
        return e.exit_code
    except cfg.OutputError as e:
        return fail(2, f"output folder: {e}")
    except CheckpointError as e:
        return fail(2, f"checkpoint: {e}")
    except cfg.ConfigError as e:
        return fail(2, f"config error: {e}")
    except DataError as e:
        return fail(2, f"data error: {e}")
    except SamplingError as e:
        return fail(2, f"sampling: {e}")
    except DivergenceError as e:
        return fail(3, f"diverged: {e}")
    except OSError as e:
        if not _under(getattr(e, "filename", None), args.out):
            raise
        return fail(2, f"output folder: cannot write {e.filename}: {e.strerror or e}")
    if not distributed.is_primary():          # process 0 reports the run
        return 0
    final = summary["final"]
    ranked = {k: final[k] for k in ("eval_hr10", "eval_ndcg10", "eval_hr10_full",
                                    "eval_ndcg10_full") if k in final}
    headline = ({"eval_rmse": final.get("eval_rmse"), "eval_mae": final.get("eval_mae"),
                 **ranked} if "eval_rmse" in final else ranked if ranked
                else {"eval_accuracy": final.get("eval_accuracy")})
    if "eval_personal_accuracy" in final:          # ditto: its personal models too
        headline["eval_personal_accuracy"] = final["eval_personal_accuracy"]
    print(json.dumps({"round": final.get("round"), **headline,
                      "eval_loss": final.get("eval_loss"),
                      "clients_per_s": summary["clients_per_s"],
                      "train_s": round(summary["train_s"], 2),
                      "wall_s": round(time.perf_counter() - T0, 2), "out": args.out}))
    return 0


def _validate(args, raw: dict):
    """The checks that need no data, before anything is compiled or written: the run's
    config (compare's plan validates every method's), --target-accuracy, the static
    cohort (krum), the host memory of a synthetic population, --out. Returns the run's
    Config (None for compare)."""
    from fedjax_lite.experiment import config as cfg
    from fedjax_lite.experiment import config_checks
    config = None
    if args.command == "sweep":       # every member validated; the folder's resume rule
        from fedjax_lite.experiment import sweep
        sweep.check_out(args.out, sweep.plan(raw, args.grid, args.seeds), args.resume)
    elif args.command == "compare":
        target = args.target_accuracy
        if target is not None and not 0 < target <= 1:
            raise cfg.ConfigError(f"--target-accuracy must be in (0, 1], got {target:g}")
    else:
        config = cfg.parse(raw)
        config_checks.check_config_cohort(config)
        config_checks.check_population_memory(config)
    config_checks.check_out_dir(args.out)
    return config


def _under(path, folder: str) -> bool:
    """Whether ``path`` (an OSError's filename) lies in ``folder`` (or is it)."""
    import os
    if not isinstance(path, str) or not folder:
        return False
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep) or \
        folder.startswith(path.rstrip(os.sep) + os.sep)


def _dispatch(args, raw: dict, config, interrupts):
    """Runs the command; returns the run's summary (None for compare, which prints)."""
    from fedjax_lite.experiment.runner import run
    if args.command == "prepare":
        from fedjax_lite.experiment.runner import DataError
        from fedjax_lite.experiment.storage import prepare
        try:
            print(json.dumps(prepare(config, args.out)))
        except (ValueError, FileNotFoundError) as e:
            raise DataError(str(e)) from e
        return None
    if args.command == "sweep":
        from fedjax_lite.experiment.sweep import sweep
        from fedjax_lite.experiment.sweep_report import report_markdown
        doc = sweep(raw, args.out, grids=args.grid, seeds=args.seeds,
                    progress=not args.no_progress, interrupts=interrupts, resume=args.resume)
        print(report_markdown(doc), end="")
        return None
    if args.command == "compare":
        from fedjax_lite.experiment.compare import compare, markdown_table
        split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None
        doc = compare(raw, args.out, algorithms=split(args.algorithms) or [],
                      aggregators=split(args.aggregators), seeds=args.seeds,
                      target_accuracy=args.target_accuracy, progress=not args.no_progress,
                      interrupts=interrupts, resume=args.resume)
        print(markdown_table(doc["table"], args.target_accuracy, args.seeds,
                             doc["metrics"]), end="")
        return None
    return run(config, args.out, resume=args.resume, progress=not args.no_progress,
               interrupts=interrupts)


if __name__ == "__main__":
    sys.exit(main())
