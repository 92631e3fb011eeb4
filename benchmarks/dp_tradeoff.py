#!/usr/bin/env python
"""Privacy-utility trade-off of DP-FedAvg on the quickstart task.

configs/quickstart.yaml (1000 clients of synthetic_logistic, 50 per round, 100 rounds,
5 local epochs of batch 16) with uniform client weighting and the ``dp_gaussian``
aggregator (McMahan et al., ICLR 2018): every update clipped to L2 norm ``--clip``, the
sum noised with N(0, (z * clip)^2), divided by 50. For each noise multiplier z, one run
through ``experiment.runner.run`` (exactly what ``fedjax-lite run`` does) per seed;
reported: final test accuracy (mean and spread over seeds) and the (epsilon, delta=1e-5)
spent after 100 rounds by the RDP accountant (q = 50 / 800 training clients). Rows:
plaintext FedAvg (uniform weighting, no clipping), clipping only (z = 0: no privacy), and
z > 0.

    python benchmarks/dp_tradeoff.py            # writes results/dp_tradeoff.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (machine_info; imports no JAX at module level)

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--noise", default="0.5,1,2,4", help="noise multipliers z > 0")
    ap.add_argument("--clip", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "results"))
    args = ap.parse_args()
    from fedjax_lite.experiment.host import configure_host
    configure_host()
    from fedjax_lite.experiment import config as cfg
    from fedjax_lite.experiment.runner import run

    base = ["algorithm.weighting=uniform", "checkpoint_every=0"]
    settings = [("plaintext (uniform weights)", [])]
    settings.append(("clipping only, z = 0", ["aggregator.name=dp_gaussian",
                                              f"aggregator.clip_norm={args.clip}",
                                              "aggregator.noise_multiplier=0"]))
    for z in (float(v) for v in args.noise.split(",")):
        settings.append((f"DP-FedAvg z = {z:g}", ["aggregator.name=dp_gaussian",
                                                  f"aggregator.clip_norm={args.clip}",
                                                  f"aggregator.noise_multiplier={z}"]))
    rows = []
    for name, sets in settings:
        accs, eps = [], None
        for seed in range(args.seeds):
            config = cfg.load(str(REPO / "configs" / "quickstart.yaml"),
                              base + sets + [f"seed={seed}"])
            with tempfile.TemporaryDirectory() as tmp:
                summary = run(config, tmp, progress=False)
            accs.append(summary["final"]["eval_accuracy"])
            eps = summary.get("privacy", {}).get("epsilon")
        row = {"setting": name, "overrides": sets, "accuracy_mean": statistics.mean(accs),
               "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "accuracy_per_seed": accs, "epsilon": eps, "delta": 1e-5 if sets else None}
        rows.append(row)
        print(f"{name:30s} accuracy {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f}"
              f"  epsilon {'-' if eps is None else f'{eps:.2f}'}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dp_tradeoff.json").write_text(json.dumps(
        {"machine": tp.machine_info(), "clip_norm": args.clip, "seeds": args.seeds,
         "rows": rows}, indent=1))
    lines = ["| setting | test accuracy (mean ± std over seeds) | epsilon (delta = 1e-5) |",
             "|---|---|---|"]
    for r in rows:
        eps = ("no guarantee" if r["setting"].startswith("clipping") else
               "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}")
        lines.append(f"| {r['setting']} | {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}"
                     f" | {eps} |")
    (out / "dp_tradeoff.md").write_text("\n".join(lines) + "\n")
    print("wrote", out / "dp_tradeoff.json", "and", out / "dp_tradeoff.md")


if __name__ == "__main__":
    main()
