"""The paper's SLO and deadline rule, shared by the simulator and the deploy gateway.

- Base SLO: the sum, over the standard 15-call CHESS workflow, of each call's expected single-call
  latency averaged over the cluster's engine types. A query's SLO = scale x base.
- A call's deadline: the proportional slice of what remains of its query's budget,
  now + remaining x E(call) / (E(call) + E(rest of the standard workflow)).
  Workflows that are longer or shorter than the standard one are mapped onto it position by
  position: a call takes the next standard position with the same step (or stays put).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

REFERENCE_PATH = Path(__file__).resolve().parent.parent / "data" / "reference" / "hexgen_stage_latency.json"


@lru_cache(maxsize=1)
def _standard_workflow() -> tuple[str, ...]:
    with open(REFERENCE_PATH) as handle:
        return tuple(json.load(handle)["standard_workflow"])


def standard_workflow() -> list[str]:
    """The paper's standard 15-call CHESS workflow (the SLO rule's reference)."""
    return list(_standard_workflow())


@dataclass
class SLOModel:
    expected_s: dict[str, float]  # step -> expected solo latency averaged over the cluster's engine types
    standard: list[str]

    def __post_init__(self) -> None:
        default = sum(self.expected_s.values()) / max(1, len(self.expected_s))
        self._default_s = default
        per_position = [self.expected_s.get(step, default) for step in self.standard]
        # rest_after[p]: expected seconds of the standard workflow after position p
        self.rest_after = [0.0] * (len(per_position) + 1)
        for p in range(len(per_position) - 1, -1, -1):
            self.rest_after[p] = self.rest_after[p + 1] + (per_position[p + 1] if p + 1 < len(per_position) else 0.0)
        self.base_slo_s = sum(per_position)
        self._positions: dict[str, list[int]] = {}
        for p, step in enumerate(self.standard):
            self._positions.setdefault(step, []).append(p)

    @classmethod
    def from_engine_latencies(cls, per_engine_type: Sequence[Mapping[str, float]],
                              standard: Sequence[str] | None = None) -> "SLOModel":
        """Average each step's expected latency over distinct engine types."""
        steps = set().union(*[set(t) for t in per_engine_type])
        expected = {s: sum(t[s] for t in per_engine_type if s in t) / sum(1 for t in per_engine_type if s in t)
                    for s in steps}
        return cls(expected, list(standard) if standard is not None else standard_workflow())

    def expected(self, step: str) -> float:
        return self.expected_s.get(step, self._default_s)

    def position(self, step: str, pointer: int) -> int:
        """Standard-workflow position of a call of `step` when the workflow has reached `pointer`."""
        for p in self._positions.get(step, ()):
            if p >= pointer:
                return p
        return min(pointer, len(self.standard) - 1)

    def remaining_after(self, position: int) -> float:
        return self.rest_after[min(max(position, 0), len(self.standard))]

    def call_deadline_s(self, now_s: float, workflow_deadline_s: float, step: str, position: int) -> float:
        remaining = max(0.0, workflow_deadline_s - now_s)
        e = self.expected(step)
        rest = self.remaining_after(position)
        return now_s + remaining * (e / (e + rest) if e + rest > 0 else 1.0)
