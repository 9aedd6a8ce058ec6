"""The analyze report sink: ``report.json``, ``heatmaps.png``, spectra PNGs and ``index.html``,
written into a hidden partial directory and renamed into place once complete."""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from specmerge._version import __version__
from specmerge.io.plots import plot_heatmaps, plot_spectrum
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
)
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
    return row


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
            v = r[key]
            grid[layers.index(r["layer"])][modules.index(r["module"])] = (
                math.nan if v is None else v)
        panels[title] = grid
    return layers, modules, panels


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else f"{x:.3g}"
    return html.escape(str(x))


def render_html(report: dict[str, Any], spectra_files: Sequence[tuple[str, str]]) -> str:
    """A self-contained page: settings, how to read it, the heat maps, the spectra, the table."""
    rec = report["recipe"]
    rows = report["matrices"]
    rules = list(rows[0]["swudi_a_ranks"]) if rows else []
    head = ["parameter", "shape", "inflation", "overlap", "γ min", "γ median", "γ max",
            "erank W_m", "erank SVC", *[f"k {r}" for r in rules], "SWUDI k", "trace share"]
    body = []
    for r in rows:
        cells = [r["name"], "×".join(map(str, r["shape"])), r["inflation"], r["overlap"],
                 r["gamma_min"], r["gamma_median"], r["gamma_max"], r["erank_before"],
                 r["erank_after"], *[r["swudi_a_ranks"][x] for x in rules], r["swudi_rank"],
                 r["swudi_trace_share"]]
        body.append("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in cells) + "</tr>")
    calib = rec.get("calibrate") or {}
    spectra = "\n".join(f'<figure><img src="{html.escape(f)}" alt="spectrum of {html.escape(n)}">'
                        f"<figcaption>{html.escape(n)}</figcaption></figure>"
                        for n, f in spectra_files)
    summary = report["summary"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>specmerge analyze: {html.escape(rec['merge_method'])}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
        padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.2em; margin-top: 1.6em; }}
code {{ background: #f2f2f2; padding: 0 .2em; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 2px 6px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; font-family: monospace; }}
th {{ background: #f6f6f6; position: sticky; top: 0; }}
img {{ max-width: 100%; }} figure {{ display: inline-block; margin: 0 1em 1em 0; }}
figure img {{ width: 540px; }}
figcaption {{ font: 12px monospace; }} .wide {{ overflow-x: auto; }}
</style></head><body>
<h1>Spectral analysis of <code>{html.escape(rec['merge_method'])}</code> over
{len(rec['models'])} experts</h1>
<p>specmerge {html.escape(report['specmerge_version'])}; {len(rows)} matrix parameters; SVC α =
{_fmt(report['alpha'])} ({'from the recipe' if calib.get('alpha') is not None else '1/K'});
SWUDI rank ratio {_fmt(report['rank_ratio'])}. The base merge is the recipe's method without its
calibration. Parameters <code>{html.escape(json.dumps(rec['parameters'], sort_keys=True))}</code>,
scope exclude <code>{html.escape(str(rec['scope']['exclude']))}</code>.</p>
<p>Median over matrices: inflation {_fmt(summary['inflation_median'])}, overlap
{_fmt(summary['overlap_median'])}, γ median {_fmt(summary['gamma_median_median'])}, effective rank
{_fmt(summary['erank_before_median'])} → {_fmt(summary['erank_after_median'])} after SVC.</p>
<h2>How to read it</h2>
<ul>
<li><b>inflation</b> σ1(W_m) / max_i σ1(τ_i): above 1, the merge's top direction is larger than any
task's own (what SVC corrects, arXiv 2602.05536).</li>
<li><b>overlap</b>: mean over task pairs of ‖U_iᵀU_j‖²/k for the top-k left singular vectors of
each τ_i, k = ⌊r/K⌋ (TSV-M's budget): 1 = shared subspace, about k/m = unrelated.</li>
<li><b>γ</b>: SVC's scale per singular direction; γ &lt; 1 shrinks an inflated direction.</li>
<li><b>effective rank</b>: exp(entropy of σ/Σσ) of W_m, before and after SVC.</li>
<li><b>k per rule</b>: the rank each SWUDI-A rule picks from the eigenvalues of
C = Σ w_i τ_iᵀτ_i; <b>trace share</b>: the part of trace C that SWUDI's top-k keeps
(arXiv 2606.07289).</li>
</ul>
<h2>Per layer</h2>
<img src="heatmaps.png" alt="heat maps of the metrics per layer and module">
<h2>Spectra (Figure 2 of the SVC paper)</h2>
{spectra}
<h2>Every matrix</h2>
<div class="wide"><table><thead><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr>
</thead><tbody>
{chr(10).join(body)}
</tbody></table></div>
<p>Data: <a href="report.json">report.json</a>.</p>
</body></html>
"""


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
            "summary": {f"{m}_median": _median([r[m] for r in rows])
                        for m in ("inflation", "overlap", "gamma_median", "erank_before",
                                  "erank_after", "swudi_trace_share")},
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
            write_text(tmp / "report.json",
                       json.dumps(_json_safe(report), indent=1, ensure_ascii=False) + "\n")
            write_text(tmp / "index.html", render_html(report, files))
        return self.out

