"""Fit the roofline's per-GPU `w4` efficiency factors to measured single-call latencies.

`python -m envs.sim.calibration [--prefix warm|cold] [--write]` fits (compute efficiency, memory
efficiency, per-iteration overhead) of every GPU type in envs/data/reference/hexgen_stage_latency.json
by least squares on log latency ratios, prints the per-cell errors, and with --write stores the
factors as the `w4` class of envs/data/gpus.yaml. Reference: Llama-3.1-70B, 4-bit weights, one GPU,
one call at a time, so these are the factors of 4-bit weight-only kernels; the `w16` class is fitted
to published BF16 vLLM runs by `benchmarks/published_vllm.py --fit --write` (see `write_factors`).

Bounds are physical: no GPU computes faster than its peak dense FLOP/s or reads faster than its HBM
bandwidth, so both efficiencies are at most 1.0 of the catalog's peaks.

`--prefix` says what the reference engine had in its prefix cache when it served each call:
- `warm` (default): each step's static template prefix was a cache hit (vLLM's automatic prefix
  caching was on and the engine had served that step before). The cached length of a step is its
  `static_prefix_tokens_estimate` in envs/data/reference/chess_prompt_templates.json; the router
  steps (Information Retriever, unit_tester), which have no estimate there (their templates open
  with placeholders), count as uncached. The reference's
  `generate_candidate` mean (11,748 input tokens) is generator one's (template 9,158 + the
  per-database remainder), so it takes generator one's prefix.
- `cold`: nothing cached; every prompt token is prefilled.
The best bounded fit of each is printed with per-cell errors, so the two explanations can be compared.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import yaml
from scipy.optimize import least_squares, minimize

from envs.sim.catalog import DATA_DIR, EFFICIENCY_FIELDS, WEIGHT_CLASSES, Efficiency, WeightClass, load_catalog, weight_class_of
from envs.sim.perf import RooflineModel, solo_call_latency_s

REFERENCE_PATH = DATA_DIR / "reference" / "hexgen_stage_latency.json"
TEMPLATES_PATH = DATA_DIR / "reference" / "chess_prompt_templates.json"
REFERENCE_MODEL = "Llama-3.1-70B"
REFERENCE_WEIGHT_BITS = 4
REFERENCE_KV_BITS = 16
REFERENCE_BATCHED_TOKENS = 8192
PREFIX_MODES = ("warm", "cold")
DEFAULT_PREFIX = "warm"
# the reference's step names where chess_prompt_templates.json names the two candidate generators apart
TEMPLATE_STEP_OF = {"generate_candidate": "generate_candidate_one"}
# physical upper bounds (fraction of the catalog's peaks) and a plausible range of per-iteration overhead
LOWER = (0.05, 0.05, 1e-4)
UPPER = (1.0, 1.0, 0.2)
# the accuracy band every reference cell should reach: predicted within -20%..+20% of measured,
# slightly inside it so that the rounded factors stay in it
BAND_LO, BAND_HI = math.log(0.805), math.log(1.195)


def load_reference(path: Path = REFERENCE_PATH) -> dict:
    with open(path) as handle:
        return json.load(handle)


def load_templates(path: Path = TEMPLATES_PATH) -> dict:
    with open(path) as handle:
        return json.load(handle)


def reference_cached_tokens(reference: dict, prefix: str, templates: dict | None = None) -> dict[str, int]:
    """Prompt tokens of each reference step served from the prefix cache under `prefix`."""
    if prefix not in PREFIX_MODES:
        raise ValueError(f"prefix must be one of {PREFIX_MODES}, got {prefix!r}")
    steps = list(reference["stage_mean_tokens"])
    if prefix == "cold":
        return {step: 0 for step in steps}
    templates = templates or load_templates()
    static = templates["static_prefix_tokens_estimate"]
    return {step: int(static.get(TEMPLATE_STEP_OF.get(step, step), 0)) for step in steps}


def predict(gpu_name: str, eff: Efficiency, reference: dict, cached: dict[str, int] | None = None) -> dict[str, float]:
    catalog = load_catalog()
    model = RooflineModel(catalog.gpu(gpu_name), catalog.model(REFERENCE_MODEL), 1, REFERENCE_WEIGHT_BITS,
                          REFERENCE_KV_BITS, efficiency=eff)
    cached = cached or {}
    return {
        step: solo_call_latency_s(model, tokens["input_tokens"], tokens["output_tokens"], REFERENCE_BATCHED_TOKENS,
                                  cached_tokens=cached.get(step, 0))
        for step, tokens in reference["stage_mean_tokens"].items()
    }


def fit_gpu(gpu_name: str, reference: dict, cached: dict[str, int] | None = None) -> Efficiency:
    """Least squares on log(predicted / measured) over the GPU's cells, within the physical bounds.

    Where the unconstrained least-squares optimum leaves a cell outside +-20% but some factors
    inside the bounds keep every cell within it, the least-squares optimum under that constraint
    is taken instead (SLSQP); where no such factors exist the plain optimum stands."""
    measured = reference["latency_s"][gpu_name]
    steps = list(measured)

    def residuals(x: np.ndarray) -> np.ndarray:
        eff = Efficiency(compute=math.exp(x[0]), memory=math.exp(x[1]), overhead_s=math.exp(x[2]))
        pred = predict(gpu_name, eff, reference, cached)
        return np.array([math.log(pred[s] / measured[s]) for s in steps])

    lower, upper = np.log(LOWER), np.log(UPPER)
    x = least_squares(residuals, x0=np.log([0.6, 0.6, 0.005]), bounds=(lower, upper)).x
    r = residuals(x)
    if r.max() > BAND_HI or r.min() < BAND_LO:
        banded = minimize(lambda z: float(np.sum(residuals(z) ** 2)), x, method="SLSQP",
                          bounds=list(zip(lower, upper)),
                          constraints=[{"type": "ineq", "fun": lambda z: BAND_HI - residuals(z)},
                                       {"type": "ineq", "fun": lambda z: residuals(z) - BAND_LO}])
        rb = residuals(banded.x)
        if rb.max() <= BAND_HI + 1e-6 and rb.min() >= BAND_LO - 1e-6:
            x = banded.x
    c, m, o = np.exp(x)
    return Efficiency(compute=round(float(c), 4), memory=round(float(m), 4), overhead_s=round(float(o), 5))


def cell_errors(gpu_name: str, eff: Efficiency, reference: dict, cached: dict[str, int] | None = None) -> dict[str, float]:
    """predicted / measured - 1 for every step of one GPU."""
    pred = predict(gpu_name, eff, reference, cached)
    return {s: pred[s] / reference["latency_s"][gpu_name][s] - 1 for s in pred}


def fit_all(prefix: str, reference: dict | None = None) -> dict[str, Efficiency]:
    """Fitted factors of every reference GPU (keyed by the reference's GPU name)."""
    reference = reference or load_reference()
    cached = reference_cached_tokens(reference, prefix)
    return {gpu_name: fit_gpu(gpu_name, reference, cached) for gpu_name in reference["latency_s"]}


def write_factors(fitted: dict[str, Efficiency], weight_class: WeightClass,
                  path: Path = DATA_DIR / "gpus.yaml") -> None:
    """Store `fitted` (keyed by canonical GPU name) as the `weight_class` factors in the GPU catalog,
    keeping its header comment and every other class's factors. A plain (pre-class) block becomes
    the factors of every other class."""
    text = path.read_text()
    head, _, _ = text.partition("gpus:\n")
    raw = yaml.safe_load(text)
    for name, eff in fitted.items():
        spec = raw["gpus"][name]
        current = spec.get("efficiency") or {}
        if current and set(current) <= EFFICIENCY_FIELDS:  # one block for every class
            current = {c: dict(current) for c in WEIGHT_CLASSES}
        current[weight_class] = eff.model_dump()
        spec["efficiency"] = current
    path.write_text(head + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", choices=PREFIX_MODES, default=DEFAULT_PREFIX,
                        help="what the reference engine had cached: each step's static template prefix (warm) or nothing (cold)")
    parser.add_argument("--write", action="store_true",
                        help="store the fitted factors as the w4 class in envs/data/gpus.yaml")
    args = parser.parse_args()
    reference = load_reference()
    cached = reference_cached_tokens(reference, args.prefix)
    catalog = load_catalog()
    fitted: dict[str, Efficiency] = {}
    print(f"prefix {args.prefix}: cached tokens per step {cached}")
    for gpu_name in reference["latency_s"]:
        eff = fit_gpu(gpu_name, reference, cached)
        canonical = catalog.canonical_gpu(gpu_name)
        fitted[canonical] = eff
        pred = predict(gpu_name, eff, reference, cached)
        errors = cell_errors(gpu_name, eff, reference, cached)
        worst = max(errors.values(), key=abs)
        rms = math.sqrt(sum(math.log1p(e) ** 2 for e in errors.values()) / len(errors))
        at_bound = [k for k, v, hi in zip(("compute", "memory"), (eff.compute, eff.memory), UPPER) if v >= 0.999 * hi]
        print(f"{gpu_name:8s} -> {canonical:9s} {eff.model_dump()}  worst error {worst:+.1%}  rms(log) {rms:.3f}"
              + (f"  at bound: {', '.join(at_bound)}" if at_bound else ""))
        for s, e in errors.items():
            print(f"    {s:22s} measured {reference['latency_s'][gpu_name][s]:8.3f}s  predicted {pred[s]:8.3f}s  {e:+.1%}")
    if args.write:
        write_factors(fitted, weight_class_of(REFERENCE_WEIGHT_BITS))
        print(f"wrote the {weight_class_of(REFERENCE_WEIGHT_BITS)} factors to {DATA_DIR / 'gpus.yaml'}")


if __name__ == "__main__":
    main()
