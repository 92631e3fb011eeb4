"""Shared pieces of the reproductions (benchmarks/repro_*.py, issue 12).

Every reproduction runs its methods through ``fedjax_lite.experiment.compare.compare``
(identical data and cohort sequences for every method of a seed), one ``compare()`` call
per variant because variants differ in more than the algorithm name (FedProx's mu and
stragglers, a FedOpt server learning rate, E and B). Runs go to a temporary folder that is
deleted afterwards; what is kept is each variant's curves (every metrics row of every
seed) in the reproduction's own ``results.json``, from which ``summary.md`` and the PNGs
are written -- nothing in results/repro_*/ is written by hand.

Call :func:`setup` before anything imports JAX.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import source_state  # noqa: E402 -- git HEAD, dirty flag, source hash

# one line style per method family, reused by every figure
STYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def setup() -> None:
    """Every CPU core a JAX device and the persistent compilation cache, as the CLI does
    (call before JAX is imported)."""
    from fedjax_lite.experiment.host import configure_host, enable_compile_cache
    configure_host()
    enable_compile_cache()


def load_config(name: str) -> dict:
    from fedjax_lite.experiment import config as cfg
    return cfg.load_raw(str(REPO / "configs" / name))


def with_keys(raw: dict, **sections) -> dict:
    """A deep copy of ``raw`` with ``section={key: value}`` merged in, e.g.
    ``with_keys(raw, algorithm={"mu": 1.0}, rounds=100)``."""
    raw = copy.deepcopy(raw)
    for key, value in sections.items():
        if isinstance(value, dict):
            raw[key] = {**(raw.get(key) or {}), **copy.deepcopy(value)}
        else:
            raw[key] = value
    return raw


def run_variant(raw: dict, tmp: str, label: str, *, seeds: int,
                target: float | None = None, log=print) -> dict:
    """One ``compare()`` call of ``raw``'s own algorithm over ``seeds`` seeds.

    Returns {"label", "config" (the raw config), "seeds", "curves" (per seed: round,
    eval_accuracy, eval_loss, train_loss, ...), "rounds_to_target" (per seed), "wall_s",
    "compile_s" (mean per seed)}."""
    from fedjax_lite.experiment.compare import compare
    from fedjax_lite.experiment.outputs import read_metrics
    algorithm = raw["algorithm"]["name"]
    folder = os.path.join(tmp, "".join(c if c.isalnum() else "_" for c in label))
    t0 = time.perf_counter()
    doc = compare(raw, folder, algorithms=[algorithm], seeds=seeds, target_accuracy=target,
                  progress=False)
    wall = time.perf_counter() - t0
    row = doc["table"][0]
    curves = []
    for k, c in enumerate(doc["curves"][algorithm]):
        rows = read_metrics(os.path.join(folder, algorithm, f"seed{k}", "metrics.jsonl"))
        curves.append({"seed": c["seed"], "round": [r["round"] for r in rows],
                       **{key: [r.get(key) for r in rows]
                          for key in ("eval_accuracy", "eval_loss", "train_loss",
                                      "eval_train_loss")}})
    shutil.rmtree(folder, ignore_errors=True)
    out = {"label": label, "config": raw, "seeds": [c["seed"] for c in curves],
           "curves": curves, "rounds_to_target": row["rounds_to_target"],
           "wall_s": wall, "compile_s": row.get("compile_s_mean")}
    acc = [c["eval_accuracy"][-1] for c in curves]
    log(f"    {label:<44s} final acc {np.mean(acc):.4f} ± {np.std(acc):.4f}"
        + (f"  rounds to {target:g}: {row['rounds_to_target']}" if target else "")
        + f"  [{wall:.0f} s]")
    return out


def run_grid(raw: dict, tmp: str, label: str, *, key: str, values, seeds: int,
             target: float | None = None, log=print) -> dict:
    """``raw`` at every value of ``key`` x ``seeds`` seeds as ONE ``fedjax-lite sweep``
    (the members differ only in a number, so they run vmapped in one compiled program);
    returns {value: the dict :func:`run_variant` returns for that value}. A member that
    diverges stops early (its curves end there) and never counts as reaching the target
    after it stopped."""
    from fedjax_lite.experiment.compare import rounds_to_target
    from fedjax_lite.experiment.outputs import read_metrics
    from fedjax_lite.experiment.sweep import plan, short_names, sweep
    folder = os.path.join(tmp, "".join(c if c.isalnum() else "_" for c in label))
    texts = [f"{v:g}" for v in values]
    grid = f"{key}={','.join(texts)}"
    base_seed = int(raw.get("seed", 0))
    seed_text = ",".join(str(base_seed + k) for k in range(seeds))
    t0 = time.perf_counter()
    doc = sweep(raw, folder, grids=[grid], seeds=seed_text, progress=False)
    wall = time.perf_counter() - t0
    vmapped = [u["members"] for u in doc.get("groups", []) if u.get("vmapped")]
    members = plan(raw, [grid], seed_text)
    out = {}
    for value, text in zip(values, texts):
        mine = [m for m in members if m.label.split("=", 1)[1] == text]
        curves, reached, stopped = [], [], 0
        for m in mine:
            rows = read_metrics(os.path.join(folder, "members", m.name, "metrics.jsonl"))
            rows = [r for r in rows if r.get("eval_accuracy") is not None]
            stopped += m.name in doc["stopped"]
            curves.append({"seed": m.config.seed, "round": [r["round"] for r in rows],
                           **{k: [r.get(k) for r in rows]
                              for k in ("eval_accuracy", "eval_loss", "train_loss",
                                        "eval_train_loss")}})
            reached.append(rounds_to_target(rows, target))
        v = {"label": f"{label} {short_names([key])[key]}={text}",
             "config": {**raw, "_grid": {key: value}}, "seeds": [c["seed"] for c in curves],
             "curves": curves, "rounds_to_target": reached, "stopped": stopped,
             "value": value, "wall_s": wall / len(values),
             "vmapped_with": len(vmapped[0]) if vmapped else 1}
        acc = [c["eval_accuracy"][-1] for c in curves]
        log(f"    {v['label']:<44s} final acc {np.mean(acc):.4f} ± {np.std(acc):.4f}"
            + (f"  rounds to {target:g}: {reached}" if target else "")
            + (f"  ({stopped} stopped: diverged)" if stopped else ""))
        out[value] = v
    log(f"    ({len(members)} members, {len(vmapped)} vmapped program(s), {wall:.0f} s)")
    shutil.rmtree(folder, ignore_errors=True)
    return out


def final(v: dict, key: str = "eval_accuracy") -> tuple[float, float]:
    """Mean and std over seeds of the last row's ``key``."""
    vals = [c[key][-1] for c in v["curves"]]
    return float(np.mean(vals)), float(np.std(vals))


def late_change(v: dict, key: str = "eval_loss") -> float:
    """Mean over seeds of the mean |round-to-round change| of ``key`` over the second half
    of the run: how much a curve still oscillates."""
    out = []
    for c in v["curves"]:
        half = [x for r, x in zip(c["round"], c[key]) if r > c["round"][-1] // 2]
        if len(half) > 1:
            out.append(float(np.mean(np.abs(np.diff(half)))))
    return float(np.mean(out)) if out else float("nan")


def mean_over_rounds(v: dict, key: str = "eval_loss") -> float:
    """Mean over seeds of the mean of ``key`` over every evaluated round after round 0
    (the area under the curve divided by its length): how fast AND how steadily a method
    got there, which a final value alone does not show."""
    return float(np.mean([np.mean([x for r, x in zip(c["round"], c[key]) if r > 0])
                          for c in v["curves"]]))


def rounds_to(v: dict) -> tuple[float | None, int]:
    """(mean rounds to the target over the seeds that reached it, how many reached it)."""
    got = [r for r in v["rounds_to_target"] if r is not None]
    return (float(np.mean(got)) if got else None), len(got)


def pm(mean, std, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def band(ax, v: dict, key: str, *, label: str, style: int, color=None, every: int = 8):
    """Mean over seeds with a min..max band (when there are several seeds)."""
    rounds = np.asarray(v["curves"][0]["round"])
    values = np.array([[np.nan if x is None else x for x in c[key]] for c in v["curves"]
                       if len(c[key]) == len(rounds)], float)
    line, = ax.plot(rounds, np.nanmean(values, 0), label=label, color=color,
                    ls=STYLES[style % len(STYLES)], marker=MARKERS[style % len(MARKERS)],
                    markersize=3.5, markevery=max(1, len(rounds) // every), lw=1.3)
    if len(values) > 1:
        ax.fill_between(rounds, np.nanmin(values, 0), np.nanmax(values, 0),
                        color=line.get_color(), alpha=0.18, lw=0)
    return line


def machine(quick: bool) -> dict:
    """throughput.machine_info() (CPU, cores, JAX, devices, git, matmul yardstick); the
    yardstick is skipped in quick mode."""
    import throughput as tp
    if quick:
        keep, tp.matmul_gflops = tp.matmul_gflops, lambda *a, **k: None
        try:
            return tp.machine_info()
        finally:
            tp.matmul_gflops = keep
    return tp.machine_info()


def machine_line(m: dict) -> str:
    gf = m.get("matmul_gflops")
    return (f"{m['cpu_model']}, {m['cpu_affinity']} cores, {m.get('memory_gib')} GiB, "
            f"JAX {m['jax']} ({m['backend']}, {len(m['devices'])} devices)"
            + (f", matmul yardstick {gf:.0f} GFLOP/s" if gf else "")
            + f"; git {m['git_commit'][:7]}"
            + (" with uncommitted changes in fedjax_lite/" if m.get("fedjax_lite_dirty")
               else "") + f" (sources {m['fedjax_lite_source_sha256']})")


class Recorder:
    """Times a reproduction and writes its results.json / summary.md / PNGs."""

    def __init__(self, name: str, out: str, quick: bool, argv: list[str]):
        self.name, self.quick = name, quick
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.command = " ".join(["python", f"benchmarks/{name}.py"] + argv)
        self.t0 = time.perf_counter()
        self.source_at_start = source_state()
        self.tmp = tempfile.mkdtemp(prefix=f"{name}_")

    def log(self, *msg) -> None:
        print(f"[{self.name} {time.perf_counter() - self.t0:6.0f} s]", *msg, flush=True)

    @staticmethod
    def header(doc: dict) -> str:
        return (f"Written by `{doc['command']}` in {doc['wall_s'] / 60:.1f} min on "
                f"{doc['machine']['date'][:10]}: {machine_line(doc['machine'])}."
                + (" **Quick mode** (few rounds, tiny grid: a smoke test, not a result)."
                   if doc["quick"] else "")
                + (" The fedjax_lite sources changed while it ran (see results.json)."
                   if doc["source_changed_during_run"] else "") + "\n\n")

    def finish(self, doc: dict, summary_md: str) -> dict:
        shutil.rmtree(self.tmp, ignore_errors=True)
        end = source_state()
        doc = {"reproduction": self.name, "quick": self.quick, "command": self.command,
               "machine": machine(self.quick), "source_at_start": self.source_at_start,
               "source_at_end": end, "source_changed_during_run":
                   end != self.source_at_start,
               "wall_s": time.perf_counter() - self.t0, **doc}
        (self.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        head = Recorder.header(doc)
        (self.out / "summary.md").write_text(head + summary_md)
        self.log(f"wrote {self.out}/results.json, summary.md")
        return doc


def command_line(doc: str, argv, run, render, *, quick_help: str, seeds_help: str,
                 out, rounds_help: str | None = None, extra=()):
    """The command line every reproduction shares -- ``--quick``, ``--seeds``,
    ``--rounds`` (when ``rounds_help``), the ``extra`` (flags, kwargs) arguments,
    ``--out`` (``out``: a path, or a function of the parsed arguments) and
    ``--render-only`` -- then ``run(args)`` or :func:`rerender`."""
    import argparse
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--seeds", type=int, default=None, help=seeds_help)
    if rounds_help:
        p.add_argument("--rounds", type=int, default=None, help=rounds_help)
    for flags, kwargs in extra:
        p.add_argument(*flags, **kwargs)
    p.add_argument("--out", default=None)
    p.add_argument("--render-only", action="store_true",
                   help="rebuild summary.md and the PNGs from --out's results.json")
    args = p.parse_args(argv)
    args.argv = argv
    if args.out is None:
        args.out = str(out(args) if callable(out) else out)
    if args.render_only:
        return rerender(args.out, render)
    setup()
    return run(args)


def rerender(out: str, render) -> None:
    """Rebuilds summary.md and the PNGs of ``out`` from its results.json (``render(doc,
    out_path) -> markdown``), keeping the header of the run that made it. ``render`` may
    refresh the document's derived fields (tables, claims); results.json is rewritten."""
    out = Path(out)
    doc = json.loads((out / "results.json").read_text())
    md = render(doc, out)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "summary.md").write_text(Recorder.header(doc) + md)
    print(f"re-rendered {out}/summary.md and figures from results.json", flush=True)
