#!/usr/bin/env python
"""What a user waits for before and around training: the quickstart's process wall time
and compile time, and a small ``compare``, with JAX's persistent compilation cache off,
cold (an empty cache folder) and warm (the folder the cold run filled).

Every measurement is one ``fedjax-lite`` process (``python -m fedjax_lite.experiment.cli``)
timed from outside; ``compile_s`` is read from the run's ``summary.json`` (the time the
run spent in ``lower().compile()`` of the round and the evaluation, cache lookups
included). The three cache modes are interleaved within each repetition (off, cold, warm;
the cold run gets a fresh folder each time), so drifts in machine speed hit all three.

  quickstart  ``fedjax-lite run configs/quickstart.yaml`` (100 rounds)
  compare     ``fedjax-lite compare configs/quickstart.yaml --algorithms
              fedavg,fedprox,fedadam --seeds 2 --set rounds=20`` (6 runs)

    python benchmarks/startup.py                 # writes results/startup.{json,md}
    python benchmarks/startup.py --repeats 1 --out /tmp/startup
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402
from dp_tradeoff import source_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def timed(args: list[str], cache: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "FEDJAX_LITE_COMPILE_CACHE": cache if cache is not None else "0"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "fedjax_lite.experiment.cli", *args,
                            "--out", out, "--no-progress"], env=env, capture_output=True,
                           text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{args}: exit {p.returncode}: {p.stderr[-2000:]}")
        summaries = [json.loads(Path(r, "summary.json").read_text())
                     for r, _, files in os.walk(out) if "summary.json" in files]
    return {"wall_s": wall, "compile_s": sum(s["compile_s"] for s in summaries),
            "train_s": sum(s.get("train_s") or 0 for s in summaries), "runs": len(summaries)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "results"))
    args = ap.parse_args(argv)
    workloads = {
        "quickstart": ["run", QUICKSTART],
        "compare": ["compare", QUICKSTART, "--algorithms", "fedavg,fedprox,fedadam",
                    "--seeds", "2", "--set", "rounds=20"],
    }
    t_start = time.time()
    source = source_state()
    res = {name: {"off": [], "cold": [], "warm": []} for name in workloads}
    for rep in range(args.repeats):
        for name, cmd in workloads.items():
            with tempfile.TemporaryDirectory() as cache:
                res[name]["off"].append(timed(cmd, None))
                res[name]["cold"].append(timed(cmd, cache))
                res[name]["warm"].append(timed(cmd, cache))
            print(name, rep, {m: round(v[-1]["wall_s"], 2) for m, v in res[name].items()},
                  flush=True)
    doc = {"source": source, "machine": tp.machine_info(), "repeats": args.repeats,
           "wall_s": time.time() - t_start, "results": res}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup.json").write_text(json.dumps(doc, indent=1))
    med = lambda rows, k: statistics.median(r[k] for r in rows)
    m = doc["machine"]
    lines = ["# Start-up and compilation: the persistent compilation cache", "",
             f"Written by `benchmarks/startup.py` ({args.repeats} repetitions, modes "
             f"interleaved). Machine: {m['cpu_model']}, {m['cpu_affinity']} cores, JAX "
             f"{m['jax']} {m['backend']}; git {source['git_commit'][:7]}"
             f"{' (fedjax_lite/ modified)' if source['fedjax_lite_dirty'] else ''}.", "",
             "Median process wall time / compile time (summary.json `compile_s`, summed "
             "over the runs of a compare) / time in the rounds (`train_s`). off: "
             "`FEDJAX_LITE_COMPILE_CACHE=0`; cold: an empty cache folder; warm: the same "
             "command again with the folder the cold run filled.", "",
             "| workload | cache | wall s | compile s | train s | wall vs off |",
             "|---|---|---|---|---|---|"]
    for name, modes in res.items():
        base = med(modes["off"], "wall_s")
        for mode, rows in modes.items():
            lines.append(f"| {name} | {mode} | {med(rows, 'wall_s'):.2f} | "
                         f"{med(rows, 'compile_s'):.2f} | {med(rows, 'train_s'):.2f} | "
                         f"{med(rows, 'wall_s') / base:.2f}x |")
    (out / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
