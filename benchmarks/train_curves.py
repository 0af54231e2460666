"""Plot learning curves (eval goodput of the policy vs the baseline on the same held-out episodes)
from run directories' eval_history.json: the same data as TensorBoard's eval/* and baseline/*.

    python benchmarks/train_curves.py runs/dispatch-a runs/dispatch-b runs/knobs-b --out training/figures/curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("curves.png"))
    args = ap.parse_args()
    fig, axes = plt.subplots(1, len(args.runs), figsize=(4.2 * len(args.runs), 3.4), squeeze=False)
    for ax, run in zip(axes[0], args.runs):
        hist = json.loads((run / "eval_history.json").read_text())
        steps = [h["timesteps"] for h in hist]
        ax.plot(steps, [h["eval/goodput_qps"] for h in hist], "o-", label="policy")
        ax.plot(steps, [h["baseline/goodput_qps"] for h in hist], "--", label="hexgen (same episodes)")
        ax.set_title(run.name, fontsize=9)
        ax.set_xlabel("env steps")
        ax.set_ylabel("eval SLO-goodput (q/s)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(args.out)


if __name__ == "__main__":
    main()
