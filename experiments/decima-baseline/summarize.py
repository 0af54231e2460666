"""The comparison table of training/README.md ("Input-dependent baseline") from a run.sh run directory:
per cell, each kind of policy's test-seed SLO-goodput (mean over test seeds) per training seed, the
mean over training seeds, and per training seed the ratio input_dependent / value and each over the
warm start both started from; plus what each training run cost and measured during training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def kind_and_seed(source: str) -> tuple[str, int] | None:
    p = Path(source)
    run = p.parent.name  # input-s0, value-s1, ...
    if "-s" not in run:
        return None
    base, seed = run.rsplit("-s", 1)
    kind = "warm start" if p.name == "warm_start_policy" else base
    return kind, int(seed)


def main(root: Path) -> None:
    print("| cell | policy | SLO-goodput per training seed (q/s) | mean | ratio to value (per seed) | ratio to warm start (per seed) |")
    print("|---|---|---|---|---|---|")
    for results in sorted(root.glob("eval-*/results.json")):
        data = json.loads(results.read_text())
        for cell in data["cells"]:
            by: dict[str, dict[int, float]] = {}
            others = []
            for label, pol in cell["policies"].items():
                ks = kind_and_seed(pol["source"])
                g = pol["metrics"]["goodput_qps"]["mean"]
                if ks is None:
                    others.append((label, g))
                else:
                    by.setdefault(ks[0], {})[ks[1]] = g
            seeds = sorted(by.get("input", {}))
            for kind in ("input", "value", "warm start"):
                vals = [by[kind][s] for s in seeds]
                to_value = " ".join(f"{by[kind][s] / by['value'][s]:.3f}" for s in seeds) if kind != "value" else ""
                to_ws = " ".join(f"{by[kind][s] / by['warm start'][s]:.3f}" for s in seeds) if kind != "warm start" else ""
                print(f"| {cell['cell']['label']} | {kind} | {' '.join(f'{v:.4f}' for v in vals)} | {np.mean(vals):.4f} "
                      f"| {to_value} | {to_ws} |")
            for label, g in others:
                print(f"| {cell['cell']['label']} | {label} | | {g:.4f} | | |")
    print()
    print("| run | env steps | train wall (s) | eval goodput at step 0 -> end (eval seeds) | adv std: input / value head (mean over iterations) |")
    print("|---|---|---|---|---|")
    for summary in sorted(root.glob("*-s*/summary.json")):
        s = json.loads(summary.read_text())
        h = s["eval_history"]
        rows = [line.split(",") for line in (summary.parent / "tb" / "progress.csv").read_text().splitlines()]
        head, body = rows[0], rows[1:]
        adv = ""
        if "train/adv_std_input" in head:
            i, v = head.index("train/adv_std_input"), head.index("train/adv_std_value")
            a = [(float(r[i]), float(r[v])) for r in body if r[i]]
            adv = f"{np.mean([x for x, _ in a]):.2f} / {np.mean([y for _, y in a]):.2f}"
        print(f"| {summary.parent.name} | {h[-1]['timesteps']} | {s['train_wall_s']:.0f} | "
              f"{h[0]['eval/goodput_qps']:.4f} -> {h[-1]['eval/goodput_qps']:.4f} | {adv} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
