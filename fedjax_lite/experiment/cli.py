"""``fedjax-lite`` command line: a thin shell over the runner.

    fedjax-lite run CONFIG --out DIR [--set key.path=value ...] [--resume] [--no-progress]
    fedjax-lite compare CONFIG --algorithms a,b [--aggregators x,y] [--seeds 3]
                        [--target-accuracy 0.8] [--set ...] --out DIR

Exit codes: 0 done; 2 bad config or data (one line naming the key / file / client);
3 divergence (non-finite loss; last good state checkpointed).
"""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedjax-lite",
                                description="Federated learning simulation in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one experiment from a YAML config")
    r.add_argument("config", help="path to a YAML config")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY.PATH=VALUE", help="override a config value (repeatable)")
    r.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    c = sub.add_parser("compare", help="run several algorithms/aggregators on identical "
                                       "data and cohorts, over seeds")
    c.add_argument("config", help="path to a YAML config (the shared settings)")
    c.add_argument("--algorithms", required=True, help="comma-separated, e.g. fedavg,fedprox")
    c.add_argument("--aggregators", default=None, help="comma-separated, e.g. mean,median")
    c.add_argument("--seeds", type=int, default=1, help="seeds per method (seed, seed+1, ...)")
    c.add_argument("--target-accuracy", type=float, default=None,
                   help="report rounds to reach this eval accuracy")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY.PATH=VALUE", help="override a config value (repeatable)")
    c.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from fedjax_lite.experiment.host import configure_host
    configure_host()
    from fedjax_lite.experiment import config as cfg

    try:
        raw = cfg.load_raw(args.config)
        for assignment in args.overrides:
            cfg.set_override(raw, assignment)
        config = cfg.parse(raw)
    except cfg.ConfigError as e:
        print(f"fedjax-lite: config error: {e}", file=sys.stderr)
        return 2

    from fedjax_lite.experiment.runner import DataError, DivergenceError, run

    try:
        if args.command == "compare":
            from fedjax_lite.experiment.compare import compare, markdown_table
            split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None
            doc = compare(raw, args.out, algorithms=split(args.algorithms) or [],
                          aggregators=split(args.aggregators), seeds=args.seeds,
                          target_accuracy=args.target_accuracy,
                          progress=not args.no_progress)
            print(markdown_table(doc["table"], args.target_accuracy, args.seeds), end="")
            return 0
        summary = run(config, args.out, resume=args.resume, progress=not args.no_progress)
    except cfg.ConfigError as e:
        print(f"fedjax-lite: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"fedjax-lite: data error: {e}", file=sys.stderr)
        return 2
    except DivergenceError as e:
        print(f"fedjax-lite: diverged: {e}", file=sys.stderr)
        return 3
    final = summary["final"]
    print(json.dumps({"round": final.get("round"), "eval_accuracy": final.get("eval_accuracy"),
                      "eval_loss": final.get("eval_loss"),
                      "clients_per_s": summary["clients_per_s"],
                      "wall_s": round(summary["wall_s"], 2), "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
