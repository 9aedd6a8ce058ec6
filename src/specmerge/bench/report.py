"""Rendering of a text8 results dictionary: results.json, a Markdown table and PNG plots.

matplotlib is imported inside the plotting functions, with the Agg backend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from specmerge.io.writer import atomic_write_text

from .mergekit_rows import LABELS as MERGEKIT_LABELS
from .runner import EXPERTS, FULL_EXPERTS, ZERO_SHOT

LABELS = {
    ZERO_SHOT: "zero-shot", EXPERTS: "individual experts",
    "weight_average": "weight average", "task_arithmetic": "task arithmetic (λ=0.3)",
    "ties": "TIES", "dare": "DARE", "tsv_m": "TSV-M", "iso_c": "Iso-C", "iso_cts": "Iso-CTS",
    "star": "STAR", "wudi": "WUDI", "wudi_closed_form": "WUDI closed form", "swudi": "SWUDI",
    "swudi_a": "SWUDI-A",
    "task_arithmetic@val": "task arithmetic, λ on validation",
    "ties@val": "TIES, λ on validation",
    "tsv_m+svc_a1": "TSV-M + SVC (α=1, official for TSV-M)",
    "swudi_lora": "SWUDI, Qwen2-VL LoRA preset", "swudi_a_lora": "SWUDI-A, Qwen2-VL LoRA preset",
    "wudi_lora": "WUDI, Qwen2-VL LoRA preset", "swudi_auto": "SWUDI, scaling auto",
    "swudi_a_auto": "SWUDI-A, scaling auto", "wudi_closed_form_auto": "WUDI closed form, "
    "scaling auto", "wudi_auto": "WUDI, scaling auto", "ties_core": "TIES in Core Space",
    "tsv_m_core": "TSV-M in Core Space", "iso_c_core": "Iso-C in Core Space",
    "ties_knots": "TIES in KnOTS space", "tsv_m_knots": "TSV-M in KnOTS space",
    "iso_c_knots": "Iso-C in KnOTS space",
    FULL_EXPERTS: "full fine-tuned experts (reference)",
    "peft_svd": "PEFT svd (rank 8)", "peft_linear": "PEFT linear", "peft_cat": "PEFT cat",
    "peft_ties": "PEFT ties (density 0.2)", "peft_dare_ties": "PEFT dare_ties (density 0.2)",
    **MERGEKIT_LABELS,
}
TASK_ABBR = {"tweet_emotion": "tw_emo", "tweet_offensive": "tw_off", "tweet_irony": "tw_iro",
             "banking77": "bank77"}


def label(row: str) -> str:
    if row.endswith("+svc@alpha"):
        return f"{LABELS.get(row[:-10], row[:-10])} + SVC, α on validation"
    if row.endswith("+svc"):
        return f"{LABELS.get(row[:-4], row[:-4])} + SVC"
    if row.endswith("@val") and row not in LABELS:
        what = "weight λ" if row.startswith("peft_") else "λ"
        return f"{LABELS.get(row[:-4], row[:-4])}, {what} on validation"
    return LABELS.get(row, row)


def write_json(results: dict, path: Path) -> Path:
    return atomic_write_text(path, json.dumps(results, indent=1, ensure_ascii=False))


def _fmt(x: float | None, nd: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _with_seeds(mean: float, per_seed: list[float]) -> str:
    if len(per_seed) <= 1:
        return _fmt(mean)
    return f"{_fmt(mean)} ({', '.join(_fmt(v) for v in per_seed)})"


def markdown_table(results: dict) -> str:
    """One row per method: per-task accuracy (mean over seeds), average and normalised accuracy
    (mean, then each seed's value in parentheses), and merge time."""
    tasks = [t["name"] for t in results["tasks"]]
    metrics = sorted({m for r in results["rows"] for m in r.get("metrics", {})})
    head = (["method"] + [TASK_ABBR.get(t, t) for t in tasks]
            + ["avg", "normalised"] + metrics + ["merge s"])
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in results["rows"]:
        name = label(r["name"])
        if "lambda" in r:
            sym = "α" if r["name"].endswith("@alpha") else "λ"
            name += f" ({sym}={', '.join(f'{v:g}' for v in r['lambda'])})"
        if r.get("seeds") is not None:
            name += f" (seed {', '.join(str(x) for x in r['seeds'])} only)"
        if r.get("errors"):
            name += " (failed: see results.json)"
        cells = [name] + [_fmt(r["acc"][t]) for t in tasks]
        cells += [_with_seeds(r["avg"], r["avg_per_seed"]),
                  _with_seeds(r["norm"], r["norm_per_seed"])]
        cells += [_fmt(r.get("metrics", {}).get(m), 2) for m in metrics]
        cells += [_fmt(r.get("merge_s"), 1) if "merge_s" in r else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def svc_deltas(results: dict) -> list[tuple[str, float, float, float, float]]:
    """(method, avg, avg with SVC, normalised, normalised with SVC) for each base method run
    both ways."""
    by = {r["name"]: r for r in results["rows"]}
    out = []
    for r in results["rows"]:
        n = r["name"]
        if n + "+svc" in by:
            s = by[n + "+svc"]
            out.append((n, r["avg"], s["avg"], r["norm"], s["norm"]))
    return out


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(results: dict, path: Path) -> Path:
    """Normalised accuracy per base method, without and with SVC."""
    plt = _plt()
    by = {r["name"]: r for r in results["rows"]}
    bases = [r["name"] for r in results["rows"]
             if r["name"] not in (ZERO_SHOT, EXPERTS, FULL_EXPERTS) and "+svc" not in r["name"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(bases) + 2), 4.2))
    xs = range(len(bases))
    w = 0.38
    plain = [by[b]["norm"] for b in bases]
    cal = [by[b + "+svc"]["norm"] if b + "+svc" in by else math.nan for b in bases]
    ax.bar([x - w / 2 for x in xs], plain, w, label="method", color="#8da0cb")
    ax.bar([x + w / 2 for x in xs], cal, w, label="method + SVC", color="#fc8d62")
    if ZERO_SHOT in by:
        ax.axhline(by[ZERO_SHOT]["norm"], color="grey", ls=":", lw=1, label="zero-shot")
    ax.axhline(100, color="black", lw=0.8, label="experts (100)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([label(b) for b in bases], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("normalised accuracy (%)")
    vals = [v for v in plain + cal if not math.isnan(v)]
    lo = min(vals + [by[ZERO_SHOT]["norm"]] if ZERO_SHOT in by else vals)
    ax.set_ylim(max(0, lo - 5), max(102, max(vals, default=100) + 3))  # merges can beat experts
    kind = ", LoRA experts" if results["protocol"].get("lora") else ""
    ax.set_title(f"{results.get('benchmark', 'text8')}{kind}: normalised accuracy ({len(results['tasks'])} tasks, "
                 f"{results['protocol']['seeds']} seed(s))")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def plot_spectra(results: dict, path: Path) -> Path | None:
    """Figure 2 of the SVC paper: singular values of the task-arithmetic update before and after
    SVC, against those of the individual task vectors, for one attention and one MLP matrix."""
    spec = results.get("spectra") or {}
    if not spec:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(spec), figsize=(6 * len(spec), 4.2), squeeze=False)
    for ax, (name, curves) in zip(axes[0], spec.items(), strict=True):
        for lab, sv in curves.items():
            k = min(len(sv), 64)
            if lab.startswith("τ_"):
                ax.plot(range(1, k + 1), sv[:k], color="grey", alpha=0.45, lw=1,
                        label="individual τ_i" if lab == next(
                            x for x in curves if x.startswith("τ_")) else None)
            else:
                ax.plot(range(1, k + 1), sv[:k], lw=2, label=label(lab))
        ax.set_yscale("log")
        ax.set_xlabel("index r")
        ax.set_ylabel("singular value σ_r")
        short = name.replace("encoder.layer.", "L").replace(".weight", "")
        ax.set_title(short, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Singular values of the merged update: task arithmetic before and after SVC")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def plot_heatmap(results: dict, path: Path) -> Path:
    """Task × method accuracy, normalised by the expert of each task (%)."""
    plt = _plt()
    import numpy as np

    tasks = [t["name"] for t in results["tasks"]]
    rows = results["rows"]
    ex = next(r for r in rows if r["name"] == EXPERTS)["acc"]
    data = np.array([[100 * r["acc"][t] / ex[t] if ex[t] else np.nan for t in tasks]
                     for r in rows])
    fig, ax = plt.subplots(figsize=(1.0 * len(tasks) + 4, 0.33 * len(rows) + 1.5))
    im = ax.imshow(data, cmap="viridis", aspect="auto", vmin=max(0, np.nanmin(data)), vmax=100)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([TASK_ABBR.get(t, t) for t in tasks], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label(r["name"]) for r in rows], fontsize=8)
    for i in range(len(rows)):
        for j in range(len(tasks)):
            ax.text(j, i, f"{rows[i]['acc'][tasks[j]]:.0f}", ha="center", va="center",
                    fontsize=6.5, color="white" if data[i, j] < 80 else "black")
    fig.colorbar(im, ax=ax, label="accuracy ÷ expert accuracy (%)")
    ax.set_title(f"{results.get('benchmark', 'text8')}: accuracy per task (numbers) and relative to the expert (colour)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def markdown_report(results: dict, prefix: str = "text8", json_name: str = "results.json"
                    ) -> str:
    """A self-contained Markdown report: protocol, table, SVC and WUDI-family comparisons,
    λ sweeps, timings, versions and the plots (by relative file name)."""
    p = results["protocol"]
    by = {r["name"]: r for r in results["rows"]}
    tasks = results["tasks"]
    n_test = sum(x["n_test"] for x in tasks)
    cap = (f"a seeded subsample of at most {p['test_cap']} test examples per task"
           if p.get("test_cap") else "the full test sets")
    tr = p["train"]
    lora = p.get("lora")
    trained = ("encoder layers trained, embeddings frozen" if not lora else
               f"PEFT LoRA adapters, r = {lora['r']}, α = {lora['alpha']} (scale α/r = "
               f"{lora['alpha'] / lora['r']:g}), dropout {lora['dropout']:g}, on "
               f"{', '.join(lora['targets'])} of every encoder layer, everything else frozen")
    lines = [
        f"# text8: {p['model']} × {len(tasks)} text tasks"
        + (", LoRA experts" if lora else ""),
        "",
        f"Experts fine-tuned from {p['model']} (sha256 `{p['model_sha256'][:16]}…`) with frozen "
        f"CLIP-style prompt heads (logits = {p['head_scale']:g} · cos), merged by each method "
        "through `specmerge.merge` with the recipes in `examples/text8/`"
        + (" (the adapter directories are the recipes' `models`)." if lora else "."),
        "",
        f"- Experts: {trained}; AdamW lr {tr['lr']:g}, "
        f"weight decay {tr['weight_decay']:g}, batch {tr['batch_size']}, {tr['warmup']:.0%} "
        f"warm-up then linear decay, {tr['epochs']} epochs over ≤ {tr['max_train']} examples"
        + (f" (capped at {tr['max_steps']} steps)" if tr.get("max_steps") else "")
        + f", max_length {tr['max_length']}.",
        f"- Evaluation: {cap} ({n_test} sentences per model), {p['seeds']} seed(s). "
        "Normalised accuracy = mean over tasks of accuracy ÷ the task's expert accuracy.",
        f"- λ sweeps: λ ∈ {{{', '.join(f'{x:g}' for x in p['lambdas'])}}}, chosen on "
        f"validation (the task's own split, or a seeded 10% of its training data held out of "
        f"every expert's training), at most {p['val_cap']} validation examples per task.",
        "",
        "## Results",
        "",
        "Accuracy (%) per task (mean over seeds); *avg* and *normalised* give the mean, then each "
        "seed's value. *merge s* is the wall time of `specmerge.merge` (for the sweeps: of one "
        "merge).",
        "",
        markdown_table(results),
        "",
    ]
    deltas = svc_deltas(results)
    if deltas:
        lines += ["## Does SVC help?", "",
                  "| method | avg | avg + SVC | Δ | normalised | normalised + SVC | Δ |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for n, a, a2, z, z2 in deltas:
            lines.append(f"| {label(n)} | {a:.1f} | {a2:.1f} | {a2 - a:+.1f} | {z:.1f} | "
                         f"{z2:.1f} | {z2 - z:+.1f} |")
        lines.append("")
    fam = [n for n in ("wudi", "wudi_closed_form", "swudi", "swudi_a") if n in by]
    if len(fam) > 1:
        lines += ["## The WUDI family", "",
                  "| method | avg | normalised | merge s |", "|---|---:|---:|---:|"]
        for n in fam:
            r = by[n]
            lines.append(f"| {label(n)} | {r['avg']:.1f} | {r['norm']:.1f} | "
                         f"{_fmt(r.get('merge_s'))} |")
        lines.append("")
    lines += sweeps_section(results) + plots_section(results, prefix)
    lines += run_section(results, json_name)
    return "\n".join(lines)


def sweeps_section(results: dict) -> list[str]:
    """The λ and α sweeps on validation: the value each seed chose and the curve."""
    sw = results.get("sweeps") or {}
    if not sw:
        return []
    lines = ["## λ and α sweeps on validation", ""]
    for row, seeds in sw.items():
        sym = "α" if row.endswith("@alpha") else "λ"
        for s in seeds:
            curve = ", ".join(f"{c['lambda']:g}: {c['val_avg']:.1f}" for c in s["curve"])
            lines.append(f"- {label(row)}, seed {s['seed']}: chose {sym} = {s['lambda']:g} "
                         f"(mean validation accuracy {curve})")
    return lines + [""]


def plots_section(results: dict, prefix: str) -> list[str]:
    lines = ["## Plots", "", f"![normalised accuracy]({prefix}_normalised.png)", "",
             f"![task × method]({prefix}_heatmap.png)", ""]
    if results.get("spectra"):
        lines += [f"![SVC spectra]({prefix}_svc_spectra.png)", ""]
    return lines


def run_section(results: dict, json_name: str) -> list[str]:
    """Compute time, versions and where the numbers are."""
    t, v = results["timings"], results["versions"]
    return ["## Run", "",
            f"- Compute, summed over everything this report holds: expert training "
            f"{t['experts_train_s'] / 60:.1f} min (summed over experts); merging and "
            f"evaluating the rows {t.get('rows_compute_s', 0) / 60:.1f} min (summed over "
            "rows). Cached experts and rows count here even when an earlier invocation "
            f"computed them; the invocation that wrote this report took "
            f"{t['total_s'] / 60:.1f} min, {t['experts_wall_s'] / 60:.1f} of it training.",
            f"- specmerge {v['specmerge']}, torch {v['torch']}, transformers "
            f"{v['transformers']}, Python {v['python']}, {v['threads']} torch thread(s), "
            f"{v['platform']}.",
            f"- Every number, the protocol and the per-seed values are in `{json_name}`.", ""]


def write_all(results: dict, out: Path, prefix: str = "text8",
              render: Callable[..., str] | None = None) -> dict[str, Path]:
    """results.json, table.md, report.md (``render``: text8's by default) and the three plots
    under ``out``."""
    render = render or markdown_report
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": write_json(results, out / "results.json")}
    table = markdown_table(results)
    files["table"] = atomic_write_text(out / "table.md", table + "\n")
    if "versions" in results:
        files["report"] = atomic_write_text(out / "report.md", render(results, prefix))
    files["bars"] = plot_bars(results, out / f"{prefix}_normalised.png")
    files["heatmap"] = plot_heatmap(results, out / f"{prefix}_heatmap.png")
    sp = plot_spectra(results, out / f"{prefix}_svc_spectra.png")
    if sp is not None:
        files["spectra"] = sp
    return files


def write_doc(results: dict, md_path: Path, notes: str = "",
              render: Callable[..., str] | None = None) -> list[Path]:
    """A Markdown report at ``md_path`` with its plots and results JSON next to it, named after
    its stem (``docs/results/text8.md`` → ``text8_normalised.png``, ``text8_results.json``…)."""
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    prefix = md_path.stem
    files = [write_json(results, md_path.with_name(f"{prefix}_results.json")),
             plot_bars(results, md_path.with_name(f"{prefix}_normalised.png")),
             plot_heatmap(results, md_path.with_name(f"{prefix}_heatmap.png"))]
    sp = plot_spectra(results, md_path.with_name(f"{prefix}_svc_spectra.png"))
    if sp is not None:
        files.append(sp)
    text = (render or markdown_report)(results, prefix, f"{prefix}_results.json")
    if notes:
        head, _, rest = text.partition("\n## Results")
        text = f"{head}\n{notes.strip()}\n\n## Results{rest}"
    atomic_write_text(md_path, text)
    return [md_path, *files]
