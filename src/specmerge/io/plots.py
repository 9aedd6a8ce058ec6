"""Pictures (PNG) of spectral diagnostics. matplotlib comes from the ``plot`` extra and is
imported only when a picture is drawn."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from specmerge.errors import SpecmergeError


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise SpecmergeError("drawing pictures needs matplotlib: pip install "
                             "'specmerge[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Fail early, before any work, when matplotlib is missing."""
    _plt()


def plot_spectrum(sigma_tasks: Sequence[Sequence[float]], sigma_merged: Sequence[float],
                  sigma_calibrated: Sequence[float], path: str | Path, title: str = "",
                  top: int | None = None) -> Path:
    """The SVC paper's Figure 2 for one matrix: σ of W_m before/after SVC vs each τ_i."""
    plt = _plt()
    n = len(sigma_merged) if top is None else min(top, len(sigma_merged))
    x = range(1, n + 1)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, s in enumerate(sigma_tasks):
        ax.plot(x, list(s)[:n], color="0.6", lw=0.8, label="task vectors τ_i" if i == 0 else None)
    ax.plot(x, list(sigma_merged)[:n], color="C3", lw=1.6, label="merge (before SVC)")
    ax.plot(x, list(sigma_calibrated)[:n], color="C0", lw=1.6, label="after SVC")
    ax.set_yscale("log")
    ax.set_xlabel("singular value index r")
    ax.set_ylabel("σ_r")
    ax.set_title(title or "singular values", fontsize=9)
    ax.legend(frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _color_range(grid: Sequence[Sequence[float]]) -> tuple[float | None, float | None]:
    """The colour scale of a panel: its finite range, widened around the value when the cells
    agree to 1e-6 relative (a shade per rounding error would read as a real difference)."""
    finite = [float(v) for row in grid for v in row if math.isfinite(v)]
    if not finite:
        return None, None
    lo, hi = min(finite), max(finite)
    if hi - lo <= 1e-6 * max(abs(lo), abs(hi), 1e-30):
        pad = 0.5 * max(abs(hi), 1e-30)
        return lo - pad, hi + pad
    return lo, hi


def plot_heatmaps(layers: Sequence[str], modules: Sequence[str],
                  panels: Mapping[str, Sequence[Sequence[float]]], path: str | Path,
                  title: str = "") -> Path:
    """One heat map per metric: rows are layers, columns module types (NaN cells blank: the
    report blanks the matrices no expert changes)."""
    plt = _plt()
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    width = max(2.2, 0.45 * len(modules) + 1.4)
    height = max(1.8, 0.28 * len(layers) + 1.4)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * width, rows * height), dpi=110,
                             squeeze=False)
    for ax, (label, grid) in zip(axes.flat, panels.items(), strict=False):
        lo, hi = _color_range(grid)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=lo,
                       vmax=hi)
        ax.set_title(label, fontsize=9)
        ax.set_yticks(range(len(layers)), labels=layers, fontsize=7)
        ax.set_xticks(range(len(modules)), labels=modules, fontsize=7, rotation=60, ha="right")
        ax.set_ylabel("layer", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03,
                     format="%.3g").ax.tick_params(labelsize=7)  # no offset on a tiny range
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_gamma_by_layer(layers: Sequence[str], gammas: Sequence[Sequence[float]],
                        path: str | Path, alpha: float, title: str = "") -> Path:
    """SVC's γ_r per layer: one box per layer over every direction of every matrix in it (box
    the quartiles, whiskers min and max, a line the median), log scale, with γ = 1 (unchanged)
    and γ = 1/α (the ceiling, a direction no task receives) marked. Empty layers are left out."""
    plt = _plt()
    from matplotlib import ticker

    kept = [(layer, list(g)) for layer, g in zip(layers, gammas, strict=True) if len(g)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(kept) + 1.6), 3.6), dpi=120)
    if kept:
        ax.boxplot([g for _, g in kept], whis=(0, 100), widths=0.6, showfliers=False,
                   medianprops={"color": "C3"})
        ax.set_xticks(range(1, len(kept) + 1), labels=[layer for layer, _ in kept], fontsize=7)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.2g"))
        ax.tick_params(axis="y", which="both", labelsize=7)
    ax.axhline(1.0, color="0.4", lw=0.8, ls="--", label="γ = 1 (unchanged)")
    ax.axhline(1.0 / alpha, color="C0", lw=0.8, ls=":", label=f"γ = 1/α = {1 / alpha:.3g}")
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel("SVC γ_r", fontsize=8)
    ax.set_title(title or "SVC's γ per layer", fontsize=9)
    ax.legend(frameon=False, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
