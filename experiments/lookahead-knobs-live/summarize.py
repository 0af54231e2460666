"""Summarise a run of run.sh: SLO attainment of both policies over the base and step replays
together (workflows met / workflows), per phase, and the twin decisions the gateway logged."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def met_and_total(result: dict) -> tuple[int, int]:
    finished = int(result["n_finished"])
    return round(result["slo_attainment"] * finished), int(result["n_workflows"])


def main(out: Path) -> None:
    summary: dict = {}
    for label in ("fixed", "lookahead"):
        phases = {phase: json.loads((out / f"{label}-{phase}.json").read_text()) for phase in ("base", "step")}
        info = json.loads((out / f"{label}-info.json").read_text())
        counts = {phase: met_and_total(r) for phase, r in phases.items()}
        met = sum(m for m, _ in counts.values())
        total = sum(n for _, n in counts.values())
        decisions = info.get("twin_decisions", [])
        summary[label] = {
            "policy": info["policy"].get("name"), "slo_attainment": met / total, "met": met, "workflows": total,
            "per_phase": {p: {"met": m, "workflows": n, "latency_p95_s": phases[p]["latency_p95_s"]}
                          for p, (m, n) in counts.items()},
            "gateway_slo_attainment": info["slo_attainment"],
            "decisions": len(decisions), "knob_changes": sum(d["changed"] for d in decisions),
            "plan_s_max": max((d["plan_s"] for d in decisions), default=None),
            "final_knobs": info["policy"].get("knobs"),
        }
        if decisions:
            (out / f"{label}-decisions.jsonl").write_text("".join(json.dumps(d) + "\n" for d in decisions))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
