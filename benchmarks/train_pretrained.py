"""Reproduce the shipped trained policies and their reports (about 45-60 minutes on 2 free cores).

    python benchmarks/train_pretrained.py [--out runs/pretrained] [--ship]

1. `agentsched train --config training/configs/dispatch-heavy.yaml`   (MaskablePPO, BC warm start
   from least-work+urgency + 1 DAgger round, 200k steps)
2. `agentsched train --config training/configs/dispatch-maskppo.yaml --total-timesteps 80000`
   (the HexGen warm-started run: its TensorBoard shows the curve starting at HexGen's level)
3. `agentsched train --config training/configs/knobs-ppo.yaml --total-timesteps 100000`
4. `benchmarks/train_report.py` on all three (+ the dispatch policy with the urgency weight 0.5
   that tuned HexGen favours at heavy load: "both" knobs and learned dispatch), and with --ship
   copies the dispatch policy with its report to experiments/policies/dispatch-heavy.
5. `agentsched train --config training/configs/dispatch-paper-triage.yaml` (BC of tuned HexGen on
   the paper cluster, urgency-triage queues, 200k steps; the best checkpoint is kept) and its report
   on the three heavy paper cells (--ship: experiments/policies/dispatch-paper-triage).
6. `agentsched train --config training/configs/dispatch-overload.yaml` (BC of the least-work+workflow
   heuristic on both clusters at overload, workflow-first queues, 100k steps; ~6 minutes) and its
   report on every cell (--ship: policies/pretrained/learned).
7. `agentsched train --config training/configs/dispatch-overload-2t.yaml` (the same, cloned from the
   heuristic tuned for each cluster: experiments/policies/teachers/) and its report on every cell
   (--ship: experiments/policies/dispatch-overload-2t).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from agentsched.cli import ScriptArgumentParser, run_argparse_script

AGENTSCHED = [sys.executable, "-m", "agentsched.cli"]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def named_copy(src: Path, dst: Path, name: str, local: dict | None = None) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    meta = yaml.safe_load((dst / "policy.yaml").read_text())
    meta["name"] = name
    if local is not None:
        meta["local"] = local
    (dst / "policy.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return dst


def main() -> None:
    ap = ScriptArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/pretrained"))
    ap.add_argument("--ship", action="store_true",
                    help="write experiments/policies/dispatch-heavy, dispatch-paper-triage, dispatch-overload and dispatch-overload-2t")
    args = ap.parse_args()
    out = args.out
    run(AGENTSCHED + ["train", "--config", "training/configs/dispatch-heavy.yaml", "--out", str(out / "dispatch-b"), "--no-progress"])
    run(AGENTSCHED + ["train", "--config", "training/configs/dispatch-maskppo.yaml", "--total-timesteps", "80000",
                      "--out", str(out / "dispatch-a"), "--no-progress"])
    run(AGENTSCHED + ["train", "--config", "training/configs/knobs-ppo.yaml", "--total-timesteps", "100000",
                      "--out", str(out / "knobs-b"), "--no-progress"])
    final = out / "final"
    final.mkdir(parents=True, exist_ok=True)
    p1 = named_copy(out / "dispatch-b" / "policy", final / "dispatch-heavy", "dispatch-heavy")
    p2 = named_copy(out / "knobs-b" / "policy", final / "knobs-ppo", "knobs-ppo")
    p3 = named_copy(out / "dispatch-a" / "policy", final / "dispatch-hexgen-ws", "dispatch-hexgen-ws")
    p4 = named_copy(out / "dispatch-b" / "policy", final / "dispatch-heavy+w0.5", "dispatch-heavy+w0.5",
                    local={"name": "urgency", "knobs": {"weight": 0.5}})
    cmd = [sys.executable, "benchmarks/train_report.py", "--out", str(out / "report")]
    for p in (p1, p2, p3, p4):
        cmd += ["--policy", str(p)]
    if args.ship:
        cmd += ["--ship", "experiments/policies/dispatch-heavy"]
    run(cmd)
    # the paper-cluster policy: tuned HexGen cloned, urgency-triage queues (~8 minutes)
    paper_cells = [arg for load in ("constant", "step", "burst") for arg in ("--cell", f"paper:0.12:{load}")]
    train_and_report(out, "dispatch-paper-triage", ["--policy", str(p1)] + paper_cells, args.ship)
    # one network for both clusters at overload: least-work+workflow cloned, workflow-first queues
    p6 = train_and_report(out, "dispatch-overload", ["--policy", "policies/pretrained/least-work+workflow",
                                                     "--policy", "experiments/policies/dispatch-paper-triage+margin3.yaml"],
                          args.ship)
    # the same with one teacher per cluster (the recommended policy)
    train_and_report(out, "dispatch-overload-2t", ["--policy", "policies/pretrained/least-work+workflow",
                                                   "--policy", str(p6),
                                                   "--policy", "experiments/policies/teachers/least-work+workflow-paper.yaml",
                                                   "--policy", "experiments/policies/teachers/least-work+workflow-mixed-16.yaml"],
                     args.ship)


def train_and_report(out: Path, name: str, report_args: list[str], ship: bool) -> Path:
    """Train training/configs/NAME.yaml, copy its best policy to OUT/final/NAME, report it (the policy
    first, then `report_args`); with `ship`, to policies/pretrained/NAME with its training summary."""
    run(AGENTSCHED + ["train", "--config", f"training/configs/{name}.yaml", "--out", str(out / name), "--no-progress"])
    policy = named_copy(out / name / "policy", out / "final" / name, name)
    cmd = [sys.executable, "benchmarks/train_report.py", "--out", str(out / f"report-{name}"), "--policy", str(policy)]
    cmd += report_args
    if ship:
        cmd += ["--ship", f"policies/pretrained/{name}"]
    run(cmd)
    if ship:
        shutil.copyfile(out / name / "summary.json", f"policies/pretrained/{name}/train_summary.json")
    return policy

if __name__ == "__main__":
    run_argparse_script(main)
