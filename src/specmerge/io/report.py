"""The analyze report sink: ``report.json``, ``heatmaps.png``, ``gamma.png``, spectra PNGs and
``index.html`` (``io/report_html.py``), written into a hidden partial directory and renamed into
place once complete; ``summary_lines`` and ``read_summary`` for the CLI's echo."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from specmerge._version import __version__
from specmerge.io.plots import plot_gamma_by_layer, plot_heatmaps, plot_spectrum
from specmerge.io.report_html import LORA_PRESET, render_html
from specmerge.io.sinks import CollectingSink
from specmerge.io.writer import Identity, atomic_output_dir, write_text
from specmerge.plan import Plan

LAYER = re.compile(r"\.(\d+)\.")
# (JSON key, heat-map title) of the metrics drawn per layer
PANELS = (
    ("inflation", "inflation σ1(W_m)/max σ1(τ_i)"),
    ("overlap", "task subspace overlap"),
    ("gamma_min", "SVC γ min"),
    ("gamma_median", "SVC γ median"),
    ("erank_before", "effective rank of W_m"),
    ("erank_after", "effective rank after SVC"),
    ("swudi_a_rank_fraction", "SWUDI-A k / n (participation_sqrt)"),
    ("swudi_trace_share", "trace share kept by SWUDI's top-k"),
    ("rank_c_over_k", "rank C / SWUDI k (< 1: cannot bind)"),
    ("input_overlap", "task input-space overlap"),
    ("norm_ratio_ta", "‖W_m‖ / ‖task arithmetic‖"),
    ("auto_scale", "scale of scaling: auto"),
)
# the metrics whose median over the touched matrices the summary gives
MEDIANS = ("inflation", "overlap", "input_overlap", "gamma_median", "erank_before",
           "erank_after", "swudi_trace_share", "rank_c", "swudi_rank", "norm_ratio_ta",
           "auto_scale")
GAMMA_FILE = "gamma.png"
DEFAULT_RULE = "participation_sqrt"


def layer_and_module(name: str) -> tuple[str, str]:
    """'model.layers.3.mlp.up_proj.weight' → ('3', 'mlp.up_proj'); no layer number → '-'."""
    m = LAYER.search(name)
    short = name.removesuffix(".weight")
    if m is None:
        return "-", short
    return m.group(1), short[m.end():]


def matrix_row(a: Any) -> dict[str, Any]:
    layer, module = layer_and_module(a.name)
    row = {"name": a.name, "shape": list(a.shape), "layer": layer, "module": module,
           **asdict(a.metrics)}
    row["swudi_a_rank_fraction"] = a.metrics.swudi_a_ranks[DEFAULT_RULE] / a.metrics.n
    row["rank_c_over_k"] = a.metrics.rank_c / a.metrics.swudi_rank
    return row


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the matrices some expert changes (rank C > 0), and how many of them have
    k > rank C (SWUDI's truncation cannot bind)."""
    touched = [r for r in rows if r["rank_c"] > 0]
    out: dict[str, Any] = {f"{m}_median": _median([r[m] for r in touched]) for m in MEDIANS}
    out["touched"] = len(touched)
    out["cannot_bind"] = sum(1 for r in touched if r["truncation_cannot_bind"])
    return out


def summary_lines(summary: dict[str, Any], rank_ratio: float) -> list[str]:
    """The summary as the CLI echoes it, with the hint when most truncations cannot bind."""
    def f(key: str) -> str:
        x = summary.get(key)
        return "–" if x is None or not math.isfinite(x) else f"{x:.3g}"

    lines = [f"median over {summary['touched']} changed matrices: inflation "
             f"{f('inflation_median')}, overlap {f('overlap_median')} (inputs "
             f"{f('input_overlap_median')}), SVC γ median {f('gamma_median_median')}, "
             f"‖W_m‖/‖TA‖ {f('norm_ratio_ta_median')}, auto scale {f('auto_scale_median')}",
             f"SWUDI at rank_ratio {rank_ratio:g}: k {f('swudi_rank_median')} against rank C "
             f"{f('rank_c_median')}; k > rank C in {summary['cannot_bind']} of "
             f"{summary['touched']}"]
    if summary["touched"] and 2 * summary["cannot_bind"] > summary["touched"]:
        lines.append(f"SWUDI's truncation cannot bind in most matrices: for SWUDI on these "
                     f"experts use parameters: {{preset: {LORA_PRESET}}} or scaling: auto")
    return lines


def read_summary(out: Path) -> tuple[dict[str, Any], float]:
    """The summary and rank ratio of a written report directory."""
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return report["summary"], report["rank_ratio"]


def gamma_by_layer(layers: Sequence[str], rows: Sequence[dict[str, Any]],
                   analyses: Sequence[Any]) -> list[list[float]]:
    """Every γ_r of every matrix, pooled per layer, in the order of ``layers``."""
    pooled: dict[str, list[float]] = {layer: [] for layer in layers}
    for r, a in zip(rows, analyses, strict=True):
        pooled[r["layer"]].extend(a.gamma)
    return [pooled[layer] for layer in layers]


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _grids(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str], dict[str, Any]]:
    layers = sorted({r["layer"] for r in rows}, key=lambda x: (x == "-", int(x) if x != "-" else 0))
    modules = list(dict.fromkeys(r["module"] for r in rows))
    panels = {}
    for key, title in PANELS:
        grid = [[math.nan] * len(modules) for _ in layers]
        for r in rows:
            v = r[key] if r["rank_c"] > 0 else None  # no expert changes it: blank
            grid[layers.index(r["layer"])][modules.index(r["module"])] = (
                math.nan if v is None else v)
        panels[title] = grid
    return layers, modules, panels


def _median(xs: Sequence[float]) -> float:
    xs = sorted(x for x in xs if x is not None and math.isfinite(x))
    if not xs:
        return math.nan
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


class ReportSink(CollectingSink):
    """Collects one ``MatrixAnalysis`` per matrix; ``finish`` writes the report directory."""

    def __init__(self, out: Path, plan: Plan, *, spectra: Sequence[str], alpha: float | None,
                 rank_ratio: float, replace: Identity | None = None):
        super().__init__(plan)
        self.out, self.replace = out, replace
        self.spectra, self.alpha, self.rank_ratio = list(spectra), alpha, rank_ratio

    def _spectra_names(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        if self.spectra:
            return self.spectra
        ranked = sorted((r for r in rows if r["inflation"] is not None
                         and math.isfinite(r["inflation"])), key=lambda r: r["inflation"])
        return list(dict.fromkeys([ranked[-1]["name"], ranked[0]["name"]])) if ranked else []

    def finish(self) -> Path:
        ordered = list(self.ordered().values())
        rows = [matrix_row(a) for a in ordered]
        k = self.plan.recipe.num_experts
        report = {
            "specmerge_version": __version__,
            "recipe": self.plan.recipe.resolved(),
            "alpha": 1.0 / k if self.alpha is None else self.alpha,
            "rank_ratio": self.rank_ratio,
            "summary": summarize(rows),
            "matrices": rows,
        }
        names = self._spectra_names(rows)
        by_name = {a.name: a for a in ordered}
        report["spectra"] = {n: {"tasks": by_name[n].sigma_tasks,
                                 "merged": by_name[n].sigma_merged,
                                 "calibrated": by_name[n].sigma_calibrated} for n in names}
        with atomic_output_dir(self.out, self.replace) as tmp:
            layers, modules, panels = _grids(rows)
            plot_heatmaps(layers, modules, panels, tmp / "heatmaps.png",
                          title=f"{self.plan.recipe.merge_method}, K = {k}")
            files = []
            for i, n in enumerate(names):
                a = by_name[n]
                f = f"spectrum_{i + 1}.png"
                plot_spectrum(a.sigma_tasks, a.sigma_merged, a.sigma_calibrated, tmp / f,
                              title=f"{n} (inflation {a.metrics.inflation:.2f})")
                files.append((n, f))
            plot_gamma_by_layer(layers, gamma_by_layer(layers, rows, ordered),
                                tmp / GAMMA_FILE, report["alpha"],
                                title=f"SVC γ per layer (α = {report['alpha']:.3g})")
            write_text(tmp / "report.json",
                       json.dumps(_json_safe(report), indent=1, ensure_ascii=False) + "\n")
            write_text(tmp / "index.html", render_html(report, files, GAMMA_FILE))
        return self.out

