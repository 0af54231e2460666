"""Benchmark figures (matplotlib, Agg, PNG): the paper's attainment-vs-SLO-scale figure, attainment
and p95 latency vs arrival rate, and the two headline ratios against rr."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from heuristics.bench import nearest


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(summary: list[dict[str, Any]], policy: str, x_key: str, fixed_key: str, fixed: float,
            y_key: str) -> tuple[list[float], list[float]]:
    rows = sorted((r for r in summary if r["policy"] == policy and r[fixed_key] == fixed), key=lambda r: r[x_key])
    return [r[x_key] for r in rows], [r[y_key] for r in rows]


def make_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    cfg = results["config"]
    summary = results["summary"]
    policies = cfg["policies"]
    rate = nearest(cfg["rates_qps"], cfg["ratio_rate_qps"])
    scale = nearest(cfg["slo_scales"], cfg["ratio_slo_scale"])
    where = f"{cfg['trace']} on {cfg['cluster']}"
    paths: list[Path] = []
    target = cfg["target_attainment"]

    def save(fig: Any, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    figures = [
        ("attainment_vs_slo_scale.png", "slo_scale", "rate_qps", rate, "slo_attainment", "SLO scale",
         "SLO attainment", f"SLO attainment vs SLO scale at {rate:g} q/s ({where})"),
        ("attainment_vs_rate.png", "rate_qps", "slo_scale", scale, "slo_attainment", "arrival rate (queries/s)",
         "SLO attainment", f"SLO attainment vs arrival rate at SLO scale {scale:g} ({where})"),
        ("p95_latency_vs_rate.png", "rate_qps", "slo_scale", scale, "latency_p95_s", "arrival rate (queries/s)",
         "p95 query latency (s)", f"p95 latency vs arrival rate ({where})"),
    ]
    for name, x_key, fixed_key, fixed, y_key, xlabel, ylabel, title in figures:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for policy in policies:
            xs, ys = _series(summary, policy, x_key, fixed_key, fixed, y_key)
            style = "-" if policy in ("rr", "hexgen") else "--"
            ax.plot(xs, ys, style, marker="o", ms=4, label=policy, lw=2.2 if policy in ("rr", "hexgen") else 1.2)
        if y_key == "slo_attainment":
            ax.axhline(target, color="grey", lw=0.8, ls=":")
            ax.set_ylim(-0.02, 1.02)
        else:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        save(fig, name)

    ratios = results.get("ratios_vs_rr") or {}
    if ratios:
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        names = [p for p in policies if p in ratios]
        width = 0.38
        for k, (key, label) in enumerate((("deadline_ratio", f"deadline ratio @ {cfg['ratio_rate_qps']:.3g} q/s"),
                                          ("goodput_ratio", f"goodput ratio @ SLO x{cfg['ratio_slo_scale']:g}"))):
            vals = [ratios[n][key] for n in names]
            shown = [v if v is not None and math.isfinite(v) else 0.0 for v in vals]
            xs = [i + (k - 0.5) * width for i in range(len(names))]
            bars = ax.bar(xs, shown, width, label=label)
            for bar, v in zip(bars, vals):
                text = "n/a" if v is None else ("inf" if math.isinf(v) else f"{v:.2f}")
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("x vs rr")
        ax.set_title(f"Headline ratios vs rr ({where})", fontsize=10)
        ax.legend(fontsize=8)
        save(fig, "ratios_vs_rr.png")
    return paths
