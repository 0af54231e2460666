"""test_results.json (evaluate_heavy.py) as a markdown table: per cell, each policy's SLO-goodput
(mean over the 10 test seeds, 95% BCa interval), its share of the capacity bound and its ratio to
least-work+workflow (paired BCa interval).

    python experiments/policies/admission/table.py > experiments/policies/admission/table.md
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    results = json.loads((HERE / "test_results.json").read_text())
    print("| cell | bound (q/s) | policy | SLO-goodput (q/s) | share of bound | ratio to least-work+workflow |")
    print("|---|---|---|---|---|---|")
    for label, entry in results["cells"].items():
        for name, rec in entry["policies"].items():
            m, lo, hi = rec["mean"]
            r = rec.get("ratio_to_baseline")
            ratio = "(baseline)" if name == "least-work+workflow" else f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"
            print(f"| {label} | {entry['bound_qps']:.3f} | {name} | {m:.4f} [{lo:.4f}, {hi:.4f}] | "
                  f"{rec['share_of_bound']:.2f} | {ratio} |")
