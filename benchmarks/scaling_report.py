"""results/scaling.md and results/scaling.png from results/scaling.json (written by
``benchmarks/scaling.py``; every part names the commit and machine it was measured on)."""

from __future__ import annotations

import json
from pathlib import Path


def _run_line(run: dict) -> str:
    m, s = run["machine"], run["source"]
    dirty = " (fedjax_lite/ modified)" if s.get("fedjax_lite_dirty") else ""
    return (f"{m['cpu_model']}, {m['cpu_affinity']} cores, JAX {m['jax']} {m['backend']}, "
            f"matmul {m.get('matmul_gflops')} GFLOP/s; git {s['git_commit'][:7]}{dirty}")


def _range(r: dict, key: str) -> str:
    lo, hi = r[key]
    return f"{lo:.2f}-{hi:.2f}"


# (part, title, what was measured, table header, one row)
SECTIONS = [
    ("compile_rounds", "`engine.compile_rounds` vs the per-round loop",
     "K = --block rounds per program (10 here) vs the per-round loop, alternated in one process "
     "(population 1000).",
     "| cohort | loop rounds/s | block rounds/s | speedup (median, range) |",
     lambda r: f"| {r['cohort']} | {r['loop_rounds_per_s']:.1f} | "
               f"{r['block_rounds_per_s']:.1f} | {r['speedup_median']:.2f}x "
               f"({_range(r, 'speedup_range')}) |"),
    ("cohort_size", "Cohort size (population = cohort, device storage)",
     "One round of C clients, median of rounds after two warm-up rounds.",
     "| cohort | clients/s | round s | peak RSS MB (process so far) |",
     lambda r: f"| {r['cohort']:,} | {r['clients_per_s']:,.0f} | "
               f"{r['round_s_median']:.3f} | {r['peak_rss_mb']:,.0f} |"),
    ("storage", "`data.storage: host` vs `device`",
     "Population 4 x cohort; the two alternate round by round; ratio = t_device / "
     "t_host per pair (1.0: gathering on the host costs nothing visible).",
     "| cohort | device clients/s | host clients/s | host speed / device (median, range) "
     "| same params |",
     lambda r: f"| {r['cohort']:,} | {r['device_clients_per_s']:,.0f} | "
               f"{r['host_clients_per_s']:,.0f} | {r['host_vs_device_median']:.2f} "
               f"({_range(r, 'host_vs_device_range')}) | {r['identical_params']} |"),
    ("devices", "Device count and backend",
     "Virtual CPU devices (`--xla_force_host_platform_device_count`) on the cores "
     "above: more devices than cores add no compute, so this shows the sharding's "
     "overhead, not a speedup. One process per setting, round-robin, median.",
     "| cohort | devices | backend | clients/s |",
     lambda r: f"| {r['cohort']:,} | {r['devices']} | {r['backend']} | "
               f"{r['clients_per_s']:,.0f} |"),
    ("mmap", "Populations from files on disk (`data.storage: mmap`)",
     "The population is written block by block (never whole in memory), then "
     "`fedjax-lite run` trains from it; peak RSS is the run process's.",
     "| population | its size GB | peak RSS GB | cohort | round s | clients/s |",
     lambda r: f"| {r['population']:,} | {r['population_bytes'] / 1e9:.2f} | "
               f"{r['peak_rss_bytes'] / 1e9:.2f} | {r['cohort']:,} | {r['round_s']:.3f} | "
               f"{r['clients_per_s']:,.0f} |"),
    ("layout", "The population replicated on every device vs sharded over them",
     "One process per layout, all of the process's devices (one per core), one round "
     "of C clients (population = cohort); peak RSS is the process's own.",
     "| cohort | population GB | layout | peak RSS GB | round s |",
     lambda r: f"| {r['cohort']:,} | {r['population_bytes'] / 1e9:.2f} | {r['layout']} | "
               f"{r['peak_rss_bytes'] / 1e9:.2f} | {r['round_s']:.2f} |"),
]


def write(res: dict, out: Path) -> None:
    runs = res.get("runs", {})
    lines = ["# Scaling (issue 11): workload W", "",
             "Written by `benchmarks/scaling.py` (never edited by hand). Workload W: clients "
             "of 64 examples x 100 features, binary logistic regression, 5 local epochs of "
             "batch 16, FedAvg. Ratios are measured in one process with the variants "
             "alternated; the machine and commit of every part are named under it.", ""]
    for part, title, what, header, row in SECTIONS:
        if part not in res:
            continue
        lines += [f"## {title}", "", f"Measured on {_run_line(runs[part])}. {what}", "",
                  header, "|" + "---|" * (header.count("|") - 1)]
        lines += [row(r) for r in res[part]] + [""]
    if (out / "sweep.json").exists():
        lines += ["## Sweeps", "", "See `results/sweep.md` (`benchmarks/sweep.py`).", ""]
    (out / "scaling.md").write_text("\n".join(lines))
    _plot(res, out / "scaling.png")
    print("\n".join(lines))


def _plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [p for p in ("cohort_size", "devices", "mmap") if p in res]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, part in zip(axes, panels):
        rows = res[part]
        if part == "cohort_size":
            ax.loglog([r["cohort"] for r in rows], [r["clients_per_s"] for r in rows],
                      "o-", label="device storage")
            for key, label in (("device_clients_per_s", "device (vs host run)"),
                               ("host_clients_per_s", "host storage")):
                st = res.get("storage", [])
                if st:
                    ax.loglog([r["cohort"] for r in st], [r[key] for r in st], "s--",
                              label=label)
            ax.set(xlabel="cohort size (clients per round)", ylabel="clients / s",
                   title="Throughput vs cohort size")
        elif part == "devices":
            for C in sorted({r["cohort"] for r in rows}):
                for b in ("shard_map", "pmap"):
                    pts = sorted((r["devices"], r["clients_per_s"]) for r in rows
                                 if r["cohort"] == C and (r["backend"] == b
                                                          or r["devices"] == 1))
                    if len(pts) > 1:
                        ax.plot(*zip(*pts), "o-" if b == "shard_map" else "s--",
                                label=f"C = {C:,}, {b}")
            ax.set_xscale("log", base=2)
            ax.set(xlabel="devices (virtual CPU devices)", ylabel="clients / s",
                   title="Throughput vs device count")
        else:
            xs = [r["population"] for r in rows]
            ax.loglog(xs, [r["population_bytes"] / 1e9 for r in rows], "k:",
                      label="population size")
            ax.loglog(xs, [r["peak_rss_bytes"] / 1e9 for r in rows], "o-",
                      label="peak RSS of the run (mmap)")
            ax.set(xlabel="population (clients)", ylabel="GB",
                   title="Memory vs population size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("fedjax_lite scaling, workload W (benchmarks/scaling.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    here = Path(__file__).resolve().parents[1] / "results"
    write(json.loads((here / "scaling.json").read_text()), here)
