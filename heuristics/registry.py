"""Named policies: a name maps to a (dispatcher, local order) pair with default knobs.

Adding a heuristic: write its class (heuristics/dispatch.py or heuristics/local.py) and add a
line here.
"""

from __future__ import annotations

from typing import Any, Callable

from heuristics.base import Dispatcher, LocalOrder
from heuristics.dispatch import RoundRobin
from heuristics.local import FCFS

DISPATCHERS: dict[str, Callable[..., Dispatcher]] = {
    "round-robin": RoundRobin,
}
LOCAL_ORDERS: dict[str, Callable[..., LocalOrder]] = {
    "fcfs": FCFS,
}
# policy name -> (dispatcher name, local order name)
NAMED: dict[str, tuple[str, str]] = {
    "rr": ("round-robin", "fcfs"),
}


def describe() -> dict[str, Any]:
    return {name: {"dispatch": d, "local": l} for name, (d, l) in NAMED.items()}
