"""Plot learning curves (eval goodput of the policy vs the baseline on the same held-out episodes)
from run directories' eval_history.json: the same data as TensorBoard's eval/* and baseline/*.

With `--reference ENV_ID` (a benchmark id, envs/gym/benchmark.py), each panel also gets the id's
reference scores (envs/data/benchmark_scores.json: test seeds) as horizontal lines, and `--csv`
writes the curves as rows (run, timesteps, eval goodput, baseline goodput).

    PYTHONPATH=. .venv/bin/python benchmarks/train_curves.py runs/dispatch-a runs/dispatch-b runs/knobs-b --out training/figures/curves.png
    PYTHONPATH=. .venv/bin/python benchmarks/train_curves.py runs/ppo-from-scratch-paper-heavy --reference agentsched/Dispatch-paper-heavy-v1 \\
        --baseline-label "least-work+workflow (same episodes)" --out experiments/ppo-from-scratch/paper-heavy.png
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from agentsched.cli import ScriptArgumentParser, run_argparse_script
from envs.gym.benchmark import reference_scores  # noqa: E402

# reference lines drawn with --reference (the random and rr scores are ~0 on every id)
REFERENCE_LINES = {"capacity-bound": "black", "least-work+workflow": "tab:green", "hexgen-tuned": "tab:purple",
                   "hexgen": "tab:gray"}


def main() -> None:
    ap = ScriptArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("curves.png"))
    ap.add_argument("--baseline-label", default="hexgen (same episodes)", help="legend of the baseline curve")
    ap.add_argument("--reference", default=None, help="a benchmark env id: draw its reference scores (test seeds)")
    ap.add_argument("--csv", type=Path, default=None, help="also write the curves here")
    args = ap.parse_args()
    refs = reference_scores(args.reference) if args.reference else {}
    fig, axes = plt.subplots(1, len(args.runs), figsize=(4.8 * len(args.runs), 3.6), squeeze=False)
    rows = []
    for ax, run in zip(axes[0], args.runs):
        hist = json.loads((run / "eval_history.json").read_text())
        steps = [h["timesteps"] for h in hist]
        ax.plot(steps, [h["eval/goodput_qps"] for h in hist], "o-", label="policy (eval seeds)")
        if "baseline/goodput_qps" in hist[0]:
            ax.plot(steps, [h["baseline/goodput_qps"] for h in hist], "--", label=args.baseline_label)
        for name, color in REFERENCE_LINES.items():
            if name in refs and refs[name].get("measured", True):
                ax.axhline(refs[name]["goodput_qps"]["mean"], linestyle=":", linewidth=1.2, color=color,
                           label=f"{name} (test seeds)")
        rows += [{"run": run.name, "timesteps": h["timesteps"], "eval_goodput_qps": h["eval/goodput_qps"],
                  "baseline_goodput_qps": h.get("baseline/goodput_qps")} for h in hist]
        ax.set_title(args.reference or run.name, fontsize=9)
        ax.set_xlabel("env steps")
        ax.set_ylabel("SLO-goodput (q/s)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(args.out)
    if args.csv is not None:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(args.csv)


if __name__ == "__main__":
    run_argparse_script(main)
