"""An evaluation cell: a workload, a cluster, a load level and shape, and an SLO scale; the unit
that `agentsched evaluate`, the league, the headroom table and the benchmark env ids
(`envs.gym.benchmark`) are measured on. `cell.run_spec(seed)` is one `simulate` run.

Load shapes (the "shifting" load):
- constant: Poisson at the rate;
- step: Poisson at 0.5 x rate for the first half of the expected span, then 1.5 x rate;
- burst: Poisson at 0.5 x rate, with a burst at 3 x rate for a sixth of the expected span starting
  at a third of it (the same number of queries arrives in a shorter, rougher window).
"""

from __future__ import annotations

from dataclasses import dataclass

from envs.sim.errors import UserError
from envs.sim.scenario import RunSpec
from envs.sim.workload import PiecewiseArrivals, PoissonArrivals, RateSegment

LOADS = ("constant", "step", "burst")


def shaped_arrivals(load: str, rate_qps: float, queries: int) -> PoissonArrivals | PiecewiseArrivals:
    """The arrival process of a load shape (module docstring) at mean rate `rate_qps` for a run of
    `queries`: the shape's phases are fractions of the run's expected span, so a shorter run has
    the same shape, compressed. Training scenarios draw the same shapes (`Scenario.arrivals`)."""
    if load not in LOADS:
        raise UserError(f"load: unknown load shape {load!r} (use {', '.join(LOADS)})")
    r = rate_qps
    span_s = queries / r  # expected span of the arrivals at the mean rate
    if load == "constant":
        return PoissonArrivals(rate_qps=r)
    if load == "step":
        return PiecewiseArrivals(segments=[RateSegment(duration_s=span_s / 2, rate_qps=0.5 * r),
                                           RateSegment(duration_s=100 * span_s, rate_qps=1.5 * r)])
    return PiecewiseArrivals(segments=[RateSegment(duration_s=span_s / 3, rate_qps=0.5 * r),
                                       RateSegment(duration_s=span_s / 6, rate_qps=3.0 * r),
                                       RateSegment(duration_s=100 * span_s, rate_qps=0.5 * r)])


@dataclass(frozen=True)
class Cell:
    trace: str = "chess_trace1"
    cluster: str = "paper"
    rate_qps: float = 0.1
    load: str = "constant"
    slo_scale: float = 3.0
    queries: int = 60
    generated: bool = False
    prefix_cache: bool = True  # vLLM's automatic prefix caching on every engine

    def __post_init__(self) -> None:
        if self.load not in LOADS:
            raise UserError(f"--load: unknown load shape {self.load!r} (use {', '.join(LOADS)})")
        if not self.rate_qps > 0:
            raise UserError(f"--rate: must be > 0, got {self.rate_qps}")

    @property
    def label(self) -> str:
        return f"{self.cluster}/{self.trace}/{self.load}@{self.rate_qps:g}"

    def arrivals(self) -> PoissonArrivals | PiecewiseArrivals:
        return shaped_arrivals(self.load, self.rate_qps, self.queries)

    def run_spec(self, seed: int) -> RunSpec:
        return RunSpec(trace=self.trace, cluster=self.cluster, rate_qps=self.rate_qps, slo_scale=self.slo_scale,
                       seed=seed, queries=self.queries, generated=self.generated, arrivals=self.arrivals(),
                       prefix_cache=self.prefix_cache)
