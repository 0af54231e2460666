"""The engine model against published vLLM measurements: real vs simulated E2E, TTFT and TPOT.

Every point of envs/data/reference/published_vllm.json (one vLLM engine, a stated model, GPU, TP,
precision and workload, with its source) is simulated with the catalog's roofline factors: a
one-engine cluster with the run's scheduler limits, and a synthetic workload of single-call
requests at the run's mean input/output lengths, driven as the benchmark client drove the real
engine:
- `max_concurrency: C` (vllm bench serve with a concurrency cap): a closed loop of C clients, each
  sending its next request when its last one finished. Requests are identical, so C clients over N
  requests are C workflows of about N/C sequential calls, all starting at time 0 (exactly the
  semaphore of `vllm bench serve`, no rate approximation);
- `request_rate: inf` without a cap: all N requests at time 0 (a burst);
- a finite `request_rate`: N single-call workflows at seeded Poisson times.
The points run BF16 weights, so they are simulated with the catalog's `w16` roofline factors (the
`w4` ones come from hexgen_stage_latency.json, 4-bit weights). `--fit` fits per-GPU factors
(compute, memory, overhead, within the physical bounds of envs.sim.calibration) to the points whose
`split` is `fit`, and nothing else, and simulates every point with them; `--fit --write` stores
them as the `w16` class of envs/data/gpus.yaml, which is how the shipped `w16` factors were made.
The headline figures of both modes are over `validate` points only, so no reported validation
figure was fitted to. A run counts as saturated in the simulator when it served less than 90% of
an offered finite rate (closed loops and bursts are never "stable" or "saturated": they queue by
construction).

Run: PYTHONPATH=. .venv/bin/python benchmarks/published_vllm.py [--fit [--write]] [--ids ID,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt
from rich.console import Console
from rich.table import Table
from scipy.optimize import least_squares

from agentsched.cli import ScriptArgumentParser, run_argparse_script
from envs.sim.calibration import LOWER, REFERENCE_WEIGHT_BITS, UPPER, write_factors
from envs.sim.catalog import DATA_DIR, Efficiency, load_catalog, weight_class_of
from envs.sim.cluster import ClusterSimulator
from envs.sim.config import ClusterConfig, EngineConfig
from envs.sim.perf import RooflineModel
from envs.sim.workload import CallSpec, PoissonArrivals, WorkflowSpec

PUBLISHED_PATH = DATA_DIR / "reference" / "published_vllm.json"
STEP = "request"
SATURATED_SHARE = 0.9  # served / offered rate below this: the simulated engine cannot keep up
GOAL_MEDIAN_E2E_ERROR = 0.15
PRIOR_WEIGHT = 0.1  # weight of log(factor / the GPU's w4 factor) beside the fit points' log errors in --fit


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=8)
    repo: str | None = None
    path: str | None = None
    section: str = Field(min_length=1)


class EngineLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_num_seqs: PositiveInt
    max_num_batched_tokens: PositiveInt
    gpu_memory_utilization: float = Field(gt=0.0, le=1.0)


class Workload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str
    input_tokens: PositiveFloat
    output_tokens: PositiveFloat
    lengths: str
    num_requests: PositiveInt
    request_rate: PositiveFloat | Literal["inf"]
    max_concurrency: PositiveInt | None = None


class Measured(BaseModel):
    model_config = ConfigDict(extra="forbid")
    duration_s: PositiveFloat | None = None
    mean_ttft_ms: PositiveFloat | None = None
    mean_tpot_ms: PositiveFloat | None = None
    mean_e2e_ms: PositiveFloat
    mean_e2e_derived: bool = False


class PublishedPoint(BaseModel):
    """One published measurement of a vLLM engine under a stated load."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    split: Literal["fit", "validate"]
    source: Source
    model: str
    hf_model: str
    gpu: str
    gpu_variant: str
    tp: Literal[1, 2, 4, 8]
    precision: str
    weight_bits: Literal[4, 8, 16]
    kv_bits: Literal[4, 8, 16]
    vllm_version: str = Field(min_length=1)
    engine: EngineLimits
    workload: Workload
    measured: Measured


class PublishedSet(BaseModel):
    model_config = ConfigDict(extra="allow")
    points: list[PublishedPoint] = Field(min_length=1)


class Simulated(BaseModel):
    """Simulated counterparts of a point's measured figures."""

    mean_ttft_ms: float
    mean_tpot_ms: float
    mean_e2e_ms: float
    duration_s: float
    served_rate_qps: float
    saturated: bool


def load_points(path: Path = PUBLISHED_PATH) -> list[PublishedPoint]:
    return PublishedSet.model_validate(json.loads(path.read_text())).points


def cluster_for(point: PublishedPoint) -> ClusterConfig:
    return ClusterConfig(name=point.id, engines=[EngineConfig(
        gpu=point.gpu, model=point.model, tp=point.tp, weight_bits=point.weight_bits, kv_bits=point.kv_bits,
        max_num_seqs=point.engine.max_num_seqs, max_num_batched_tokens=point.engine.max_num_batched_tokens,
        gpu_memory_utilization=point.engine.gpu_memory_utilization, name=point.gpu)])


def workload_for(point: PublishedPoint, seed: int = 0) -> tuple[list[WorkflowSpec], np.ndarray]:
    """Workflows and arrival times that drive the engine as the point's benchmark client did."""
    load = point.workload
    call = CallSpec(STEP, max(1, round(load.input_tokens)), max(1, round(load.output_tokens)))
    n = load.num_requests
    if load.request_rate == "inf":
        clients = min(n, load.max_concurrency or n)
        per_client = [n // clients + (1 if j < n % clients else 0) for j in range(clients)]
        workflows = [WorkflowSpec(tuple((call,) for _ in range(k)), source=point.id) for k in per_client]
        return workflows, np.zeros(len(workflows))
    workflows = [WorkflowSpec(((call,),), source=point.id) for _ in range(n)]
    times = PoissonArrivals(rate_qps=load.request_rate).times(n, np.random.default_rng(seed))
    return workflows, times - times[0]


def build_simulator(point: PublishedPoint, seed: int = 0, efficiency: Efficiency | None = None) -> ClusterSimulator:
    """The point's one-engine simulator; `efficiency` replaces the catalog's roofline factors of its GPU."""
    workflows, times = workload_for(point, seed)
    call = workflows[0].stages[0][0]
    sim = ClusterSimulator(cluster_for(point), workflows, times, slo_scale=1.0, standard=[STEP],
                           step_tokens={STEP: (float(call.input_tokens), float(call.output_tokens))})
    if efficiency is not None:
        catalog = load_catalog()
        sim.engines[0].perf = RooflineModel(catalog.gpu(point.gpu), catalog.model(point.model), point.tp,
                                            point.weight_bits, point.kv_bits, efficiency=efficiency)
    return sim


def simulate_point(point: PublishedPoint, seed: int = 0, efficiency: Efficiency | None = None) -> Simulated:
    """Run the point's workload to the end on its one engine and measure as vllm bench serve does
    (TTFT and E2E from the moment the client sends the request)."""
    sim = build_simulator(point, seed, efficiency)
    while (call := sim.next_decision()) is not None:
        sim.dispatch(call, 0)
    calls = sim.calls
    if any(math.isnan(c.finish_time_s) for c in calls):
        raise RuntimeError(f"{point.id}: {sum(math.isnan(c.finish_time_s) for c in calls)} requests did not finish")
    ttft = [c.first_token_time_s - c.ready_time_s for c in calls]
    e2e = [c.finish_time_s - c.ready_time_s for c in calls]
    tpot = [(c.finish_time_s - c.first_token_time_s) / (c.output_tokens - 1) for c in calls if c.output_tokens > 1]
    start = min(c.ready_time_s for c in calls)
    duration = max(c.finish_time_s for c in calls) - start
    served = len(calls) / duration if duration > 0 else math.inf
    rate = point.workload.request_rate
    saturated = rate != "inf" and served < SATURATED_SHARE * float(rate)
    return Simulated(mean_ttft_ms=1e3 * statistics.fmean(ttft), mean_tpot_ms=1e3 * statistics.fmean(tpot) if tpot else 0.0,
                     mean_e2e_ms=1e3 * statistics.fmean(e2e), duration_s=duration, served_rate_qps=served,
                     saturated=saturated)


def relative_error(simulated: float, measured: float | None) -> float | None:
    return None if measured is None else simulated / measured - 1.0


def fit_split(points: list[PublishedPoint]) -> list[PublishedPoint]:
    """The points factors may be fitted to."""
    return [p for p in points if p.split == "fit"]


def fit_efficiency(fit_points: list[PublishedPoint]) -> dict[str, Efficiency]:
    """Per GPU type: the factors that best reproduce the E2E and TPOT of `fit_points` (least squares
    on log ratios, within the physical bounds), in the weight class the points run. Refuses any
    point whose split is not `fit`, so no validation point can leak into the factors.

    A weak prior pulls towards the GPU's `w4` factors (fitted to hexgen_stage_latency.json, never to
    these points), not towards the shipped `w16` ones, so that a refit gives the same factors
    whatever gpus.yaml held before."""
    leaked = [p.id for p in fit_points if p.split != "fit"]
    if leaked:
        raise ValueError(f"fit_efficiency: points {', '.join(leaked)} are not in the `fit` split")
    catalog = load_catalog()
    by_gpu: dict[str, list[PublishedPoint]] = {}
    for point in fit_points:
        by_gpu.setdefault(catalog.canonical_gpu(point.gpu), []).append(point)
    fitted = {}
    for gpu, gpu_points in by_gpu.items():
        spec = catalog.gpu(gpu)
        classes = {weight_class_of(p.weight_bits) for p in gpu_points}
        if len(classes) != 1:
            raise ValueError(f"fit_efficiency: the fit points of {gpu} mix weight classes {sorted(classes)}")
        prior = spec.efficiency_for(REFERENCE_WEIGHT_BITS)
        x0 = np.clip(np.log([prior.compute, prior.memory, max(prior.overhead_s, LOWER[2])]),
                     np.log(LOWER) + 1e-6, np.log(UPPER) - 1e-6)

        def residuals(x: np.ndarray, gpu_points=gpu_points, x0=x0) -> np.ndarray:
            eff = Efficiency(compute=math.exp(x[0]), memory=math.exp(x[1]), overhead_s=math.exp(x[2]))
            out = []
            for point in gpu_points:
                sim, m = simulate_point(point, efficiency=eff), point.measured
                # E2E and TPOT only: a lightly loaded engine's TTFT is mostly per-request API-server time
                # (HTTP, chat template, tokenisation), which the iteration model does not hold
                for simulated, measured in ((sim.mean_e2e_ms, m.mean_e2e_ms), (sim.mean_tpot_ms, m.mean_tpot_ms)):
                    if measured is not None:
                        out.append(math.log(max(simulated, 1e-9) / measured))
            # what the fit points cannot tell apart (e.g. memory efficiency from prefill-bound
            # points) stays near the prior
            out.extend(PRIOR_WEIGHT * (x - x0))
            return np.array(out)

        x = least_squares(residuals, x0=x0, bounds=(np.log(LOWER), np.log(UPPER)), diff_step=1e-3).x
        c, m, o = np.exp(x)
        fitted[gpu] = Efficiency(compute=round(float(c), 4), memory=round(float(m), 4), overhead_s=round(float(o), 5))
    return fitted


def _percent(error: float | None) -> str:
    return "-" if error is None else f"{error:+.0%}"


def _load_label(point: PublishedPoint) -> str:
    load = point.workload
    if load.request_rate != "inf":
        return f"{load.request_rate:g} req/s"
    return f"closed loop C={load.max_concurrency}" if load.max_concurrency else f"burst of {load.num_requests}"


def main() -> None:
    parser = ScriptArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", default="", help="comma-separated point ids (default: all)")
    parser.add_argument("--json", default="", help="also write the per-point figures to this JSON file")
    parser.add_argument("--fit", action="store_true",
                        help="fit per-GPU factors to the `fit` points and simulate every point with them")
    parser.add_argument("--write", action="store_true",
                        help="with --fit: store the fitted factors as the w16 class in envs/data/gpus.yaml")
    args = parser.parse_args()
    if args.write and not args.fit:
        print("--write: needs --fit (it stores the factors --fit finds)", file=sys.stderr)
        raise SystemExit(2)
    points = load_points()
    console = Console(width=220)
    fitted: dict[str, Efficiency] = {}
    if args.fit:
        fit_points = fit_split(points)
        classes = {weight_class_of(p.weight_bits) for p in fit_points}
        if len(classes) != 1:
            raise ValueError(f"the fit points mix weight classes {sorted(classes)}; fit them one class at a time")
        weight_class = classes.pop()
        fitted = fit_efficiency(fit_points)
        catalog = load_catalog()
        for gpu, eff in fitted.items():
            spec = catalog.gpu(gpu)
            console.print(f"fitted to the `fit` points of {gpu}: {eff.model_dump()} (shipped {weight_class}: "
                          f"{spec.efficiency[weight_class].model_dump()}, {spec.efficiency_source(weight_class)})")
        if args.write:
            write_factors(fitted, weight_class)
            console.print(f"wrote the {weight_class} factors to {DATA_DIR / 'gpus.yaml'}")
    if args.ids:
        wanted = set(args.ids.split(","))
        unknown = wanted - {p.id for p in points}
        if unknown:
            print(f"--ids: unknown point(s) {', '.join(sorted(unknown))}; known: {', '.join(p.id for p in points)}",
                  file=sys.stderr)
            raise SystemExit(2)
        points = [p for p in points if p.id in wanted]
    factors = "factors fitted to the `fit` points" if args.fit else "shipped factors"
    table = Table(title=f"published vLLM measurements vs the simulator, {factors} (errors: sim / real - 1)")
    for column in ("point", "gpu", "model", "in/out", "load", "E2E real s", "E2E sim s", "E2E err",
                   "TTFT real ms", "TTFT sim ms", "TTFT err", "TPOT real ms", "TPOT sim ms", "TPOT err",
                   "dur err", "split"):
        table.add_column(column, justify="left" if column in ("point", "gpu", "model", "load", "split") else "right")
    rows = []
    for point in points:
        sim = simulate_point(point, efficiency=fitted.get(load_catalog().canonical_gpu(point.gpu)))
        m = point.measured
        errors = {"e2e": relative_error(sim.mean_e2e_ms, m.mean_e2e_ms),
                  "ttft": relative_error(sim.mean_ttft_ms, m.mean_ttft_ms),
                  "tpot": relative_error(sim.mean_tpot_ms, m.mean_tpot_ms),
                  "duration": relative_error(sim.duration_s, m.duration_s)}
        rows.append({"id": point.id, "split": point.split, "simulated": sim.model_dump(), "measured": m.model_dump(),
                     "errors": errors})
        table.add_row(point.id, point.gpu, point.model, f"{point.workload.input_tokens:.0f}/{point.workload.output_tokens:.0f}",
                      _load_label(point) + (" SATURATED" if sim.saturated else ""),
                      f"{m.mean_e2e_ms / 1e3:.2f}", f"{sim.mean_e2e_ms / 1e3:.2f}", _percent(errors["e2e"]),
                      "-" if m.mean_ttft_ms is None else f"{m.mean_ttft_ms:.0f}", f"{sim.mean_ttft_ms:.0f}", _percent(errors["ttft"]),
                      "-" if m.mean_tpot_ms is None else f"{m.mean_tpot_ms:.1f}", f"{sim.mean_tpot_ms:.1f}", _percent(errors["tpot"]),
                      _percent(errors["duration"]), point.split)
    console.print(table)
    validation = [r for r in rows if r["split"] == "validate"]
    if validation:
        for key in ("e2e", "ttft", "tpot", "duration"):
            values = [abs(r["errors"][key]) for r in validation if r["errors"][key] is not None]
            if values:
                console.print(f"validation points: median |{key} error| {statistics.median(values):.1%} over {len(values)}")
        median_e2e = statistics.median(abs(r["errors"]["e2e"]) for r in validation)
        saturated = [r["id"] for r in validation if r["simulated"]["saturated"]]
        console.print(f"goal: median |E2E error| <= {GOAL_MEDIAN_E2E_ERROR:.0%}: "
                      f"{'met' if median_e2e <= GOAL_MEDIAN_E2E_ERROR else 'NOT met'} ({median_e2e:.1%}); "
                      f"runs saturated in the simulator that were stable on the real engine: {saturated or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    run_argparse_script(main)
