"""benchmarks/train_report.py: the report behind every shipped policy, and its --ship step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_report_ships_a_policy_file_in_the_directory_layout(tmp_path):
    """A heuristic policy ships as a directory (policy.yaml, eval_report.json, REPORT.md), the
    layout the reproduce-the-report test reads; the report compares against per-cell tuned HexGen."""
    ship = tmp_path / "mine"
    proc = subprocess.run([sys.executable, "benchmarks/train_report.py", "--policy",
                           "policies/pretrained/least-work+workflow/policy.yaml", "--cell", "paper:0.04:constant",
                           "--seeds", "1", "--trials", "1", "--out", str(tmp_path / "out"), "--ship", str(ship)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (ship / "policy.yaml").read_text() == (REPO / "policies/pretrained/least-work+workflow/policy.yaml").read_text()
    report = json.loads((ship / "eval_report.json").read_text())
    assert report["policy"] == "least-work+workflow" and report["seeds"] == [200000]
    cell = report["cells"][0]
    assert cell["cell"]["label"] == "paper/chess_trace1/constant@0.04"
    assert {"rr", "hexgen", "hexgen-tuned", "hexgen-tuned+triage"} <= set(cell["ratios"]["least-work+workflow"])
    assert "| paper/chess_trace1/constant@0.04 | least-work+workflow |" in (ship / "REPORT.md").read_text()
