"""``fedjax-lite`` command line: a thin shell over the runner.

    fedjax-lite run CONFIG --out DIR [--set key.path=value ...] [--resume] [--no-progress]

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from fedjax_lite.experiment.host import configure_host
    configure_host()
    from fedjax_lite.experiment import config as cfg

    try:
        config = cfg.load(args.config, args.overrides)
    except cfg.ConfigError as e:
        print(f"fedjax-lite: config error: {e}", file=sys.stderr)
        return 2

    from fedjax_lite.experiment.runner import DataError, DivergenceError, run

    try:
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
