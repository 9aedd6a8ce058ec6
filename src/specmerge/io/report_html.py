"""The analyze report's ``index.html``: settings, how to read it, the verdict on SWUDI's
truncation, the heat maps, SVC's γ per layer, the spectra and the table of every matrix. A pure
function of ``report.json``'s content; ``io/report.py`` writes it."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import Any

LORA_PRESET = "qwen2vl-lora"  # the official SWUDI setting for LoRA experts (methods/presets.py)

GLOSSARY = (
    ("inflation", "σ1(W_m) / max_i σ1(τ_i): above 1, the merge's top direction is larger than "
                  "any task's own (what SVC corrects, arXiv 2602.05536)."),
    ("overlap", "mean over task pairs of ‖U_iᵀU_j‖²/k for the top-k left singular vectors of "
                "each τ_i (its outputs), k = ⌊r/K⌋ (TSV-M's budget) or τ_i's rank if smaller: "
                "1 = shared subspace, about k/m = unrelated."),
    ("input overlap", "the same on the top-k right singular vectors (the layer's inputs, the "
                      "rows of τ_i that WUDI's objective stands on): where tasks share inputs, "
                      "the interference solvers add their updates there."),
    ("γ", "SVC's scale per singular direction of W_m (on its numerical rank); γ &lt; 1 shrinks "
          "an inflated direction, γ = 1/α means no task receives it."),
    ("effective rank", "exp(entropy of σ/Σσ) of W_m, before and after SVC."),
    ("k per rule", "the rank each SWUDI-A rule picks from the eigenvalues of "
                   "C = Σ w_i τ_iᵀτ_i (arXiv 2606.07289)."),
    ("rank C, SWUDI k", "C's eigenvalues above rounding, and the top-k SWUDI keeps "
                        "(k = ⌊n·rank_ratio + 0.999⌋); <b>binds</b> is “no” when k &gt; rank C: "
                        "the truncation removes nothing and SWUDI is its filtered closed form "
                        "(rank C ≤ Σ r_i for LoRA experts)."),
    ("trace share", "the part of trace C that SWUDI's top-k keeps."),
    ("‖W_m‖/‖TA‖", "the merged update's Frobenius norm over task arithmetic's, λ Σ τ_i at its "
                   "default λ: well above 1, the merge delivers the tasks at more than task "
                   "arithmetic's strength."),
    ("auto scale", "the factor specmerge's data-free rule <code>scaling: auto</code> (ours, not "
                   "the papers') would multiply W_m by: the s ∈ [0, 1] that brings s·W_m "
                   "closest to every task's own update (1/K for orthogonal equal tasks summed)."),
)


def fmt(x: Any) -> str:
    if isinstance(x, bool):
        return "no" if x else "yes"  # the flag is "cannot bind": show whether it binds
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else f"{x:.3g}"
    if x is None:
        return "–"
    return html.escape(str(x))


def truncation_verdict(summary: dict[str, Any], rank_ratio: float) -> str:
    """One paragraph when most touched matrices have k > rank C; '' otherwise."""
    unbound, touched = summary["cannot_bind"], summary["touched"]
    if touched == 0 or 2 * unbound <= touched:
        return ""
    return (f"<p><b>Will the truncation bind?</b> No: in {unbound} of {touched} matrices "
            f"SWUDI's k at rank_ratio {fmt(rank_ratio)} (median "
            f"{fmt(summary['swudi_rank_median'])}) exceeds rank C (median "
            f"{fmt(summary['rank_c_median'])}), so the truncation removes nothing: SWUDI is its "
            f"filtered closed form, which delivers every task at full strength on its own "
            f"inputs. For SWUDI on low-rank (LoRA) experts use the official LoRA setting, "
            f"<code>parameters: {{preset: {LORA_PRESET}}}</code> (docs/presets.md), or "
            f"specmerge's data-free <code>scaling: auto</code>. This merge: median ‖W_m‖/‖TA‖ "
            f"{fmt(summary['norm_ratio_ta_median'])}; <code>scaling: auto</code> would multiply "
            f"it by {fmt(summary['auto_scale_median'])} (median).</p>")


def _table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    rules = list(rows[0]["swudi_a_ranks"]) if rows else []
    head = ["parameter", "shape", "inflation", "overlap", "input overlap", "γ min", "γ median",
            "γ max", "erank W_m", "erank SVC", *[f"k {r}" for r in rules], "rank C", "SWUDI k",
            "binds", "trace share", "‖W_m‖/‖TA‖", "auto scale"]
    body = []
    for r in rows:
        cells = [r["name"], "×".join(map(str, r["shape"])), r["inflation"], r["overlap"],
                 r["input_overlap"], r["gamma_min"], r["gamma_median"], r["gamma_max"],
                 r["erank_before"], r["erank_after"], *[r["swudi_a_ranks"][x] for x in rules],
                 r["rank_c"], r["swudi_rank"], r["truncation_cannot_bind"],
                 r["swudi_trace_share"], r["norm_ratio_ta"], r["auto_scale"]]
        body.append("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in cells) + "</tr>")
    return head, body


STYLE = """body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
        padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
code { background: #f2f2f2; padding: 0 .2em; }
table { border-collapse: collapse; font-size: 12px; }
td, th { border-bottom: 1px solid #ddd; padding: 2px 6px; text-align: right; }
td:first-child, th:first-child { text-align: left; font-family: monospace; }
th { background: #f6f6f6; position: sticky; top: 0; }
img { max-width: 100%; } figure { display: inline-block; margin: 0 1em 1em 0; }
figure img { width: 540px; }
figcaption { font: 12px monospace; } .wide { overflow-x: auto; }"""


def render_html(report: dict[str, Any], spectra_files: Sequence[tuple[str, str]],
                gamma_file: str) -> str:
    """A self-contained page: settings, how to read it, the heat maps, γ, spectra, the table."""
    rec = report["recipe"]
    rows = report["matrices"]
    head, body = _table(rows)
    calib = rec.get("calibrate") or {}
    spectra = "\n".join(f'<figure><img src="{html.escape(f)}" alt="spectrum of {html.escape(n)}">'
                        f"<figcaption>{html.escape(n)}</figcaption></figure>"
                        for n, f in spectra_files)
    s = report["summary"]
    untouched = len(rows) - s["touched"]
    skipped = (f" {untouched} matrices no expert changes (τ_i = 0, e.g. modules no adapter "
               f"targets) are listed but left out of the medians." if untouched else "")
    glossary = "\n".join(f"<li><b>{name}</b>: {text}</li>" for name, text in GLOSSARY)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>specmerge analyze: {html.escape(rec['merge_method'])}</title>
<style>
{STYLE}
</style></head><body>
<h1>Spectral analysis of <code>{html.escape(rec['merge_method'])}</code> over
{len(rec['models'])} experts</h1>
<p>specmerge {html.escape(report['specmerge_version'])}; {len(rows)} matrix parameters; SVC α =
{fmt(report['alpha'])} ({'from the recipe' if calib.get('alpha') is not None else '1/K'});
SWUDI rank ratio {fmt(report['rank_ratio'])}. The base merge is the recipe's method without its
calibration. Parameters <code>{html.escape(json.dumps(rec['parameters'], sort_keys=True))}</code>,
scope exclude <code>{html.escape(str(rec['scope']['exclude']))}</code>.</p>
<p>Median over the {s['touched']} matrices the experts change: inflation
{fmt(s['inflation_median'])}, overlap
{fmt(s['overlap_median'])}, input overlap {fmt(s['input_overlap_median'])}, γ median
{fmt(s['gamma_median_median'])}, effective rank {fmt(s['erank_before_median'])} →
{fmt(s['erank_after_median'])} after SVC, rank C {fmt(s['rank_c_median'])} against SWUDI's k
{fmt(s['swudi_rank_median'])} (k &gt; rank C in {s['cannot_bind']} of {s['touched']}),
‖W_m‖/‖TA‖ {fmt(s['norm_ratio_ta_median'])}, auto scale {fmt(s['auto_scale_median'])}.{skipped}</p>
{truncation_verdict(s, report['rank_ratio'])}
<h2>How to read it</h2>
<ul>
{glossary}
</ul>
<h2>Per layer</h2>
<img src="heatmaps.png" alt="heat maps of the metrics per layer and module">
<h2>SVC's γ per layer</h2>
<p>Every γ_r of every matrix in the layer (on W_m's numerical rank): box the quartiles, whiskers
the extremes.</p>
<img src="{html.escape(gamma_file)}" alt="SVC's γ per layer">
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
