"""Named policies: a name maps to a dispatcher and a local order, with default knobs.

Adding a heuristic: write its class (heuristics/dispatch.py or heuristics/local.py), add it to
DISPATCHERS or LOCAL_ORDERS, and give useful combinations a name in NAMED.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from heuristics.admission import Admission, DeferLate
from heuristics.base import Dispatcher, LocalOrder
from heuristics.cache_aware import DynamoKV, PrebleE2, PrefixScoring, SGLangCacheAware
from heuristics.dispatch import LeastOutstandingRequests, LeastWork, RandomDispatch, RoundRobin, WeightedScoring, WorkloadBalanced
from heuristics.local import FCFS, EarliestDeadlineFirst, TenantPriority, Urgency, UrgencyTriage, WorkflowFirst
from heuristics.peers import (
    AdaptiveThreadLevelAttainedService,
    ApplicationFIFO,
    AutellixLoadBalancer,
    HexagentRisk,
    JustitiaVirtualFinish,
    KairosMemoryDispatch,
    KairosPriority,
    ParrotPlacement,
    ProgramLevelAttainedService,
)

DISPATCHERS: dict[str, Callable[..., Dispatcher]] = {
    "round-robin": RoundRobin,
    "random": RandomDispatch,
    "least-outstanding": LeastOutstandingRequests,
    "least-work": LeastWork,
    "weighted-scoring": WeightedScoring,
    "workload-balanced": WorkloadBalanced,
    # cache-aware routers (heuristics/cache_aware.py)
    "prefix-scoring": PrefixScoring,
    "sglang-cache-aware": SGLangCacheAware,
    "dynamo-kv": DynamoKV,
    "preble": PrebleE2,
    "autellix-lb": AutellixLoadBalancer,
    "kairos-memory": KairosMemoryDispatch,
    "parrot-colocate": ParrotPlacement,
}
LOCAL_ORDERS: dict[str, Callable[..., LocalOrder]] = {
    "fcfs": FCFS,
    "edf": EarliestDeadlineFirst,
    "urgency": Urgency,
    "urgency-triage": UrgencyTriage,
    "workflow-first": WorkflowFirst,
    "priority": TenantPriority,
    "plas": ProgramLevelAttainedService,
    "atlas": AdaptiveThreadLevelAttainedService,
    "kairos-priority": KairosPriority,
    "app-fifo": ApplicationFIFO,
    "justitia-vft": JustitiaVirtualFinish,
    "hexagent-risk": HexagentRisk,
}

# workflow-level admission rules (heuristics/admission.py): a policy file's optional `admission` section
ADMISSIONS: dict[str, Callable[..., Admission]] = {
    "defer-late": DeferLate,
}


# the shipped policies (policies/pretrained/NAME/): a tuned heuristic's knobs live in its policy file only
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "policies" / "pretrained"


@dataclass(frozen=True)
class Named:
    """A named combination: dispatcher and local order names, default knobs, and why it exists."""

    dispatch: str
    local: str
    dispatch_knobs: dict[str, Any] = field(default_factory=dict)
    local_knobs: dict[str, Any] = field(default_factory=dict)
    about: str = ""

    def __iter__(self):  # unpacks as (dispatch, local), like the original pairs
        return iter((self.dispatch, self.local))

    def __getitem__(self, i: int) -> str:
        return (self.dispatch, self.local)[i]


def named_from_policy_file(path: Path, about: str) -> Named:
    """A named combination whose layers and knobs are a shipped heuristic policy file's."""
    spec = yaml.safe_load(path.read_text())
    dispatch, local = dict(spec["dispatch"]), dict(spec["local"])
    return Named(dispatch.pop("name"), local.pop("name"), dispatch, local, about=about)


NAMED: dict[str, Named] = {
    "rr": Named("round-robin", "fcfs", about="vLLM instances behind a round-robin load balancer (the paper's baseline)"),
    "random": Named("random", "fcfs", about="uniformly random engine, FCFS"),
    "lor": Named("least-outstanding", "fcfs", about="least outstanding requests (Vidur, vLLM production-stack), FCFS"),
    "least-work": Named("least-work", "fcfs", about="earliest expected finish (outstanding work + T_e(s)), FCFS"),
    "llmd": Named("weighted-scoring", "fcfs", about="llm-d scorer: queue depth x2 + KV-cache use x2, FCFS"),
    "hexgen": Named("workload-balanced", "urgency", about="HexGen-Text2SQL: workload-balanced (cumulative W) + urgency"),
    "hexgen-outstanding": Named("workload-balanced", "urgency", {"work": "outstanding"},
                                about="HexGen with outstanding (unfinished) work as W + urgency"),
    "rr+urgency": Named("round-robin", "urgency", about="ablation: round robin + urgency order"),
    "wb+fcfs": Named("workload-balanced", "fcfs", about="ablation: workload-balanced (cumulative W) + FCFS"),
    "wbo+fcfs": Named("workload-balanced", "fcfs", {"work": "outstanding"},
                      about="ablation: workload-balanced (outstanding W) + FCFS"),
    "least-work+urgency": Named("least-work", "urgency", about="earliest expected finish + urgency order"),
    "rr+edf": Named("round-robin", "edf", about="round robin + earliest deadline first"),
    "hexgen+triage": Named("workload-balanced", "urgency-triage",
                           about="HexGen, with calls that can no longer meet their deadline queued last"),
    "least-work+workflow": named_from_policy_file(
        SHIPPED_DIR / "least-work+workflow" / "policy.yaml",
        about="earliest expected finish with the backlog discounted for batching and full engines penalised + whole "
              "workflows first (hopeless calls last); the recommended policy (knobs tuned on tuning seeds, in its "
              "policy file)"),
    # cache-aware routers, with their published defaults (heuristics/cache_aware.py)
    "llmd-prefix": Named("prefix-scoring", "fcfs",
                         about="llm-d default profile: prefix-cache x3 + queue depth x2 + KV-cache use x2, FCFS"),
    "sglang-cache-aware": Named("sglang-cache-aware", "fcfs",
                                about="SGLang router cache_aware: longest prefix match above 0.3 of the prompt, else "
                                      "smallest cache; least loaded when imbalanced, FCFS"),
    "dynamo-kv": Named("dynamo-kv", "fcfs", about="NVIDIA Dynamo KV router: 2 x overlap - KV use - normalised waiting, FCFS"),
    "preble": Named("preble", "fcfs", about="Preble E2: exploit the longest cached prefix if it covers most of the prompt, "
                                            "else explore the least loaded engine, FCFS"),
    # published workflow-aware schedulers (heuristics/peers.py has each rule, its source and which constants are ours)
    "autellix-plas": Named("autellix-lb", "plas",
                           about="Autellix (arXiv 2502.13965): least attained service of the workflow in multi-level "
                                 "queues with anti-starvation; short calls to the least-loaded engine, long ones sticky"),
    "autellix-atlas": Named("autellix-lb", "atlas",
                            about="Autellix ATLAS: least attained service along the workflow's critical path; same "
                                  "load balancer"),
    "kairos": Named("kairos-memory", "kairos-priority",
                    about="Kairos (arXiv 2508.06948): shortest remaining workflow latency first, memory-aware dispatch"),
    "parrot": Named("parrot-colocate", "app-fifo",
                    about="Parrot (OSDI'24): application FIFO, calls of a workflow co-located, batch cap for "
                          "latency-critical calls"),
    "justitia": Named("least-outstanding", "justitia-vft",
                      about="Justitia (arXiv 2510.17015): workflows in virtual-finish order under fair sharing, "
                            "memory-centric cost; behind a least-outstanding-requests router"),
    "hexagent-risk": Named("workload-balanced", "hexagent-risk",
                           about="HexAGenT (arXiv 2605.16637): highest projected risk of missing the workflow "
                                 "horizon first; HexGen's workload-balanced dispatch"),
}

PEERS = ("autellix-plas", "autellix-atlas", "kairos", "parrot", "justitia", "hexagent-risk")


def describe() -> dict[str, Any]:
    return {name: {"dispatch": n.dispatch, "local": n.local, "dispatch_knobs": n.dispatch_knobs,
                   "local_knobs": n.local_knobs, "about": n.about} for name, n in NAMED.items()}
