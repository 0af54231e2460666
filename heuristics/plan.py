"""Capacity planning behind `agentsched plan`: the cheapest heterogeneous cluster (count per engine
type: GPU x tensor-parallel degree x weight precision) whose SLO attainment on test seeds reaches a
target, with a given scheduling policy or one tuned per candidate.

Two stages, as in Mélange (arXiv 2404.14527, tyler-griggs/melange-release `melange/solver.py`):

1. **Integer program (no simulation).** Mélange profiles each GPU type's maximum throughput for
   each request-size bucket under the SLO, then solves an ILP: integer GPU counts, each bucket's
   load assigned to GPU types, sum over a type's assigned buckets of rate / throughput <= its
   count, minimise price. Here a *bucket* is a workflow step (its calls have a typical size:
   router calls are a few hundred tokens, candidate generations ~10k), the throughput comes from
   the engine model instead of a profile, and the assignment is continuous (Mélange's slices with
   the slice factor taken to infinity):

       minimise   sum_e price_e * n_e
       subject to sum_e x[s, e] = 1                                   every step s with demand
                  headroom * sum_s demand_s * x[s, e] / tput[s, e] <= n_e   every engine type e
                  sum_e gpus_e * n_e <= max_gpus                      (optional)
                  n_e integer >= 0, 0 <= x[s, e] <= 1, x[s, e] = 0 where tput[s, e] = 0

   solved with `scipy.optimize.milp` (HiGHS).

   *Throughput model* (`step_throughput`): B calls of one step (the step's mean input and output
   tokens) share an engine. Prefills are compute-bound and do not batch, so each call costs the
   engine its solo prefill time P (the engine model's chunked prefill); the B calls decode together
   for `output - 1` iterations, D(B) (the engine model's closed-form decode segment, context
   growing by B per iteration). Engine time per call is P + D(B) / B, so throughput is
   B / (B * P + D(B)) and, by Little's law, a call's latency is B * P + D(B). The max throughput
   under the SLO is at the largest B whose latency fits the step's share of the workflow SLO
   (`slo_scale` x the step's expected latency in the SLO rule), within `max_num_seqs` and the KV
   cache (B x context tokens). An engine whose KV cache cannot hold the step's largest call, or
   whose solo latency is over the budget, has throughput 0 for that step. Queueing is not in the
   model: `headroom` (> 1) keeps engines below their modelled maximum. Prefix caching is not in it
   either (it only lowers the real prefill cost), so with the cache on the program over-provisions
   and the search below removes what is not needed.

   Demand: calls/s of each step = the load's sustained rate (constant: the rate; step: its 1.5x
   second half; burst: the mean rate, the burst is absorbed by queues) x the trace's calls of
   that step per query.

2. **Simulation refines (local search).** Every candidate is simulated with the policy on the
   *tuning* seeds (pooled attainment); the answer is verified on separate *test* seeds.
   - moves: remove one engine, add one engine, or swap one engine for another engine type, among
     the types of the program's answer and, per GPU type, the engine type of its cheapest
     homogeneous program answer;
   - repair (while the current cluster misses the target): simulate every add-one neighbour and
     the program re-solved with 1.25x more headroom; move to the cheapest that meets the target,
     else to the one with the highest attainment;
   - descent (once it meets the target): simulate the cheaper neighbours cheapest first, `workers`
     at a time; move to the cheapest that meets the target; stop when none does (a local optimum);
   - the cheapest cluster that met the target is then simulated on the test seeds (if it misses
     there, the next cheapest that met it on the tuning seeds, up to `VERIFY_CANDIDATES`).
   Every simulated cluster is cached, and its (price, attainment) makes the Pareto front.

Comparisons: (a) the program's answer alone, simulated; (b) the cheapest homogeneous cluster of
each GPU type (one engine type, the one its own program picks; the count found by doubling and
bisection over simulations); (c) the paper cluster. All are simulated on the test seeds.

The SLO is one number of seconds for every candidate: `slo_scale` x the base SLO of a reference
cluster (default `paper`, so the scale means what it means in `simulate --cluster paper`). The
simulator derives its base SLO from the simulated cluster's own engine types, so each candidate
runs with the scale that gives that same absolute SLO.
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import optuna
import yaml
from scipy.optimize import Bounds, LinearConstraint, milp

from envs.seeds import TEST_SEED_BASE, TUNE_SEED_BASE
from envs.sim.catalog import Catalog, load_catalog
from envs.sim.cells import LOADS, Cell
from envs.sim.config import ClusterConfig, EngineConfig, load_cluster
from envs.sim.errors import UserError
from envs.sim.model import EngineModel, StepTokens, build_engine_model
from envs.sim.perf import solo_call_latency_s
from envs.sim.scenario import RunSpec, build_simulator, simulate, workload_for
from envs.sim.workload import step_mean_tokens
from heuristics.bench import MIN_SPAN_SLOS, PolicyRef, make_policy
from heuristics.tune import knob_values, search_space, spec_with
from policies.loader import RECOMMENDED_POLICY

TP_DEGREES = (1, 2, 4, 8)
WEIGHT_BITS = (4, 8, 16)
DEFAULT_GPUS = ("H100", "A100-80G", "L40S", "A6000")
DEFAULT_MODEL = "Llama-3.1-70B"
DEFAULT_POLICY = RECOMMENDED_POLICY
DEFAULT_HEADROOM = 1.2
DEFAULT_GPU_CAP = 64  # the search never goes past this many GPUs without --max-gpus
DEFAULT_QUERIES = 50  # at least; by default enough queries that arrivals span MIN_SPAN_SLOS SLOs
DEFAULT_TUNE_TRIALS = 4
REPAIR_HEADROOM_STEP = 1.25
MAX_REPAIR_STEPS = 8
MAX_DESCENT_STEPS = 40
VERIFY_CANDIDATES = 3
# the program's demand rate as a multiple of --rate, per load shape (see the module docstring)
SUSTAINED_RATE_FACTOR = {"constant": 1.0, "step": 1.5, "burst": 1.0}
assert set(SUSTAINED_RATE_FACTOR) == set(LOADS)


# ---- engine types and the throughput model ------------------------------------------------------

@dataclass(frozen=True)
class EngineOption:
    """One engine type the planner may rent: a GPU type, a TP degree and a weight precision."""

    gpu: str
    tp: int
    weight_bits: int
    price_per_hour: float  # the whole engine (tp GPUs)
    price_overridden: bool = False

    @property
    def label(self) -> str:
        return f"{self.gpu} tp{self.tp} w{self.weight_bits}"

    def engine_config(self, model: str, count: int = 1) -> EngineConfig:
        return EngineConfig(gpu=self.gpu, model=model, tp=self.tp, weight_bits=self.weight_bits, count=count,
                            price_per_hour=self.price_per_hour if self.price_overridden else None)


@dataclass(frozen=True)
class StepDemand:
    """What the workload asks of one step: its call rate, typical size and latency budget."""

    step: str
    calls_per_s: float
    mean_input_tokens: float
    mean_output_tokens: float
    max_context_tokens: int  # the step's largest call (input + output): it must fit the KV cache
    budget_s: float  # the step's share of the workflow SLO


def engine_options(gpus: Sequence[str], model: str, catalog: Catalog, prices: dict[str, float] | None = None,
                   tps: Sequence[int] = TP_DEGREES, bits: Sequence[int] = WEIGHT_BITS
                   ) -> list[tuple[EngineOption, EngineModel]]:
    """Every (GPU, TP, weight bits) whose weights leave room for KV (`build_engine_model` accepts
    it), with its engine model. `prices`: USD per GPU-hour by canonical GPU name (overrides)."""
    prices = prices or {}
    out = []
    for gpu in gpus:
        name = catalog.canonical_gpu(gpu)
        per_gpu = prices.get(name, catalog.gpu(name).price_per_hour)
        for tp in tps:
            for wbits in bits:
                option = EngineOption(name, tp, wbits, per_gpu * tp, name in prices)
                try:
                    engine = build_engine_model(option.engine_config(model), StepTokens({}), catalog)
                except UserError:  # the weights do not fit with room for a chunk of KV
                    continue
                out.append((option, engine))
    return out


def step_throughput(engine: EngineModel, demand: StepDemand, enforce_budget: bool = True) -> tuple[float, int]:
    """Max calls/s of `demand`'s step on `engine` within the step's latency budget, and the batch
    that reaches it; (0, 0) if the largest call does not fit the KV cache or (with
    `enforce_budget`) a call alone is already over budget. See the module docstring."""
    perf = engine.perf
    if perf is None:
        raise UserError(f"plan: engine {engine.name} has no iteration model (a latency table only); plan needs one")
    if demand.max_context_tokens > engine.kv_capacity_tokens:
        return 0.0, 0
    tokens_in = max(1, round(demand.mean_input_tokens))
    tokens_out = max(1, round(demand.mean_output_tokens))
    prefill_s = engine.solo_overhead_s + solo_call_latency_s(perf, tokens_in, 1, engine.max_num_batched_tokens)
    batch_max = min(engine.max_num_seqs, max(1, engine.kv_capacity_tokens // (tokens_in + tokens_out)))
    best = (0.0, 0)
    for batch in range(1, batch_max + 1):
        decode_s = perf.decode_segment(batch, batch * (tokens_in + 1)).total_s(tokens_out - 1)
        latency_s = batch * prefill_s + decode_s
        if enforce_budget and latency_s > demand.budget_s:
            break  # latency grows with the batch: no larger batch fits either
        if batch / latency_s > best[0]:
            best = (batch / latency_s, batch)
    return best


def throughput_table(engines: Sequence[EngineModel], demands: Sequence[StepDemand],
                     enforce_budget: bool = True) -> np.ndarray:
    """tput[e, s]: max calls/s of step s on engine type e."""
    return np.array([[step_throughput(engine, d, enforce_budget)[0] for d in demands] for engine in engines])


# ---- the integer program --------------------------------------------------------------------------

def solve_ilp(prices: Sequence[float], gpus: Sequence[int], tput: np.ndarray, demand: Sequence[float],
              headroom: float = DEFAULT_HEADROOM, max_gpus: int | None = None,
              gpu_cap: int = DEFAULT_GPU_CAP) -> np.ndarray | None:
    """Integer engine counts per type that cover every step's demand at least cost (module
    docstring), or None if no such counts exist within `max_gpus` (or `gpu_cap`)."""
    price_per_type = np.asarray(prices, dtype=float)
    gpus_per_type = np.asarray(gpus, dtype=int)
    tput = np.asarray(tput, dtype=float)
    demand_per_step = np.asarray(demand, dtype=float)
    n_types, n_steps = tput.shape
    n_vars = n_types + n_types * n_steps  # counts n_e, then x[s, e] at n_types + s * n_types + e

    def x_index(s: int, e: int) -> int:
        return n_types + s * n_types + e

    # equal price: fewer GPUs
    cost = np.concatenate([price_per_type + 1e-6 * gpus_per_type, np.zeros(n_types * n_steps)])
    cap = max_gpus if max_gpus is not None else gpu_cap
    upper = np.concatenate([cap // gpus_per_type, np.zeros(n_types * n_steps)]).astype(float)
    for s in range(n_steps):
        for e in range(n_types):
            if demand_per_step[s] > 0 and tput[e, s] > 0:
                upper[x_index(s, e)] = 1.0
    rows, lo, hi = [], [], []
    for s in range(n_steps):
        if demand_per_step[s] > 0:
            row = np.zeros(n_vars)
            row[[x_index(s, e) for e in range(n_types)]] = 1.0
            rows.append(row)
            lo.append(1.0)
            hi.append(1.0)
    for e in range(n_types):
        row = np.zeros(n_vars)
        row[e] = -1.0
        for s in range(n_steps):
            if demand_per_step[s] > 0 and tput[e, s] > 0:
                row[x_index(s, e)] = headroom * demand_per_step[s] / tput[e, s]
        rows.append(row)
        lo.append(-np.inf)
        hi.append(0.0)
    row = np.zeros(n_vars)
    row[:n_types] = gpus_per_type
    rows.append(row)
    lo.append(0.0)
    hi.append(float(cap))
    result = milp(cost, integrality=np.concatenate([np.ones(n_types), np.zeros(n_types * n_steps)]),
                  bounds=Bounds(np.zeros(n_vars), upper), constraints=LinearConstraint(np.array(rows), lo, hi))
    if not result.success:
        return None
    return np.round(result.x[:n_types]).astype(int)


# ---- clusters as count vectors ------------------------------------------------------------------

Mix = tuple[tuple[EngineOption, int], ...]  # (engine type, count > 0), sorted: hashable and canonical


def make_mix(counts: dict[EngineOption, int] | Iterable[tuple[EngineOption, int]]) -> Mix:
    items = counts.items() if isinstance(counts, dict) else counts
    merged: dict[EngineOption, int] = {}
    for option, n in items:
        merged[option] = merged.get(option, 0) + int(n)
    return tuple(sorted(((o, n) for o, n in merged.items() if n > 0),
                        key=lambda on: (on[0].gpu, on[0].tp, on[0].weight_bits)))


def mix_price(mix: Mix) -> float:
    return sum(o.price_per_hour * n for o, n in mix)


def mix_gpus(mix: Mix) -> int:
    return sum(o.tp * n for o, n in mix)


def mix_label(mix: Mix) -> str:
    return " + ".join(f"{n}x {o.label}" for o, n in mix) or "(empty)"


def mix_cluster(mix: Mix, model: str, name: str = "plan") -> ClusterConfig:
    return ClusterConfig(name=name, engines=[o.engine_config(model, n) for o, n in mix])


def mix_from_cluster(cluster: ClusterConfig, catalog: Catalog, prices: dict[str, float]) -> Mix:
    """A cluster file as a count vector (its GPUs priced like the planner's)."""
    out = []
    for e in cluster.engines:
        name = catalog.canonical_gpu(e.gpu)
        per_gpu = prices.get(name, catalog.gpu(name).price_per_hour)
        out.append((EngineOption(name, e.tp, e.weight_bits, per_gpu * e.tp, name in prices), e.count))
    return make_mix(out)


def neighbours(mix: Mix, moves: Sequence[EngineOption], gpu_cap: int) -> list[Mix]:
    """Clusters one move away: one engine removed, one added, or one swapped for another type."""
    counts = dict(mix)
    out = []
    for option, n in counts.items():
        if sum(counts.values()) > 1:
            out.append(make_mix({**counts, option: n - 1}))
    for option in moves:
        out.append(make_mix({**counts, option: counts.get(option, 0) + 1}))
        for current, n in counts.items():
            if current != option:
                swapped = {**counts, current: n - 1}
                swapped[option] = swapped.get(option, 0) + 1
                out.append(make_mix(swapped))
    return [m for m in dict.fromkeys(out) if m and mix_gpus(m) <= gpu_cap and m != mix]


# ---- one candidate's simulations (these run in worker processes) ---------------------------------

def run_spec_for(cluster: ClusterConfig, cell: Cell, seed: int, slo_scale: float, prefix_cache: bool | None) -> RunSpec:
    """The simulation of one candidate on one seed: the cell's workload and load shape, this
    cluster, the SLO scale that gives the plan's absolute SLO on it."""
    extra = {"prefix_cache": prefix_cache} if prefix_cache is not None else {}
    return RunSpec(trace=cell.trace, cluster=cluster, rate_qps=cell.rate_qps, slo_scale=slo_scale, seed=seed,
                   queries=cell.queries, arrivals=cell.arrivals(), **extra)


def _pooled(cluster: ClusterConfig, policy_ref: PolicyRef, cell: Cell, seeds: Sequence[int], slo_scale: float,
            prefix_cache: bool | None) -> tuple[int, int]:
    met = n = 0
    for seed in seeds:
        _, sim = simulate(run_spec_for(cluster, cell, seed, slo_scale, prefix_cache), make_policy(policy_ref))
        met += sim.met_workflows
        n += len(sim.workflows)
    return met, n


def run_candidate(cluster: ClusterConfig, policy_ref: PolicyRef, cell: Cell, seeds: list[int], slo_scale: float,
                  prefix_cache: bool | None, tune_trials: int = 0, sampler_seed: int = 0) -> dict[str, Any]:
    """Pooled attainment of one cluster over `seeds`; with `tune_trials`, the policy's knobs are
    first tuned on these seeds (Optuna TPE, the policy's own knobs as the first trial) and the
    best trial's policy is the one scored."""
    if not tune_trials:
        met, n = _pooled(cluster, policy_ref, cell, seeds, slo_scale, prefix_cache)
        return {"n_met": met, "n_workflows": n, "simulations": len(seeds), "policy": policy_ref}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space(policy_ref)
    start = make_policy(policy_ref).spec()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=sampler_seed))
    study.enqueue_trial(knob_values(start, space))
    pooled: dict[int, tuple[int, int]] = {}

    def objective(trial: optuna.Trial) -> float:
        params = {k: (trial.suggest_float(k, s[1], s[2]) if s[0] == "float" else trial.suggest_categorical(k, list(s[1])))
                  for k, s in space.items()}
        met, n = _pooled(cluster, spec_with(policy_ref, params), cell, seeds, slo_scale, prefix_cache)
        pooled[trial.number] = (met, n)
        return met / n if n else 0.0

    study.optimize(objective, n_trials=tune_trials)
    best = study.best_trial
    met, n = pooled[best.number]
    return {"n_met": met, "n_workflows": n, "simulations": tune_trials * len(seeds),
            "policy": spec_with(policy_ref, dict(best.params), name=f"{make_policy(policy_ref).name}-tuned")}


# ---- the planner ----------------------------------------------------------------------------------

@dataclass
class PlanConfig:
    trace: str = "chess_trace1"
    rate_qps: float = 0.1
    load: str = "constant"
    slo_scale: float = 3.0
    target: float = 0.95
    gpus: list[str] = field(default_factory=lambda: list(DEFAULT_GPUS))
    model: str = DEFAULT_MODEL
    policy: str = DEFAULT_POLICY
    tune_policy: bool = False
    tune_trials: int = DEFAULT_TUNE_TRIALS
    max_gpus: int | None = None
    prices: dict[str, float] = field(default_factory=dict)  # USD per GPU-hour, canonical GPU names
    headroom: float = DEFAULT_HEADROOM
    queries: int | None = None  # None: `queries_for_sustained_load`
    tune_seeds: list[int] = field(default_factory=lambda: [TUNE_SEED_BASE + i for i in range(3)])
    test_seeds: list[int] = field(default_factory=lambda: [TEST_SEED_BASE + i for i in range(3)])
    workers: int = 1
    prefix_cache: bool | None = None  # None: the simulator's default (on)
    slo_reference: str = "paper"
    tps: tuple[int, ...] = TP_DEGREES
    weight_bits: tuple[int, ...] = WEIGHT_BITS
    homogeneous: bool = True  # search the homogeneous baselines
    compare_paper: bool = True

    @property
    def gpu_cap(self) -> int:
        return self.max_gpus if self.max_gpus is not None else DEFAULT_GPU_CAP

    @property
    def cell(self) -> Cell:
        return Cell(trace=self.trace, rate_qps=self.rate_qps, load=self.load, slo_scale=self.slo_scale,
                    queries=self.queries or DEFAULT_QUERIES)


def queries_for_sustained_load(rate_qps: float, slo_s: float) -> int:
    """Queries whose arrivals span `MIN_SPAN_SLOS` SLOs (at least `DEFAULT_QUERIES`). Fewer measure
    how big a burst a cluster absorbs before its backlog drains, not the rate it sustains, and
    favour clusters too small for the rate (the same rule as bench's steady-state warning)."""
    return max(DEFAULT_QUERIES, math.ceil(MIN_SPAN_SLOS * slo_s * rate_qps))


@dataclass
class Evaluation:
    mix: Mix
    n_met: int
    n_workflows: int
    simulations: int
    policy: PolicyRef

    @property
    def attainment(self) -> float:
        return self.n_met / self.n_workflows if self.n_workflows else 0.0


ProgressFn = Callable[[int, int, "Evaluation | None"], None]  # simulations, clusters simulated, best so far


class Evaluator:
    """Simulates candidate clusters in a process pool, once each per seed set (cached)."""

    def __init__(self, cfg: PlanConfig, pool: ProcessPoolExecutor, base_slo_of: Callable[[Mix], float],
                 reference_base_slo_s: float, progress: ProgressFn | None = None):
        self.cfg = cfg
        self.pool = pool
        self.base_slo_of = base_slo_of
        self.reference_base_slo_s = reference_base_slo_s
        self.progress = progress
        self.cache: dict[tuple[Mix, str], Evaluation] = {}
        self.simulations = 0
        self.best: Evaluation | None = None

    def slo_scale_for(self, mix: Mix) -> float:
        """The simulator's SLO scale on this cluster that gives the plan's absolute SLO."""
        return self.cfg.slo_scale * self.reference_base_slo_s / self.base_slo_of(mix)

    def evaluate(self, mixes: Sequence[Mix], phase: str = "tune") -> list[Evaluation]:
        """Pooled attainment of each cluster on the tuning (`tune`) or `test` seeds. On test seeds a
        cluster runs the policy it was scored with on the tuning seeds (tuned, with --tune-policy)."""
        cfg = self.cfg
        todo = [m for m in dict.fromkeys(mixes) if (m, phase) not in self.cache]
        seeds = cfg.tune_seeds if phase == "tune" else cfg.test_seeds
        tune_trials = cfg.tune_trials if cfg.tune_policy and phase == "tune" else 0
        futures: dict[Future, Mix] = {}
        for mix in todo:
            policy: PolicyRef = cfg.policy
            if phase == "test" and (mix, "tune") in self.cache:
                policy = self.cache[(mix, "tune")].policy
            args = (mix_cluster(mix, cfg.model), policy, cfg.cell)
            scale = self.slo_scale_for(mix)
            if tune_trials:  # one study per cluster: its trials run in one worker
                futures[self.pool.submit(run_candidate, *args, list(seeds), scale, cfg.prefix_cache, tune_trials)] = mix
            else:
                for seed in seeds:
                    futures[self.pool.submit(run_candidate, *args, [seed], scale, cfg.prefix_cache)] = mix
        partial: dict[Mix, list[dict[str, Any]]] = {m: [] for m in todo}
        expected = {m: 1 if tune_trials else len(seeds) for m in todo}
        for fut in as_completed(futures):
            mix = futures[fut]
            res = fut.result()
            self.simulations += res["simulations"]
            partial[mix].append(res)
            if len(partial[mix]) == expected[mix]:
                rows = partial[mix]
                ev = Evaluation(mix, sum(r["n_met"] for r in rows), sum(r["n_workflows"] for r in rows),
                                sum(r["simulations"] for r in rows), rows[0]["policy"])
                self.cache[(mix, phase)] = ev
                if phase == "tune" and ev.attainment >= cfg.target and (
                        self.best is None or mix_price(mix) < mix_price(self.best.mix)):
                    self.best = ev
            if self.progress:
                self.progress(self.simulations, sum(1 for (_, p) in self.cache if p == "tune"), self.best)
        return [self.cache[(m, phase)] for m in mixes]

    def meets(self, mix: Mix) -> bool:
        return self.evaluate([mix])[0].attainment >= self.cfg.target


def workload_demands(cfg: PlanConfig, reference_slo: Any) -> list[StepDemand]:
    """Per-step demand of the whole trace at the load's sustained rate, with each step's budget."""
    workflows, _ = workload_for(RunSpec(trace=cfg.trace, cluster=cfg.slo_reference))
    means = step_mean_tokens(workflows)
    counts: dict[str, int] = {}
    largest: dict[str, int] = {}
    for workflow in workflows:
        for stage in workflow.stages:
            for call in stage:
                counts[call.step] = counts.get(call.step, 0) + 1
                largest[call.step] = max(largest.get(call.step, 0), call.input_tokens + call.output_tokens)
    rate = cfg.rate_qps * SUSTAINED_RATE_FACTOR[cfg.load]
    return [StepDemand(step, rate * counts[step] / len(workflows), means[step][0], means[step][1], largest[step],
                       cfg.slo_scale * reference_slo.expected(step)) for step in counts]


def parse_prices(items: Sequence[str] | None, catalog: Catalog) -> dict[str, float]:
    """`--prices H100=2.5,A6000=0.6` as USD per GPU-hour by canonical GPU name."""
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            price = float(value)
        except ValueError:
            price = math.nan
        if not sep or not name or not (price >= 0 and math.isfinite(price)):
            raise UserError(f"--prices: {item!r} is not GPU=USD (e.g. --prices H100=2.5,A6000=0.6)")
        try:
            out[catalog.canonical_gpu(name)] = price
        except UserError:
            raise UserError(f"--prices: unknown GPU type {name!r} (known: {', '.join(catalog.gpus)})") from None
    return out


def canonical_gpus(gpus: Sequence[str], catalog: Catalog) -> list[str]:
    out = []
    for gpu in gpus:
        try:
            out.append(catalog.canonical_gpu(gpu))
        except UserError:
            raise UserError(f"--gpus: unknown GPU type {gpu!r} (known: {', '.join(catalog.gpus)})") from None
    return list(dict.fromkeys(out))


def pareto_front(evaluations: Iterable[Evaluation]) -> list[Evaluation]:
    """Clusters no other cluster beats on both price (lower) and attainment (higher)."""
    front: list[Evaluation] = []
    for ev in sorted(evaluations, key=lambda e: (mix_price(e.mix), -e.attainment)):
        if not front or ev.attainment > front[-1].attainment:
            front.append(ev)
    return front


def run_plan(cfg: PlanConfig, progress: ProgressFn | None = None, note: Callable[[str], None] | None = None
             ) -> dict[str, Any]:
    """The whole planner: program, local search, baselines, test verification; plan.json's dict.
    Raises `UserError` (one line) when no cluster can meet the target."""
    started = time.perf_counter()
    note = note or (lambda text: None)
    catalog = load_catalog()
    catalog.model(cfg.model)
    reference_sim = build_simulator(RunSpec(trace=cfg.trace, cluster=cfg.slo_reference, queries=1))
    reference_base_slo_s = reference_sim.slo.base_slo_s
    slo_s = cfg.slo_scale * reference_base_slo_s
    sustained = queries_for_sustained_load(cfg.rate_qps, slo_s)
    queries = sustained if cfg.queries is None else cfg.queries  # per simulation
    if cfg.queries is None:
        cfg = dataclasses.replace(cfg, queries=queries)
        note(f"{queries} queries per simulation: arrivals over {MIN_SPAN_SLOS:g} SLOs of {slo_s:.0f} s")
    elif cfg.queries < sustained:
        note(f"warning: {cfg.queries} queries arrive over {cfg.queries / cfg.rate_qps / slo_s:.1f} SLOs of {slo_s:.0f} s, "
             f"fewer than {MIN_SPAN_SLOS:g}: the plan measures how big a burst a cluster absorbs, not the rate it "
             f"sustains (use --queries {sustained} or more)")
    demands = workload_demands(cfg, reference_sim.slo)
    options = engine_options(cfg.gpus, cfg.model, catalog, cfg.prices, cfg.tps, cfg.weight_bits)
    if not options:
        raise UserError(f"--gpus: {cfg.model} fits no engine of {', '.join(cfg.gpus)} at TP {list(cfg.tps)} and "
                        f"{list(cfg.weight_bits)}-bit weights; add GPUs with more memory")
    engines = [e for _, e in options]
    opts = [o for o, _ in options]
    tput = throughput_table(engines, demands)
    demand = [d.calls_per_s for d in demands]
    prices = [o.price_per_hour for o in opts]
    tps = [o.tp for o in opts]
    for s, d in enumerate(demands):
        if not tput[:, s].any():
            raise UserError(
                f"plan: step '{d.step}' ({d.mean_input_tokens:.0f} input tokens) fits no engine type of {', '.join(cfg.gpus)} "
                f"within its SLO share ({d.budget_s:.1f} s at --slo-scale {cfg.slo_scale:g}); loosen --slo-scale or add faster GPUs")

    ilp_started = time.perf_counter()
    counts = solve_ilp(prices, tps, tput, demand, cfg.headroom, cfg.max_gpus)
    ilp_s = time.perf_counter() - ilp_started
    if counts is None:
        unbounded = solve_ilp(prices, tps, tput, demand, cfg.headroom, None, gpu_cap=10 * DEFAULT_GPU_CAP)
        need = f"needs {int(np.dot(unbounded, tps))} GPUs" if unbounded is not None else f"needs more than {10 * DEFAULT_GPU_CAP} GPUs"
        raise UserError(f"plan: {cfg.rate_qps:g} q/s of {cfg.trace} at SLO x{cfg.slo_scale:g} cannot be served within "
                        f"{cfg.gpu_cap} GPUs of {', '.join(cfg.gpus)} (the throughput model {need}); "
                        f"raise --max-gpus or lower --rate")
    ilp_mix = make_mix(zip(opts, counts))
    note(f"program ({len(opts)} engine types x {len(demands)} steps, {ilp_s * 1000:.0f} ms): {mix_label(ilp_mix)}, "
         f"${mix_price(ilp_mix):.2f}/h")

    # per engine type alone: the homogeneous program answers, and the move types of the search
    alone = throughput_table(engines, demands, enforce_budget=False)
    best_alone: dict[str, tuple[EngineOption, int]] = {}  # per GPU type: the cheapest single-type program answer
    best_key: dict[str, tuple[float, int]] = {}
    for e, option in enumerate(opts):
        step_tput = np.where(tput[e] > 0, tput[e], alone[e])  # over budget: its solo throughput, for the baseline
        if not (step_tput > 0).all():
            continue  # some step's largest call does not fit this engine's KV cache
        n = max(1, math.ceil(cfg.headroom * sum(d / t for d, t in zip(demand, step_tput)) - 1e-9))
        key = (option.price_per_hour * n, option.tp * n)
        if option.gpu not in best_key or key < best_key[option.gpu]:
            best_alone[option.gpu], best_key[option.gpu] = (option, n), key
    moves = list(dict.fromkeys([o for o, _ in ilp_mix] + [o for o, _ in best_alone.values()]))

    base_slo_cache: dict[tuple, float] = {}

    def base_slo_of(mix: Mix) -> float:
        key = tuple(sorted({(o.gpu, o.tp, o.weight_bits) for o, _ in mix}))
        if key not in base_slo_cache:
            sim = build_simulator(RunSpec(trace=cfg.trace, cluster=mix_cluster(mix, cfg.model), queries=1))
            base_slo_cache[key] = sim.slo.base_slo_s
        return base_slo_cache[key]

    with ProcessPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        ev = Evaluator(cfg, pool, base_slo_of, reference_base_slo_s, progress)
        search = local_search(ev, ilp_mix, moves, opts, tps, prices, tput, demand, note)
        search_evals = [e for (m, p), e in ev.cache.items() if p == "tune"]
        search_simulations = ev.simulations
        homogeneous = {}
        if cfg.homogeneous:
            for gpu in cfg.gpus:
                if gpu in best_alone:
                    homogeneous[gpu] = homogeneous_search(ev, *best_alone[gpu])
        feasible = sorted((e for (m, p), e in ev.cache.items() if p == "tune" and e.attainment >= cfg.target),
                          key=lambda e: (mix_price(e.mix), mix_gpus(e.mix), -e.attainment))
        tune_evals = [e for (m, p), e in ev.cache.items() if p == "tune"]
        if not feasible:
            best = max(tune_evals, key=lambda e: (e.attainment, -mix_price(e.mix)))
            raise UserError(
                f"plan: no cluster of {', '.join(cfg.gpus)} within {cfg.gpu_cap} GPUs met --target {cfg.target:g} at "
                f"{cfg.rate_qps:g} q/s, SLO x{cfg.slo_scale:g} ({len(tune_evals)} clusters simulated; best "
                f"{mix_label(best.mix)} at {best.attainment:.3f}); raise --max-gpus, lower --rate or --target, "
                f"or loosen --slo-scale")
        chosen = None
        verification = []
        baseline_simulations = ev.simulations - search_simulations
        for candidate in feasible[:VERIFY_CANDIDATES]:
            test = ev.evaluate([candidate.mix], "test")[0]
            verification.append({"cluster": mix_label(candidate.mix), "price_per_hour": round(mix_price(candidate.mix), 4),
                                 "attainment_tune": candidate.attainment, "attainment_test": test.attainment})
            note(f"verify on test seeds: {mix_label(candidate.mix)}, ${mix_price(candidate.mix):.2f}/h, attainment "
                 f"{test.attainment:.3f}" + ("" if test.attainment >= cfg.target else " (misses the target)"))
            if test.attainment >= cfg.target:
                chosen = candidate
                break
        verified = chosen is not None
        if chosen is None:  # none held on the test seeds: the best of those tried there
            tried = [e for e in feasible[:VERIFY_CANDIDATES]]
            chosen = max(tried, key=lambda e: ev.cache[(e.mix, "test")].attainment)
        for h in homogeneous.values():  # the same check for each baseline: one more engine if it misses
            for _ in range(VERIFY_CANDIDATES):
                if h["mix"] is None or ev.evaluate([h["mix"]], "test")[0].attainment >= cfg.target:
                    break
                (option, n), = h["mix"]
                if (n + 1) * option.tp > cfg.gpu_cap:
                    h["mix"] = None
                    break
                h["mix"] = make_mix({option: n + 1})
                h["probes"] += 1
                ev.evaluate([h["mix"]])
        paper_mix = None
        if cfg.compare_paper:
            paper_mix = mix_from_cluster(load_cluster("paper"), catalog, cfg.prices)
            ev.evaluate([paper_mix])
        compare = [m for m in [ilp_mix, paper_mix] + [h["mix"] for h in homogeneous.values() if h["mix"]] if m]
        ev.evaluate(compare, "test")
    tune_evals = [e for (m, p), e in ev.cache.items() if p == "tune"]

    def row(mix: Mix, what: str) -> dict[str, Any]:
        tune_ev, test_ev = ev.cache.get((mix, "tune")), ev.cache.get((mix, "test"))
        return {"what": what, "cluster": mix_label(mix), "engines": [{"gpu": o.gpu, "tp": o.tp, "weight_bits": o.weight_bits,
                                                                       "count": n} for o, n in mix],
                "gpus": mix_gpus(mix), "price_per_hour": round(mix_price(mix), 4),
                "attainment_tune": tune_ev.attainment if tune_ev else None,
                "attainment_test": test_ev.attainment if test_ev else None,
                "meets_target_test": (test_ev.attainment >= cfg.target) if test_ev else None,
                "slo_scale_in_simulate": round(ev.slo_scale_for(mix), 4)}

    chosen_row = row(chosen.mix, "chosen")
    comparisons = [row(ilp_mix, "program answer alone")]
    for gpu, h in homogeneous.items():
        if h["mix"]:
            comparisons.append(row(h["mix"], f"cheapest homogeneous {gpu}"))
        else:
            comparisons.append({"what": f"cheapest homogeneous {gpu}", "cluster": f"none within {cfg.gpu_cap} GPUs",
                                "price_per_hour": None, "attainment_test": None, "meets_target_test": False})
    if paper_mix:
        comparisons.append(row(paper_mix, "paper cluster"))
    homo_ok = [c for c in comparisons if c["what"].startswith("cheapest homogeneous") and c["meets_target_test"]]
    cheapest_homo = min(homo_ok, key=lambda c: c["price_per_hour"]) if homo_ok else None
    ilp_row = comparisons[0]
    chosen_price = chosen_row["price_per_hour"]
    grid = grid_size(search_evals, list(dict.fromkeys(list(moves) + [o for e in search_evals for o, _ in e.mix])))
    return {
        "config": {"trace": cfg.trace, "rate_qps": cfg.rate_qps, "load": cfg.load, "slo_scale": cfg.slo_scale,
                   "slo_reference": cfg.slo_reference, "slo_s": slo_s, "target": cfg.target, "gpus": cfg.gpus,
                   "model": cfg.model, "policy": cfg.policy, "tune_policy": cfg.tune_policy,
                   "tune_trials": cfg.tune_trials if cfg.tune_policy else 0, "max_gpus": cfg.max_gpus,
                   "prices_per_gpu_hour": cfg.prices, "headroom": cfg.headroom, "queries": cfg.queries,
                   "arrival_span_slos": queries / cfg.rate_qps / slo_s,
                   "tune_seeds": cfg.tune_seeds, "test_seeds": cfg.test_seeds, "workers": cfg.workers,
                   "prefix_cache": cfg.prefix_cache},
        "chosen": {**chosen_row, "verified_on_test": verified,
                   "policy": chosen.policy if cfg.tune_policy else cfg.policy},
        "comparisons": comparisons,
        "savings": {
            "vs_cheapest_homogeneous": (1 - chosen_price / cheapest_homo["price_per_hour"]) if cheapest_homo else None,
            "cheapest_homogeneous": cheapest_homo["what"] if cheapest_homo else None,
            "vs_program_answer": 1 - chosen_price / ilp_row["price_per_hour"],
            "program_answer_meets_target": ilp_row["meets_target_test"]},
        "program": {"engine_types": len(opts), "steps": [d.__dict__ for d in demands], "wall_s": ilp_s,
                    "throughput_calls_per_s": {o.label: dict(zip([d.step for d in demands], map(float, tput[e])))
                                               for e, o in enumerate(opts)},
                    "answer": mix_label(ilp_mix), "move_types": [o.label for o in moves]},
        "search": {**search, "verification": verification,
                   "homogeneous": {gpu: {"engine_type": h["option"], "probes": h["probes"],
                                         "cluster": mix_label(h["mix"]) if h["mix"] else None}
                                   for gpu, h in homogeneous.items()}},
        "pareto_front": [{"cluster": mix_label(e.mix), "gpus": mix_gpus(e.mix), "price_per_hour": round(mix_price(e.mix), 4),
                          "attainment_tune": e.attainment} for e in pareto_front(tune_evals)],
        "simulated": [{"cluster": mix_label(e.mix), "price_per_hour": round(mix_price(e.mix), 4),
                       "attainment_tune": e.attainment} for e in sorted(tune_evals, key=lambda e: mix_price(e.mix))],
        "clusters_simulated": len(tune_evals),
        "simulations": ev.simulations,
        "simulations_by_phase": {"local search": search_simulations, "homogeneous searches": baseline_simulations,
                                 "verification and comparisons": ev.simulations - search_simulations - baseline_simulations},
        "search_clusters": len(search_evals),
        # a grid over the region the local search covered, on the same tuning seeds
        "grid_simulations": grid * (len(cfg.tune_seeds) * (cfg.tune_trials if cfg.tune_policy else 1)),
        "wall_s": time.perf_counter() - started,
        "_chosen_mix": chosen.mix,
    }


def local_search(ev: Evaluator, start: Mix, moves: Sequence[EngineOption], opts: Sequence[EngineOption],
                 tps: Sequence[int], prices: Sequence[float], tput: np.ndarray, demand: Sequence[float],
                 note: Callable[[str], None]) -> dict[str, Any]:
    """Repair, then descent (module docstring); returns the path taken."""
    cfg = ev.cfg
    path = [{"phase": "start", "cluster": mix_label(start), "attainment_tune": ev.evaluate([start])[0].attainment}]
    current = start
    headroom = cfg.headroom
    for _ in range(MAX_REPAIR_STEPS):
        if ev.meets(current):
            break
        candidates = [m for m in neighbours(current, moves, cfg.gpu_cap) if mix_price(m) > mix_price(current)
                      and sum(n for _, n in m) > sum(n for _, n in current)]
        headroom *= REPAIR_HEADROOM_STEP
        counts = solve_ilp(prices, tps, tput, demand, headroom, cfg.max_gpus)
        if counts is not None:
            candidates.append(make_mix(zip(opts, counts)))
        candidates = list(dict.fromkeys(c for c in candidates if c != current))
        if not candidates:
            break
        results = ev.evaluate(candidates)
        ok = [r for r in results if r.attainment >= cfg.target]
        pick = (min(ok, key=lambda r: (mix_price(r.mix), mix_gpus(r.mix))) if ok
                else max(results, key=lambda r: (r.attainment, -mix_price(r.mix))))
        current = pick.mix
        path.append({"phase": "repair", "cluster": mix_label(current), "attainment_tune": pick.attainment})
        note(f"repair: {mix_label(current)}, ${mix_price(current):.2f}/h, attainment {pick.attainment:.3f}")
    if not ev.meets(current):
        return {"path": path, "local_optimum": None}
    chunk = max(1, cfg.workers)
    for _ in range(MAX_DESCENT_STEPS):
        cheaper = sorted((m for m in neighbours(current, moves, cfg.gpu_cap) if mix_price(m) < mix_price(current) - 1e-9),
                         key=lambda m: (mix_price(m), mix_gpus(m)))
        moved = False
        for i in range(0, len(cheaper), chunk):
            ok = [r for r in ev.evaluate(cheaper[i:i + chunk]) if r.attainment >= cfg.target]
            if ok:
                pick = min(ok, key=lambda r: (mix_price(r.mix), mix_gpus(r.mix)))
                current, moved = pick.mix, True
                path.append({"phase": "descent", "cluster": mix_label(current), "attainment_tune": pick.attainment})
                note(f"descent: {mix_label(current)}, ${mix_price(current):.2f}/h, attainment {pick.attainment:.3f}")
                break
        if not moved:
            break
    return {"path": path, "local_optimum": mix_label(current)}


def homogeneous_search(ev: Evaluator, option: EngineOption, start_count: int) -> dict[str, Any]:
    """Fewest engines of one type meeting the target on the tuning seeds: doubling from the
    program's count, then bisection (attainment is close to monotone in the count). `run_plan`
    then checks the answer on the test seeds and adds engines (up to `VERIFY_CANDIDATES`) if it
    misses there, as it does for the chosen cluster."""
    cap = ev.cfg.gpu_cap // option.tp
    if cap < 1:
        return {"option": option.label, "mix": None, "probes": 0}
    n0 = min(max(1, start_count), cap)
    probes = [n0]
    if ev.meets(make_mix({option: n0})):
        lo, hi = 0, n0
    else:
        lo, n = n0, n0
        first_met: int | None = None  # smallest doubled count that meets the target
        while n < cap:
            n = min(2 * n, cap)
            probes.append(n)
            if ev.meets(make_mix({option: n})):
                first_met = n
                break
            lo = n
        if first_met is None:
            return {"option": option.label, "mix": None, "probes": len(probes)}
        hi = first_met
    while hi - lo > 1:
        mid = (lo + hi) // 2
        probes.append(mid)
        if ev.meets(make_mix({option: mid})):
            hi = mid
        else:
            lo = mid
    return {"option": option.label, "mix": make_mix({option: hi}), "probes": len(probes)}


def grid_size(evaluations: Sequence[Evaluation], moves: Sequence[EngineOption]) -> int:
    """Clusters of a grid over the move types with 0..n_max engines each and at most g_max GPUs in
    all (n_max, g_max: the most engines of one type, and the most GPUs, of any cluster the planner
    simulated): what a grid over the region the search covered would simulate."""
    n_max = max((n for e in evaluations for _, n in e.mix), default=1)
    gpu_cap = max((mix_gpus(e.mix) for e in evaluations), default=1)
    sizes = [1]  # sizes[g]: count vectors using exactly g GPUs so far
    for option in moves:
        nxt = [0] * (gpu_cap + 1)
        for used, ways in enumerate(sizes):
            for n in range(n_max + 1):
                if used + n * option.tp <= gpu_cap:
                    nxt[used + n * option.tp] += ways
        sizes = nxt
    return sum(sizes) - 1  # without the empty cluster


# ---- outputs --------------------------------------------------------------------------------------

def cluster_yaml(result: dict[str, Any], model: str) -> str:
    """The chosen cluster as a cluster file for `agentsched simulate --cluster FILE`."""
    mix: Mix = result["_chosen_mix"]
    cfg = result["config"]
    chosen = result["chosen"]
    header = (f"# agentsched plan: cheapest cluster meeting {cfg['target']:g} SLO attainment for {cfg['trace']} at "
              f"{cfg['rate_qps']:g} q/s ({cfg['load']}), SLO {cfg['slo_s']:.1f} s (x{cfg['slo_scale']:g} of the "
              f"{cfg['slo_reference']} cluster's base SLO)\n"
              f"# ${chosen['price_per_hour']:.2f}/h; attainment {chosen['attainment_test']:.3f} on test seeds "
              f"{cfg['test_seeds']}\n"
              f"# the same SLO in simulate: --slo-scale {chosen['slo_scale_in_simulate']:g} (the simulator's base SLO "
              f"is this cluster's own)\n")
    engines = []
    for option, n in mix:
        engine = {"gpu": option.gpu, "model": model, "tp": option.tp, "weight_bits": option.weight_bits, "count": n}
        if option.price_overridden:
            engine["price_per_hour"] = option.price_per_hour
        engines.append(engine)
    ClusterConfig.model_validate({"name": "plan", "engines": engines})  # what simulate will load
    return header + yaml.safe_dump({"name": "plan", "engines": engines}, sort_keys=False)


def plot_pareto(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = result["simulated"]
    ax.scatter([p["price_per_hour"] for p in pts], [p["attainment_tune"] for p in pts], s=14, color="0.7",
               label="simulated (tuning seeds)")
    front = result["pareto_front"]
    ax.step([p["price_per_hour"] for p in front], [p["attainment_tune"] for p in front], where="post", color="C0",
            label="Pareto front (tuning seeds)")
    ax.axhline(result["config"]["target"], color="k", linestyle=":", linewidth=1, label="target")
    marks = [(result["chosen"], "chosen", "C3", "*")]
    colors = ["C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9", "C0"]  # C3 is the chosen cluster's
    marks += [(c, c["what"], colors[i % len(colors)], "o") for i, c in enumerate(result["comparisons"])
              if c.get("price_per_hour")]
    for row, label, color, marker in marks:
        if row.get("attainment_test") is not None:
            ax.scatter([row["price_per_hour"]], [row["attainment_test"]], s=90 if marker == "*" else 40, color=color,
                       marker=marker, label=f"{label} (test seeds)", zorder=3)
    cfg = result["config"]
    ax.set_xlabel("price, USD per hour")
    ax.set_ylabel("SLO attainment")
    ax.set_title(f"{cfg['trace']} @ {cfg['rate_qps']:g} q/s ({cfg['load']}), SLO x{cfg['slo_scale']:g}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
