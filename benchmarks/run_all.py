#!/usr/bin/env python
"""Regenerates every reproduction (issue 12) and, in full mode, every benchmark.

    python benchmarks/run_all.py --quick [--out /tmp/ra] # reproductions only, few rounds and
                                                         # tiny grids: a smoke test (tests/
                                                         # test_repro.py runs it); without
                                                         # --out into a temporary folder
    python benchmarks/run_all.py                         # everything, into results/
    python benchmarks/run_all.py --only repro_fedprox,repro_scaffold
    python benchmarks/run_all.py --skip recsys_quality,compare_algorithms
    python benchmarks/run_all.py --leaf ~/FedProx/data   # adds reproduction 5 (the FedProx
                                                         # repository's own data files)
    python benchmarks/run_all.py --list                  # what would run, and how

Reproductions write ``OUT/repro_*/`` (``--out``, default results/, in quick mode a new
temporary folder); in quick mode they run in this process one after another (JAX is
imported once). In full mode every item runs in its own process; the other benchmarks
run with the arguments their results were made with (see results/README.md) and write
where they always write (results/). A failing item is reported and the rest still run;
the exit code is 1 if any failed. ``OUT/run_all.json``
records each item's command, exit code and wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

REPRODUCTIONS = ("repro_fedprox", "repro_fedavg", "repro_scaffold", "repro_fedopt")
# the other benchmarks, with the arguments of the runs results/README.md describes;
# run only if the script exists (approximate full-run times on this project's 2-core CPU)
BENCHMARKS = (
    ("throughput", [], "5-10 min"),
    ("skewed", ["--cases", "30:10,1000:100", "--rounds", "5"], "~1 min"),
    ("scaling", [], "several min"),
    ("startup", ["--repeats", "2"], "~2 min"),
    ("dp_tradeoff", [], "~7 min"),
    ("compare_algorithms", [], "~14 min"),
    ("recsys", [], "~3 min"),
    ("recsys_quality", [], "~14 min"),
    ("sweep", [], "a few min"),
    ("personalization", [], "~20 min"),
)


def plan(args) -> list[dict]:
    items = []
    # the reproductions' own default is results/repro_*: say --out only when it differs
    out = lambda name: ([] if Path(args.out).resolve() == (REPO / "results").resolve()  # noqa
                        else ["--out", str(Path(args.out) / name)])
    for name in REPRODUCTIONS:
        argv = (["--quick"] if args.quick else []) + out(name)
        items.append({"name": name, "argv": argv, "in_process": args.quick})
    if args.leaf:
        items.append({"name": "repro_fedprox_leaf", "script": "repro_fedprox",
                      "argv": (["--quick"] if args.quick else [])
                      + ["--leaf", args.leaf] + out("repro_fedprox_leaf"),
                      "in_process": args.quick})
    if not args.quick:
        for name, argv, _ in BENCHMARKS:
            if (HERE / f"{name}.py").exists():
                items.append({"name": name, "argv": list(argv), "in_process": False})
    only = set(filter(None, (args.only or "").split(",")))
    skip = set(filter(None, (args.skip or "").split(",")))
    known = {i["name"] for i in items}
    for n in (only | skip) - known:
        raise SystemExit(f"run_all: unknown item {n!r}; items: {', '.join(sorted(known))}")
    return [i for i in items if (not only or i["name"] in only) and i["name"] not in skip]


def run_item(item: dict) -> dict:
    script = item.get("script", item["name"])
    cmd = ["python", f"benchmarks/{script}.py"] + item["argv"]
    print(f"\n=== {item['name']}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        if item["in_process"]:
            __import__(script).main(item["argv"])
            rc = 0
        else:
            rc = subprocess.run([sys.executable, str(HERE / f"{script}.py")] + item["argv"],
                                cwd=str(REPO)).returncode
    except Exception as e:    # noqa: BLE001 -- report, go on with the next item
        import traceback
        traceback.print_exc()
        rc = f"{type(e).__name__}: {e}"
    wall = time.perf_counter() - t0
    print(f"=== {item['name']}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {wall:.0f} s",
          flush=True)
    return {"name": item["name"], "command": " ".join(cmd), "rc": rc, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="reproductions only, few rounds and tiny grids")
    p.add_argument("--out", default=None,
                   help="where the reproductions write repro_*/ (default results/; with "
                        "--quick a new temporary folder, so a smoke test never overwrites "
                        "results/)")
    p.add_argument("--only", default=None, help="comma-separated item names")
    p.add_argument("--skip", default=None, help="comma-separated item names")
    p.add_argument("--leaf", default=None,
                   help="the FedProx repository's data/ folder: adds reproduction 5")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = (str(REPO / "results") if not args.quick else "TMP" if args.list
                    else tempfile.mkdtemp(prefix="run_all_quick_"))
    items = plan(args)
    if args.list:
        times = {n: t for n, _, t in BENCHMARKS}
        for i in items:
            print(f"{i['name']:<20s} python benchmarks/{i.get('script', i['name'])}.py "
                  f"{' '.join(i['argv'])}" + (f"   ({times[i['name']]})"
                                               if i["name"] in times else ""))
        return 0
    if args.quick:     # in this process: set up JAX once, before anything imports it
        from repro_common import setup
        setup()
    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    done = [run_item(i) for i in items]
    total = time.perf_counter() - t0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(["python", "benchmarks/run_all.py"] + argv),
              "started": started, "quick": args.quick, "wall_s": total, "items": done}
    (Path(args.out) / "run_all.json").write_text(json.dumps(record, indent=1) + "\n")
    print("\n| item | exit | wall s |\n|---|---|---|")
    for d in done:
        print(f"| {d['name']} | {d['rc']} | {d['wall_s']:.0f} |")
    print(f"total {total / 60:.1f} min; wrote {os.path.join(args.out, 'run_all.json')}")
    return 0 if all(d["rc"] == 0 for d in done) else 1


if __name__ == "__main__":
    sys.exit(main())
