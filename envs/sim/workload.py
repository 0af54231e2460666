"""Workflows: CHESS traces, YAML workflow specs, a generator fitted to a trace, arrival processes.

A workflow is a chain of stages; a stage is one or more LLM calls that run in parallel (fan-out)
and must all finish before the next stage becomes ready.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from envs.sim.errors import UserError, load_yaml_mapping, validate_as
from envs.sim.gc_pause import cyclic_gc_paused

TRACE_DIR = Path(__file__).resolve().parent.parent / "data" / "traces"
FANOUT_STEP_PREFIXES = ("generate_candidate", "evaluate")


def normalise_step(step: str) -> str:
    """`generate_candidate_llama-agent` and friends become `generate_candidate`."""
    return "generate_candidate" if step.startswith("generate_candidate") else step


def is_fanout_step(step: str) -> bool:
    return step.startswith(FANOUT_STEP_PREFIXES)


SegmentScope = Literal["template", "tenant", "workflow"]


class SegmentSpec(NamedTuple):
    """A shared part of a prompt: `tokens` tokens of text named `name` within its scope. The same
    (scope, name, tokens) is the same text: `template` for every call of every query and tenant,
    `tenant` for the calls of one tenant, `workflow` for the calls of one query. A prompt's
    segments come first, in order; the rest of its input is the call's own. (A named tuple: built
    and hashed in C, once per call.)"""

    scope: SegmentScope
    name: str
    tokens: int


@dataclass(frozen=True, slots=True)
class CallSpec:
    step: str
    input_tokens: int
    output_tokens: int
    segments: tuple[SegmentSpec, ...] = ()  # shared prompt prefix, in order (empty: unknown)


@dataclass(frozen=True, slots=True)
class WorkflowSpec:
    """The shape and token counts of one query: stages of parallel calls."""

    stages: tuple[tuple[CallSpec, ...], ...]
    source: str = ""
    token_scale: float = 1.0  # its token counts are the source's times this (`scale_workflow`)

    @property
    def n_calls(self) -> int:
        return sum(len(stage) for stage in self.stages)

    def steps(self) -> list[str]:
        return [c.step for stage in self.stages for c in stage]


def stages_from_calls(calls: Sequence[CallSpec]) -> tuple[tuple[CallSpec, ...], ...]:
    """Consecutive calls of a fan-out step form one parallel stage; all others are sequential."""
    stages: list[list[CallSpec]] = []
    for call in calls:
        if stages and is_fanout_step(call.step) and stages[-1][0].step == call.step:
            stages[-1].append(call)
        else:
            stages.append([call])
    return tuple(tuple(s) for s in stages)


def resolve_trace_path(path_or_name: str | Path) -> Path:
    """A path, or the name of a shipped trace (`chess_trace1`)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    shipped = TRACE_DIR / f"{path_or_name}.json"
    if shipped.is_file():
        return shipped
    shipped_names = ", ".join(sorted(p.stem for p in TRACE_DIR.glob("*.json")))
    raise UserError(f"trace: {path_or_name} is neither a file nor a shipped trace (shipped: {shipped_names})")


WORKFLOW_DIR = Path(__file__).resolve().parent.parent / "data" / "workflows"


def resolve_workflow_path(path_or_name: str | Path) -> Path:
    """A YAML workflow template path, or the name of a shipped one (`react-agent.yaml`)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    shipped = WORKFLOW_DIR / path.name
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.name for p in WORKFLOW_DIR.glob("*.yaml")))
    raise UserError(f"trace: workflow template {path_or_name} not found (shipped: {names})")


def load_trace(path_or_name: str | Path) -> list[WorkflowSpec]:
    """Load a CHESS trace: a JSON list of {"Text2SQLRequest": [{step, input_length, output_length}]}."""
    path = resolve_trace_path(path_or_name)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"trace: {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(raw, list) or not raw:
        raise UserError(f"trace: {path} must be a non-empty JSON list of queries")
    workflows = []
    for qi, query in enumerate(raw):
        if not isinstance(query, dict) or not isinstance(query.get("Text2SQLRequest"), list) or not query["Text2SQLRequest"]:
            raise UserError(f"trace: query {qi} in {path.name} needs a non-empty 'Text2SQLRequest' list")
        calls = []
        for ci, call in enumerate(query["Text2SQLRequest"]):
            where = f"query {qi} call {ci} in {path.name}"
            if not isinstance(call, dict):
                raise UserError(f"trace: {where} must be an object with step, input_length, output_length")
            for key in ("step", "input_length", "output_length"):
                if key not in call:
                    raise UserError(f"trace: {where} is missing '{key}'")
            if not isinstance(call["step"], str) or not call["step"]:
                raise UserError(f"trace: {where}: 'step' must be a non-empty string")
            for key in ("input_length", "output_length"):
                value = call[key]
                if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "input_length" else 1):
                    raise UserError(f"trace: {where}: '{key}' must be a positive integer, got {value!r}")
            calls.append(CallSpec(normalise_step(call["step"]), call["input_length"], call["output_length"]))
        token_scale = query.get("token_scale", 1.0)
        if not isinstance(token_scale, (int, float)) or isinstance(token_scale, bool) or not token_scale > 0:
            raise UserError(f"trace: query {qi} in {path.name}: 'token_scale' must be a number > 0, got {token_scale!r}")
        workflow = with_chess_segments(WorkflowSpec(stages_from_calls(calls), source=f"{path.stem}#{qi}"))
        workflows.append(scale_workflow(workflow, float(token_scale)))
    return workflows


def scaled_tokens(tokens: int, token_scale: float) -> int:
    """A token count times `token_scale`, rounded, at least 1 (the replay's and the simulator's rule)."""
    return max(1, int(round(tokens * token_scale)))


def scale_workflow(workflow: WorkflowSpec, token_scale: float) -> WorkflowSpec:
    """The workflow with every token count times `token_scale` (tiny live engines replay a trace's
    shape at a size they keep up with), its prompt segments included: the segments are derived at
    full size and then scaled by their boundaries (a segment ends at round(its full-size end x
    token_scale)), so a template larger than a scaled prompt never happens, a chat history that
    extends the previous call's prompt still extends it, and one segment scales to one size in
    every call. A segment that scales to no token is dropped. Scale 1 returns the workflow as is."""
    if token_scale == 1.0:
        return workflow
    stages = []
    for stage in workflow.stages:
        calls = []
        for c in stage:
            n_in = scaled_tokens(c.input_tokens, token_scale)
            segments: list[SegmentSpec] = []
            end = scaled_end = 0
            for seg in c.segments:
                end += seg.tokens
                start, scaled_end = scaled_end, min(n_in, int(round(end * token_scale)))
                if scaled_end > start:
                    segments.append(SegmentSpec(seg.scope, seg.name, scaled_end - start))
            calls.append(CallSpec(c.step, n_in, scaled_tokens(c.output_tokens, token_scale), tuple(segments)))
        stages.append(tuple(calls))
    return WorkflowSpec(tuple(stages), source=workflow.source, token_scale=workflow.token_scale * token_scale)


def with_scaled_chess_segments(workflow: WorkflowSpec, token_scale: float) -> WorkflowSpec:
    """CHESS segments for a query drawn at `token_scale` (a generator fitted to a scaled trace):
    derived at full size (the lengths divided by the scale) and scaled back as `scale_workflow`
    scales them, cut to the drawn lengths."""
    if token_scale == 1.0:
        return with_chess_segments(workflow)
    full = WorkflowSpec(tuple(tuple(CallSpec(c.step, max(1, round(c.input_tokens / token_scale)), c.output_tokens)
                                    for c in stage) for stage in workflow.stages), source=workflow.source)
    derived = scale_workflow(with_chess_segments(full), token_scale)
    stages = []
    for stage, scaled in zip(workflow.stages, derived.stages):
        calls = []
        for c, d in zip(stage, scaled):
            segments, end = [], 0
            for seg in d.segments:
                tokens = min(seg.tokens, c.input_tokens - end)
                if tokens <= 0:
                    break
                segments.append(seg if tokens == seg.tokens else SegmentSpec(seg.scope, seg.name, tokens))
                end += tokens
            calls.append(CallSpec(c.step, c.input_tokens, c.output_tokens, tuple(segments)))
        stages.append(tuple(calls))
    return WorkflowSpec(tuple(stages), source=workflow.source, token_scale=workflow.token_scale)


# ---------------------------------------------------------------------------------------------
# CHESS prompt structure, for vLLM's prefix cache.

CHESS_TEMPLATES_PATH = Path(__file__).resolve().parent.parent / "data" / "reference" / "chess_prompt_templates.json"
# "The two parallel candidate generators use different templates; they share only ~150 tokens"
# (chess_prompt_templates.json, sharing_notes)
CANDIDATE_COMMON_PREFIX_TOKENS = 150
# "The evaluate calls of one query ... share all but their last ~30 tokens" (same notes)
EVALUATE_OWN_TOKENS = 30
ROUTER_STEPS = ("Information Retriever", "unit_tester")  # their calls of one query extend one chat history


@lru_cache(maxsize=1)
def chess_static_prefix_tokens() -> dict[str, int]:
    """Cacheable template tokens per CHESS template: the static text before the first
    query-specific placeholder; the router agents' templates hold no placeholder (whole template)."""
    raw = json.loads(CHESS_TEMPLATES_PATH.read_text())
    out = {step: int(n) for step, n in raw["template_tokens"].items() if step in ROUTER_STEPS}
    out.update({step: int(n) for step, n in raw["static_prefix_tokens_estimate"].items()})
    return out


def with_chess_segments(workflow: WorkflowSpec) -> WorkflowSpec:
    """The workflow with each call's shared prompt prefix derived from the CHESS templates
    (envs/data/reference/chess_prompt_templates.json) and its measured input length:

    - every step starts with its template's static text (scope `template`); the larger-prompt
      candidate of a stage is generator one, the others generator two, and both templates open
      with the same CANDIDATE_COMMON_PREFIX_TOKENS;
    - the evaluate calls of a stage share one schema + question + candidates string (scope
      `workflow`): all of the stage's shortest prompt but its last EVALUATE_OWN_TOKENS;
    - the router calls (Information Retriever, unit_tester) of a query extend one chat history per
      agent: a call's prompt is the previous call's prompt plus its own new turn (scope
      `workflow`, one segment per turn), so the next call shares all of it; a call shorter than
      the previous one starts a new history;
    - candidate generation and revise rebuild and reshuffle the schema per call: only the template
      is shared. Steps that are not CHESS steps get no segments (no cache sharing)."""
    derived = _chess_stages([[(c.step, c.input_tokens, c.output_tokens) for c in stage] for stage in workflow.stages])
    return WorkflowSpec(tuple(stage if calls is None else calls for stage, calls in zip(workflow.stages, derived)),
                        source=workflow.source, token_scale=workflow.token_scale)


_new_tuple = tuple.__new__  # builds a SegmentSpec without its Python-level __new__ (hot: once per call)


def _chess_stages(stages: Sequence[Sequence[tuple[str, int, int]]]) -> list[tuple[CallSpec, ...] | None]:
    """`with_chess_segments` on (step, input tokens, output tokens) per call: the stages' calls
    with their segments, None for a stage of a step that is not a CHESS step."""
    static = chess_static_prefix_tokens()
    history: dict[str, tuple[int, int, tuple[SegmentSpec, ...]]] = {}  # step -> (input, chain id, segments)
    out: list[tuple[CallSpec, ...] | None] = []
    for si, calls in enumerate(stages):
        step = calls[0][0]
        if step == "generate_candidate":
            largest = max(range(len(calls)), key=lambda i: calls[i][1])
            stage = []
            for i, (_, input_tokens, output_tokens) in enumerate(calls):
                template = "generate_candidate_one" if i == largest else "generate_candidate_two"
                size = min(static[template], input_tokens - 1)
                common = min(CANDIDATE_COMMON_PREFIX_TOKENS, size)
                stage.append(_call(step, input_tokens, output_tokens,
                                   (_template_segment("chess/generate_candidate", common),
                                    _template_segment(_CHESS_NAMES[template], size - common))))
            out.append(tuple(stage))
        elif step == "evaluate":
            shortest = min(c[1] for c in calls)
            size = min(static["evaluate"], shortest - 1)
            shared = shortest - size - EVALUATE_OWN_TOKENS
            segs: tuple[SegmentSpec, ...] = (_template_segment("chess/evaluate", size),)
            if shared > 0:
                segs += (_new_tuple(SegmentSpec, ("workflow", f"evaluate#{si}", shared)),)
            out.append(tuple(_call(step, i, o, segs) for _, i, o in calls))
        elif step in ROUTER_STEPS:
            stage = []
            for _, input_tokens, output_tokens in calls:
                prev = history.get(step)
                if prev is not None and input_tokens > prev[0]:
                    chain = prev[1]
                    segs = prev[2] + (_new_tuple(SegmentSpec, ("workflow", f"{step}#{chain}.{len(prev[2])}",
                                                               input_tokens - prev[0])),)
                else:
                    chain = prev[1] + 1 if prev is not None else 0
                    size = min(static[step], input_tokens)
                    segs = (_template_segment(_CHESS_NAMES[step], size),)
                    if input_tokens > size:
                        segs += (_new_tuple(SegmentSpec, ("workflow", f"{step}#{chain}.1", input_tokens - size)),)
                history[step] = (input_tokens, chain, segs)
                stage.append(_call(step, input_tokens, output_tokens, segs))
            out.append(tuple(stage))
        elif step in static:
            name = _CHESS_NAMES[step]
            top = static[step]
            out.append(tuple(_call(step, i, o, (_template_segment(name, min(top, i - 1)),)) for _, i, o in calls))
        else:
            out.append(None)
    return out


class _ChessNames(dict):
    """"chess/<template>" per template name, built once each."""

    def __missing__(self, template: str) -> str:
        name = self[template] = f"chess/{template}"
        return name


_CHESS_NAMES = _ChessNames()
_TEMPLATE_SEGMENTS: dict[tuple[str, int], SegmentSpec] = {}  # (name, tokens) -> the template segment, built once


def _template_segment(name: str, tokens: int) -> SegmentSpec:
    seg = _TEMPLATE_SEGMENTS.get((name, tokens))
    if seg is None:
        seg = SegmentSpec("template", name, tokens)
        if len(_TEMPLATE_SEGMENTS) < 1 << 16:
            _TEMPLATE_SEGMENTS[(name, tokens)] = seg
    return seg


def _call(step: str, input_tokens: int, output_tokens: int, segments: tuple[SegmentSpec, ...]) -> CallSpec:
    """The call with these segments, less the empty ones (a prompt shorter than a template)."""
    for seg in segments:
        if seg.tokens <= 0:
            segments = tuple(s for s in segments if s.tokens > 0)
            break
    return CallSpec(step, input_tokens, output_tokens, segments)


def warm_cache_hit_tokens(workflow: WorkflowSpec) -> int:
    """Prompt tokens of a query that engines with a warm prefix cache would not prefill: its
    template and tenant segments, and its workflow segments from their second use on (up to the
    first segment that misses; block rounding and evictions ignored). An upper bound on hits."""
    seen: set[str] = set()
    hits = 0
    for stage in workflow.stages:
        for call in stage:
            missed = False
            for seg in call.segments:
                warm = seg.scope != "workflow" or seg.name in seen
                if not missed and warm:
                    hits += seg.tokens
                else:
                    missed = True
        for call in stage:
            seen.update(seg.name for seg in call.segments if seg.scope == "workflow")
    return hits


def step_mean_tokens(workflows: Sequence[WorkflowSpec]) -> dict[str, tuple[float, float]]:
    """Mean (input, output) tokens per step: what a scheduler may know about a step in advance."""
    sums: dict[str, list[float]] = {}
    for wf in workflows:
        for stage in wf.stages:
            for c in stage:
                acc = sums.setdefault(c.step, [0.0, 0.0, 0.0])
                acc[0] += c.input_tokens
                acc[1] += c.output_tokens
                acc[2] += 1
    return {step: (a[0] / a[2], a[1] / a[2]) for step, a in sums.items()}


# ---------------------------------------------------------------------------------------------
# A generator fitted to a trace: unlimited new queries that look like the trace.


@dataclass
class _StepTokenFit:
    """Bivariate log-normal of (input, output) tokens of one step."""

    mean: np.ndarray
    cov: np.ndarray
    min_tokens: tuple[int, int]
    max_tokens: tuple[int, int]


@dataclass
class TraceGenerator:
    """Draws workflow shapes from the trace's empirical shape distribution (so the workflow-length
    and fan-out distributions match) and token counts from per-step log-normal fits (so each query
    is new). Fitted once, then sampled with any seed."""

    shapes: list[tuple[tuple[str, int], ...]]  # per workflow: (step, fan-out width) per stage
    token_fits: dict[str, _StepTokenFit] = field(default_factory=dict)
    name: str = "generator"
    chess_segments: bool = False  # derive CHESS prompt segments for the drawn queries (fitted to a CHESS trace)
    token_scale: float = 1.0  # the fitted trace's token scale: the drawn queries' segments are scaled alike

    @classmethod
    def fit(cls, workflows: Sequence[WorkflowSpec], name: str = "generator") -> "TraceGenerator":
        shapes = [tuple((stage[0].step, len(stage)) for stage in wf.stages) for wf in workflows]
        per_step: dict[str, list[tuple[int, int]]] = {}
        for wf in workflows:
            for stage in wf.stages:
                for c in stage:
                    per_step.setdefault(c.step, []).append((c.input_tokens, c.output_tokens))
        fits = {}
        for step, pairs in per_step.items():
            arr = np.log(np.asarray(pairs, dtype=float))
            cov = np.cov(arr.T) if len(pairs) > 2 else np.diag([0.01, 0.01])
            cov = np.atleast_2d(cov) + np.eye(2) * 1e-6
            raw = np.asarray(pairs)
            fits[step] = _StepTokenFit(arr.mean(axis=0), cov, (int(raw[:, 0].min()), int(raw[:, 1].min())),
                                       (int(raw[:, 0].max()), int(raw[:, 1].max())))
        chess = any(c.segments for wf in workflows for stage in wf.stages for c in stage)
        scales = {wf.token_scale for wf in workflows}
        return cls(shapes=shapes, token_fits=fits, name=name, chess_segments=chess,
                   token_scale=scales.pop() if len(scales) == 1 else 1.0)

    def sample(self, n: int, rng: np.random.Generator, prompt_segments: bool = True) -> list[WorkflowSpec]:
        """`n` new queries; `prompt_segments=False` skips deriving their prompt structure (no
        prefix cache to use it; the draws are the same)."""
        with cyclic_gc_paused():  # many small, cycle-free objects (see `cyclic_gc_paused`)
            return self._sample(n, rng, prompt_segments)

    def _sample(self, n: int, rng: np.random.Generator, prompt_segments: bool) -> list[WorkflowSpec]:
        shapes = [self.shapes[int(i)] for i in rng.integers(len(self.shapes), size=n)]
        # draw every step's token pairs in one vectorised batch, then hand them out in order
        counts: dict[str, int] = {}
        for shape in shapes:
            for step, width in shape:
                counts[step] = counts.get(step, 0) + width
        pools: dict[str, list[tuple[int, int]]] = {}
        for step in sorted(counts):
            fit = self.token_fits[step]
            chol = np.linalg.cholesky(fit.cov)
            draws = np.exp(fit.mean + rng.standard_normal((counts[step], 2)) @ chol.T)
            ins = np.clip(np.rint(draws[:, 0]), fit.min_tokens[0], fit.max_tokens[0]).astype(int).tolist()
            outs = np.clip(np.rint(draws[:, 1]), fit.min_tokens[1], fit.max_tokens[1]).astype(int).tolist()
            pools[step] = list(zip(ins, outs))
        cursor = dict.fromkeys(pools, 0)
        out = []
        segmented = self.chess_segments and prompt_segments
        for qi, shape in enumerate(shapes):
            if segmented and self.token_scale == 1.0:  # the calls are built once, with their segments
                raw = []
                for step, width in shape:
                    at = cursor[step]
                    cursor[step] = at + width
                    raw.append([(step, i, o) for i, o in pools[step][at:at + width]])
                derived = _chess_stages(raw)
                stages = [tuple(CallSpec(*c) for c in calls) if chess is None else chess
                          for calls, chess in zip(raw, derived)]
                out.append(WorkflowSpec(tuple(stages), source=f"{self.name}#{qi}"))
                continue
            stages = []
            for step, width in shape:
                at = cursor[step]
                cursor[step] = at + width
                stages.append(tuple(CallSpec(step, i, o) for i, o in pools[step][at:at + width]))
            spec = WorkflowSpec(tuple(stages), source=f"{self.name}#{qi}", token_scale=self.token_scale)
            out.append(with_scaled_chess_segments(spec, self.token_scale) if segmented else spec)
        return out


# ---------------------------------------------------------------------------------------------
# YAML workflow specs for other agentic workflows.


class TokenDist(BaseModel):
    """Token count distribution: a constant, or a log-normal given by its median and sigma."""

    model_config = ConfigDict(extra="forbid")
    median: PositiveFloat
    sigma: float = Field(0.0, ge=0.0)
    min: PositiveInt = 1
    max: PositiveInt = 131072

    def sample(self, rng: np.random.Generator) -> int:
        value = self.median * math.exp(self.sigma * rng.standard_normal()) if self.sigma > 0 else self.median
        return int(min(self.max, max(self.min, round(value))))


class PromptSegment(BaseModel):
    """A shared part at the start of a stage's prompts (see `SegmentSpec`): e.g. the agent's system
    prompt (`template`), a tenant's schema (`tenant`), the query's chat history so far (`workflow`).
    The same scope and name anywhere in the template is the same text."""

    model_config = ConfigDict(extra="forbid")
    scope: SegmentScope
    name: str = Field(min_length=1)
    tokens: PositiveInt


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: str = Field(min_length=1)
    fanout: PositiveInt = 1
    input_tokens: TokenDist
    output_tokens: TokenDist
    # the prompt's shared prefix, in order; the rest of input_tokens is the call's own (a drawn
    # input shorter than the prefix cuts it short)
    prompt: list[PromptSegment] = []


class LoopSpec(BaseModel):
    """Repeat stages[start..end] (inclusive) again with probability repeat_prob, up to max_repeats."""

    model_config = ConfigDict(extra="forbid")
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    repeat_prob: float = Field(ge=0.0, le=1.0)
    max_repeats: PositiveInt = 3


class WorkflowTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "workflow"
    stages: list[StageSpec] = Field(min_length=1)
    loops: list[LoopSpec] = []

    @model_validator(mode="after")
    def _loops_in_range(self) -> "WorkflowTemplate":
        for i, loop in enumerate(self.loops):
            if not loop.start <= loop.end < len(self.stages):
                raise ValueError(f"loops[{i}]: need 0 <= start <= end < {len(self.stages)} (number of stages)")
        sizes: dict[tuple[str, str], int] = {}
        for i, stage in enumerate(self.stages):
            for j, seg in enumerate(stage.prompt):
                known = sizes.setdefault((seg.scope, seg.name), seg.tokens)
                if known != seg.tokens:
                    raise ValueError(f"stages[{i}].prompt[{j}]: {seg.scope} segment {seg.name!r} has {seg.tokens} tokens "
                                     f"here and {known} elsewhere (the same name is the same text: give it one size)")
        return self

    def _segments(self, stage: StageSpec, input_tokens: int) -> tuple[SegmentSpec, ...]:
        out = []
        left = input_tokens
        for seg in stage.prompt:
            if left <= 0:
                break
            name = f"{self.name}/{seg.name}" if seg.scope == "template" else seg.name
            out.append(SegmentSpec(seg.scope, name, min(seg.tokens, left)))
            left -= seg.tokens
        return tuple(out)

    @classmethod
    def load(cls, path: str | Path) -> "WorkflowTemplate":
        path = Path(path)
        return validate_as(cls, load_yaml_mapping(path, "workflow"), "workflow", path.name)

    def sample(self, n: int, rng: np.random.Generator) -> list[WorkflowSpec]:
        out = []
        for qi in range(n):
            order: list[int] = []
            idx = 0
            repeats = [0] * len(self.loops)
            while idx < len(self.stages):
                order.append(idx)
                jumped = False
                for li, loop in enumerate(self.loops):
                    if idx == loop.end and repeats[li] < loop.max_repeats and rng.random() < loop.repeat_prob:
                        repeats[li] += 1
                        idx = loop.start
                        jumped = True
                        break
                if not jumped:
                    idx += 1
            stages = []
            for si in order:
                spec = self.stages[si]
                calls = []
                for _ in range(spec.fanout):
                    n_in = spec.input_tokens.sample(rng)
                    calls.append(CallSpec(spec.step, n_in, spec.output_tokens.sample(rng), self._segments(spec, n_in)))
                stages.append(tuple(calls))
            out.append(WorkflowSpec(tuple(stages), source=f"{self.name}#{qi}"))
        return out


# ---------------------------------------------------------------------------------------------
# Arrival processes (seeded): times in seconds from 0. `times_after(start_s, n, rng)` is the
# process's forecast from a point in a run: the next n arrivals after `start_s`, given nothing of
# the arrivals before it (what a fork of a running simulator draws, `envs.sim.fork`).


class PoissonArrivals(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["poisson"] = "poisson"
    rate_qps: PositiveFloat

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.cumsum(rng.exponential(1.0 / self.rate_qps, size=n))

    def times_after(self, start_s: float, n: int, rng: np.random.Generator) -> np.ndarray:
        return start_s + self.times(n, rng)  # memoryless


class GammaArrivals(BaseModel):
    """Gamma inter-arrival times with mean 1/rate and coefficient of variation `cv` (cv=1: Poisson,
    cv>1: bursty)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["gamma"] = "gamma"
    rate_qps: PositiveFloat
    cv: PositiveFloat = 1.0

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        shape = 1.0 / (self.cv ** 2)
        scale = 1.0 / (self.rate_qps * shape)
        return np.cumsum(rng.gamma(shape, scale, size=n))

    def times_after(self, start_s: float, n: int, rng: np.random.Generator) -> np.ndarray:
        """A renewal process restarted at `start_s` (the time since the last arrival is not used)."""
        return start_s + self.times(n, rng)


class RateSegment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    duration_s: PositiveFloat
    rate_qps: float = Field(ge=0.0)


class PiecewiseArrivals(BaseModel):
    """A Poisson process whose rate is constant in segments (load steps); repeats after the last
    segment. `diurnal(...)` builds a sine-shaped day curve out of such segments."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["piecewise"] = "piecewise"
    segments: list[RateSegment] = Field(min_length=1)

    @model_validator(mode="after")
    def _some_load(self) -> "PiecewiseArrivals":
        if all(s.rate_qps == 0 for s in self.segments):
            raise ValueError("segments: at least one segment needs rate_qps > 0")
        return self

    @classmethod
    def diurnal(cls, mean_rate_qps: float, amplitude: float, period_s: float, steps: int = 24) -> "PiecewiseArrivals":
        segs = [RateSegment(duration_s=period_s / steps,
                            rate_qps=max(0.0, mean_rate_qps * (1 + amplitude * math.sin(2 * math.pi * (i + 0.5) / steps))))
                for i in range(steps)]
        return cls(segments=segs)

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        # time change: unit-rate Poisson points mapped through the inverse cumulative rate
        return self._inverse_cumulative(np.cumsum(rng.exponential(1.0, size=n)))

    def times_after(self, start_s: float, n: int, rng: np.random.Generator) -> np.ndarray:
        """The next `n` arrivals after `start_s` (a Poisson process's future does not depend on
        its past): unit-rate points from the cumulative rate at `start_s` on."""
        return self._inverse_cumulative(self._cumulative(start_s) + np.cumsum(rng.exponential(1.0, size=n)))

    def _cumulative(self, t_s: float) -> float:
        """Expected arrivals in [0, t_s]."""
        t0, cum, seg_i = 0.0, 0.0, 0
        segs = self.segments
        while True:
            seg = segs[seg_i % len(segs)]
            if t0 + seg.duration_s >= t_s:
                return cum + seg.rate_qps * (t_s - t0)
            cum += seg.rate_qps * seg.duration_s
            t0 += seg.duration_s
            seg_i += 1

    def _inverse_cumulative(self, unit: np.ndarray) -> np.ndarray:
        """The times at which the cumulative rate reaches each of the sorted `unit` values."""
        n = len(unit)
        out = np.empty(n)
        t0, cum, seg_i, k = 0.0, 0.0, 0, 0
        segs = self.segments
        while k < n:
            seg = segs[seg_i % len(segs)]
            seg_mass = seg.rate_qps * seg.duration_s
            while k < n and unit[k] <= cum + seg_mass:
                out[k] = t0 + (unit[k] - cum) / seg.rate_qps
                k += 1
            cum += seg_mass
            t0 += seg.duration_s
            seg_i += 1
        return out

    @property
    def mean_rate_qps(self) -> float:
        total = sum(s.duration_s for s in self.segments)
        return sum(s.rate_qps * s.duration_s for s in self.segments) / total


class ReplayArrivals(BaseModel):
    """Given timestamps (seconds), replayed as they are; fewer timestamps than queries is an error."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["replay"] = "replay"
    timestamps_s: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _sorted(self) -> "ReplayArrivals":
        if any(b < a for a, b in zip(self.timestamps_s, self.timestamps_s[1:])):
            raise ValueError("timestamps_s: must be non-decreasing")
        return self

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if n > len(self.timestamps_s):
            raise UserError(f"arrivals.timestamps_s: {len(self.timestamps_s)} timestamps for {n} queries (give more timestamps or fewer queries)")
        return np.asarray(self.timestamps_s[:n], dtype=float)

    def times_after(self, start_s: float, n: int, rng: np.random.Generator) -> np.ndarray:
        """Poisson at the replay's mean rate from `start_s`: its timestamps are the run's data, not
        a forecast of it."""
        ts = self.timestamps_s
        rate = (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else 1.0
        return start_s + np.cumsum(rng.exponential(1.0 / rate, size=n))


ArrivalProcess = PoissonArrivals | GammaArrivals | PiecewiseArrivals | ReplayArrivals


def draw_workflows(trace: Sequence[WorkflowSpec], n: int | None, rng: np.random.Generator,
                   generator: TraceGenerator | None = None, prompt_segments: bool = True) -> list[WorkflowSpec]:
    """The trace in order if it has enough queries; beyond it, new queries from the fitted generator."""
    if n is None or n <= len(trace):
        return list(trace[: n if n is not None else len(trace)])
    generator = generator or TraceGenerator.fit(trace)
    return list(trace) + generator.sample(n - len(trace), rng, prompt_segments)
