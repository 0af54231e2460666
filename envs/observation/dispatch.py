"""The dispatch observation: a fixed-size float32 vector built from the shared state view.

Layout (see `DispatchObservation.layout`), in this order:
- global   (GLOBAL_FEATURES): recent arrival rate, SLO attainment so far;
- call     (CALL_FEATURES + one-hot over STEP_NAMES + "other"): tokens, slack to the call's and the
  workflow's deadline, fan-out siblings, tenant priority;
- workflow (WORKFLOW_FEATURES): expected remaining work, share of the SLO budget used (log1p: 0.69
  at the deadline), calls done;
- engines  (max_engines rows x ENGINE_FEATURES, row-major): per engine, for *this* call: health,
  whether the call fits its KV cache, relative speed and latency for the call's step, outstanding
  work, expected finish time of the call there, margin to the call's deadline, running batch,
  waiting calls, KV use, share of all work ever assigned (the paper's W_e), price; from spec v2 on
  also the share of the call's prompt the engine's prefix cache holds now and the call's expected
  latency there given those hits. Rows beyond the episode's cluster size are zero (padding; their
  actions are masked).

Versions: v1 (no prefix-cache features) is still built for policies trained on it
(`DispatchObservation(max_engines, version=1)`); new policies get OBS_VERSION.

Scaling: times use log1p(t / TIME_SCALE_S) (non-negative) or asinh(t / TIME_SCALE_S) (signed), so a
10 s call is ~0.7, an SLO of a few minutes ~3, and a backlog of hours still only ~7; counts use
log1p(n). Typical values stay within [-5, 5] and every value is clipped to [-OBS_CLIP, OBS_CLIP],
the declared Box bounds, under any load.

Only the read-only view protocols (`envs.sim.view`) are read, so a trained policy builds the same
vector inside `simulate` and in the deploy gateway (a test checks both views give equal vectors).

Speed: the vector is built in plain Python floats and converted once (numpy per-call overhead on
a handful of numbers costs more than the arithmetic); per-step latencies of every engine for every
step are tabulated when the episode starts.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from envs.sim.view import CallView, ClusterView

# Bumped whenever features, their order, units or scaling change (trained policies record it).
# 2: per-engine prefix-cache features (cached share of the prompt, expected latency given the hits)
OBS_VERSION = 2
SUPPORTED_OBS_VERSIONS = (1, 2)
# Every observation value lies in [-OBS_CLIP, OBS_CLIP] (the Box bounds). log1p(t/10 s) reaches 10
# only for t > 2.2e5 s, asinh at |t| > 1.1e5 s: far beyond any meaningful state, so clipping never
# hides a difference a policy could use.
OBS_CLIP = 10.0
# Time unit of time features: about one typical LLM call (CHESS calls take 0.2-35 s solo).
TIME_SCALE_S = 10.0
# Token units: CHESS prompts are ~0.3k-15k tokens (max ~50k), outputs ~5-700 tokens.
INPUT_TOKENS_SCALE = 1000.0
OUTPUT_TOKENS_SCALE = 100.0
# Arrival-rate unit: the paper cluster saturates around 0.1-0.25 queries/s.
RATE_SCALE_QPS = 0.1
# Price unit: on-demand GPU prices are ~0.7-3 $/GPU-hour.
PRICE_SCALE_USD_PER_H = 2.0
# Tenant priorities are small integers; scaled so a few levels span ~[0, 1].
PRIORITY_SCALE = 4.0

# The CHESS steps, in a fixed order (the one-hot layout must not depend on the trace); any other
# step (workflow templates) maps to the trailing "other" slot.
STEP_NAMES: tuple[str, ...] = ("Information Retriever", "extract_keywords", "generate_candidate", "revise",
                               "unit_tester", "generate_unit_test", "evaluate")
STEP_SLOTS = len(STEP_NAMES) + 1

GLOBAL_FEATURES: tuple[str, ...] = ("arrival_rate", "attainment_so_far")
CALL_FEATURES: tuple[str, ...] = ("input_tokens", "output_tokens", "call_slack", "workflow_slack", "fanout_siblings",
                                  "priority") + tuple(f"step={s}" for s in STEP_NAMES) + ("step=other",)
WORKFLOW_FEATURES: tuple[str, ...] = ("remaining_work", "budget_used", "calls_done")
ENGINE_FEATURES_V1: tuple[str, ...] = ("healthy", "fits", "relative_speed", "latency", "outstanding_work",
                                       "expected_finish", "deadline_margin", "running", "waiting", "kv_usage",
                                       "assigned_share", "price")
# v2 appends (so v1 indices stay): cached share of the prompt, log1p(expected latency given the hits / 10 s)
ENGINE_FEATURES: tuple[str, ...] = ENGINE_FEATURES_V1 + ("cached_share", "cached_latency")
N_HEAD = len(GLOBAL_FEATURES) + len(CALL_FEATURES) + len(WORKFLOW_FEATURES)


def engine_features(version: int = OBS_VERSION) -> tuple[str, ...]:
    """The per-engine features of an observation-spec version."""
    if version not in SUPPORTED_OBS_VERSIONS:
        raise ValueError(f"observation spec v{version} is not built by this agentsched "
                         f"(supported: {', '.join(f'v{v}' for v in SUPPORTED_OBS_VERSIONS)})")
    return ENGINE_FEATURES_V1 if version == 1 else ENGINE_FEATURES

# reciprocals, so the hot path multiplies
INV_TIME_SCALE = 1.0 / TIME_SCALE_S
INV_INPUT_TOKENS_SCALE = 1.0 / INPUT_TOKENS_SCALE
INV_OUTPUT_TOKENS_SCALE = 1.0 / OUTPUT_TOKENS_SCALE
INV_RATE_SCALE = 1.0 / RATE_SCALE_QPS
INV_PRIORITY_SCALE = 1.0 / PRIORITY_SCALE
# log1p(n) of counts, tabulated up to where it reaches OBS_CLIP (beyond: OBS_CLIP)
_COUNT_TABLE_SIZE = int(math.expm1(OBS_CLIP))
_COUNT_FEATURE = [math.log1p(i) for i in range(_COUNT_TABLE_SIZE)]


def _count(n: int) -> float:
    return _COUNT_FEATURE[n] if 0 <= n < _COUNT_TABLE_SIZE else (OBS_CLIP if n > 0 else 0.0)


def observation_size(max_engines: int, version: int = OBS_VERSION) -> int:
    return N_HEAD + max_engines * len(engine_features(version))


def _log1p_clip(x: float) -> float:
    return min(math.log1p(x), OBS_CLIP) if x > 0.0 else 0.0


class DispatchObservation:
    """Builds the observation of a ready call from the read-only state view alone
    (`envs.sim.view`: `CallView`, `ClusterView`, `EngineView`, `WorkflowView`), so the same
    builder serves the env, a trained policy inside `simulate`, and the deploy gateway.

    `build(call, cluster)` per decision; per-engine static values (latency of each step, relative
    speed, price) are tabulated on first use and kept while the cluster object and its engine
    count stay the same (`bind()` forces a refresh, e.g. after engine latencies were re-estimated).
    `valid_actions(cluster)` gives the matching mask (healthy engines; padding is invalid).
    """

    def __init__(self, max_engines: int, version: int = OBS_VERSION):
        self.max_engines = max_engines
        self.version = version
        self.engine_features = engine_features(version)
        self._cache_features = version >= 2
        self.size = observation_size(max_engines, version)
        self._step_slot = {s: i for i, s in enumerate(STEP_NAMES)}
        self._one_hot = [tuple(1.0 if j == i else 0.0 for j in range(STEP_SLOTS)) for i in range(STEP_SLOTS)]
        self._cluster: ClusterView | None = None
        self._n = 0
        self._n_pad = 0
        self._per_step: dict[str, list[tuple]] = {}
        self.all_healthy = False  # set by build(): every engine was healthy (the common case: full mask)

    @property
    def layout(self) -> dict[str, slice]:
        """Slices of the flat vector; the engine block reshapes to (max_engines, len(ENGINE_FEATURES))."""
        g = len(GLOBAL_FEATURES)
        c = g + len(CALL_FEATURES)
        w = c + len(WORKFLOW_FEATURES)
        return {"global": slice(0, g), "call": slice(g, c), "workflow": slice(c, w), "engines": slice(w, self.size)}

    def bind(self, cluster: ClusterView) -> None:
        """Forget tabulated per-engine values and use `cluster` from now on."""
        n = len(cluster.engines)
        if n > self.max_engines:
            name = getattr(getattr(cluster, "config", None), "name", "the cluster")
            raise ValueError(f"{name} has {n} engines but the observation was built for max_engines="
                             f"{self.max_engines}; use a larger max_engines")
        self._cluster = cluster
        self._n = n
        self._n_pad = (self.max_engines - n) * len(self.engine_features)
        self._per_step = {}

    def _engine_static(self, step: str) -> list[tuple]:
        """Per engine: (engine, latency_s, relative speed, latency feature, KV capacity in tokens,
        price feature)."""
        engines = self._cluster.engines
        lats = [e.expected_latency_s(step) for e in engines]
        fastest = min(lats)
        rows = [(e, lat, fastest / lat if lat > 0 else 1.0, min(math.log1p(lat * INV_TIME_SCALE), OBS_CLIP),
                 e.kv_capacity_tokens, min(e.price_per_hour / PRICE_SCALE_USD_PER_H, OBS_CLIP))
                for e, lat in zip(engines, lats)]
        self._per_step[step] = rows
        return rows

    def valid_actions(self, cluster: ClusterView) -> np.ndarray:
        """int8 mask over max_engines: healthy engines of `cluster` (padding is 0)."""
        mask = np.zeros(self.max_engines, dtype=np.int8)
        mask[:len(cluster.engines)] = [e.healthy for e in cluster.engines]
        return mask

    def build(self, call: CallView | None, cluster: ClusterView | None = None) -> np.ndarray:
        """The observation for `call` in `cluster` (default: the bound one); `call` None at episode
        end: call and workflow parts are zero.

        Hot path: inline conditionals instead of min()/max() calls and a table for log1p of counts;
        the engine loop reads each attribute once."""
        if cluster is None:
            cluster = self._cluster
        elif cluster is not self._cluster or len(cluster.engines) != self._n:
            self.bind(cluster)
        now = cluster.now_s
        inv_t = INV_TIME_SCALE
        clip = OBS_CLIP
        asinh = math.asinh
        log1p = math.log1p
        count_feat = _COUNT_FEATURE
        n_table = _COUNT_TABLE_SIZE
        rate = cluster.recent_arrival_rate_qps * INV_RATE_SCALE
        out = [rate if rate < clip else clip, cluster.slo_attainment_so_far]
        if call is None:
            out += self._idle_tail(cluster)
        else:
            wf = cluster.workflow(call.workflow_id)
            call_slack = call.deadline_s - now
            x = asinh(call_slack * inv_t)
            y = asinh((wf.deadline_s - now) * inv_t)
            fan = call.fanout - 1
            prio = call.priority * INV_PRIORITY_SCALE
            tin = log1p(call.input_tokens * INV_INPUT_TOKENS_SCALE)
            tout = log1p(call.output_tokens * INV_OUTPUT_TOKENS_SCALE)
            out += (tin if tin < clip else clip, tout if tout < clip else clip,
                    x if -clip < x < clip else (clip if x > 0 else -clip),
                    y if -clip < y < clip else (clip if y > 0 else -clip),
                    count_feat[fan] if fan < n_table else clip,
                    prio if -clip < prio < clip else (clip if prio > 0 else -clip))
            out += self._one_hot[self._step_slot.get(call.step, STEP_SLOTS - 1)]
            rem = log1p(wf.expected_remaining_s * inv_t)
            elapsed = now - wf.arrival_time_s
            used = log1p(elapsed / wf.slo_s) if elapsed > 0.0 else 0.0  # 0.69 at the deadline
            done = wf.calls_done
            out += (rem if rem < clip else clip, used if used < clip else clip,
                    count_feat[done] if done < n_table else clip)
            tokens = call.input_tokens + call.output_tokens
            rows = self._per_step.get(call.step) or self._engine_static(call.step)
            total_w = 0.0
            for row in rows:
                total_w += row[0].assigned_work_s
            inv_total_w = 1.0 / total_w if total_w > 0.0 else 0.0
            up = 0
            cache_features = self._cache_features
            inv_in = 1.0 / call.input_tokens if call.input_tokens > 0 else 0.0
            for e, lat, speed, lat_feat, cap, price in rows:
                healthy = e.healthy
                up += healthy
                w = e.outstanding_work_s
                finish = w + lat
                a = log1p(w * inv_t)
                b = log1p(finish * inv_t)
                m = asinh((call_slack - finish) * inv_t)
                r = e.num_running
                q = e.num_waiting
                out += (1.0 if healthy else 0.0, 1.0 if tokens <= cap else 0.0, speed, lat_feat,
                        a if a < clip else clip, b if b < clip else clip,
                        m if -clip < m < clip else (clip if m > 0 else -clip),
                        count_feat[r] if r < n_table else clip, count_feat[q] if q < n_table else clip,
                        e.kv_usage, e.assigned_work_s * inv_total_w, price)
                if cache_features:
                    hit = e.cached_prefix_tokens(call)
                    if hit:
                        c = log1p(e.expected_call_latency_s(call) * inv_t)
                        out += (hit * inv_in, c if c < clip else clip)
                    else:
                        out += (0.0, lat_feat)
            self.all_healthy = up == self._n
        if self._n_pad:  # converting the zeros of padding one by one would cost more than the rest
            obs = np.zeros(self.size, np.float32)
            obs[:self.size - self._n_pad] = np.fromiter(out, np.float32, self.size - self._n_pad)
            return obs
        return np.fromiter(out, np.float32, self.size)

    def _idle_tail(self, cluster: ClusterView) -> list[float]:
        """Call and workflow parts (zero) and engine rows when no call is pending (episode end)."""
        out = [0.0] * (len(CALL_FEATURES) + len(WORKFLOW_FEATURES))
        total_w = sum(e.assigned_work_s for e in cluster.engines) or 1.0
        for e in cluster.engines:
            w = math.log1p(e.outstanding_work_s * INV_TIME_SCALE)
            out += (1.0 if e.healthy else 0.0, 0.0, 0.0, 0.0, w if w < OBS_CLIP else OBS_CLIP, 0.0, 0.0,
                    _count(e.num_running), _count(e.num_waiting), e.kv_usage, e.assigned_work_s / total_w,
                    min(e.price_per_hour / PRICE_SCALE_USD_PER_H, OBS_CLIP))
            if self._cache_features:
                out += (0.0, 0.0)
        return out

    def describe(self) -> list[str]:
        """Name of every position of the vector (for debugging and feature attribution)."""
        names = [f"global.{f}" for f in GLOBAL_FEATURES] + [f"call.{f}" for f in CALL_FEATURES]
        names += [f"workflow.{f}" for f in WORKFLOW_FEATURES]
        names += [f"engine[{i}].{f}" for i in range(self.max_engines) for f in self.engine_features]
        return names


def engine_block(obs: np.ndarray, max_engines: int, version: int = OBS_VERSION) -> np.ndarray:
    """The (max_engines, len(engine_features(version))) engine rows of one observation (a view)."""
    return obs[..., N_HEAD:].reshape(*obs.shape[:-1], max_engines, len(engine_features(version)))


__all__: Sequence[str] = ("DispatchObservation", "ENGINE_FEATURES", "ENGINE_FEATURES_V1", "CALL_FEATURES", "GLOBAL_FEATURES",
                          "WORKFLOW_FEATURES", "STEP_NAMES", "OBS_CLIP", "observation_size", "engine_block", "engine_features")
