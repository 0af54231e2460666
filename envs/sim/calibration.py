"""Fit the roofline's per-GPU efficiency factors to measured single-call latencies.

`python -m envs.sim.calibration [--write]` fits (compute efficiency, memory efficiency, per-
iteration overhead) of every GPU type in envs/data/reference/hexgen_stage_latency.json by least
squares on log latency ratios, prints the per-cell errors, and with --write stores the factors
in envs/data/gpus.yaml. Reference: Llama-3.1-70B, 4-bit weights, one GPU, one call at a time.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import yaml
from scipy.optimize import least_squares

from envs.sim.catalog import DATA_DIR, Efficiency, load_catalog
from envs.sim.perf import RooflineModel, solo_call_latency_s

REFERENCE_PATH = DATA_DIR / "reference" / "hexgen_stage_latency.json"
REFERENCE_MODEL = "Llama-3.1-70B"
REFERENCE_WEIGHT_BITS = 4
REFERENCE_KV_BITS = 16
REFERENCE_BATCHED_TOKENS = 8192


def load_reference(path: Path = REFERENCE_PATH) -> dict:
    with open(path) as handle:
        return json.load(handle)


def predict(gpu_name: str, eff: Efficiency, reference: dict) -> dict[str, float]:
    catalog = load_catalog()
    gpu = catalog.gpu(gpu_name).model_copy(update={"efficiency": eff})
    model = RooflineModel(gpu, catalog.model(REFERENCE_MODEL), 1, REFERENCE_WEIGHT_BITS, REFERENCE_KV_BITS)
    return {
        step: solo_call_latency_s(model, tokens["input_tokens"], tokens["output_tokens"], REFERENCE_BATCHED_TOKENS)
        for step, tokens in reference["stage_mean_tokens"].items()
    }


def fit_gpu(gpu_name: str, reference: dict) -> Efficiency:
    measured = reference["latency_s"][gpu_name]
    steps = list(measured)

    def residuals(x: np.ndarray) -> np.ndarray:
        eff = Efficiency(compute=math.exp(x[0]), memory=math.exp(x[1]), overhead_s=math.exp(x[2]))
        pred = predict(gpu_name, eff, reference)
        return np.array([math.log(pred[s] / measured[s]) for s in steps])

    result = least_squares(residuals, x0=np.log([0.8, 0.8, 0.005]), bounds=(np.log([0.05, 0.05, 1e-4]), np.log([5.0, 3.0, 0.2])))
    c, m, o = np.exp(result.x)
    return Efficiency(compute=round(float(c), 4), memory=round(float(m), 4), overhead_s=round(float(o), 5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="store the fitted factors in envs/data/gpus.yaml")
    args = parser.parse_args()
    reference = load_reference()
    fitted: dict[str, Efficiency] = {}
    for gpu_name in reference["latency_s"]:
        eff = fit_gpu(gpu_name, reference)
        canonical = load_catalog().canonical_gpu(gpu_name)
        fitted[canonical] = eff
        pred = predict(gpu_name, eff, reference)
        errors = {s: pred[s] / reference["latency_s"][gpu_name][s] - 1 for s in pred}
        worst = max(errors.values(), key=abs)
        print(f"{gpu_name:8s} -> {canonical:9s} {eff.model_dump()}  worst error {worst:+.1%}")
        for s, e in errors.items():
            print(f"    {s:22s} measured {reference['latency_s'][gpu_name][s]:8.3f}s  predicted {pred[s]:8.3f}s  {e:+.1%}")
    if args.write:
        path = DATA_DIR / "gpus.yaml"
        text = path.read_text()
        head, _, _ = text.partition("gpus:\n")
        raw = yaml.safe_load(text)
        for name, eff in fitted.items():
            raw["gpus"][name]["efficiency"] = eff.model_dump()
        path.write_text(head + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
