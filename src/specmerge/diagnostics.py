"""Spectral diagnostics of a merge, for one matrix parameter.

``spectral_report`` answers the questions SVC is built on: how inflated is the merged spectrum
relative to the tasks' own, how much does each task already receive along each singular
direction (s_i^r), and what does SVC do about it (γ_r). ``plot_spectrum`` draws the SVC paper's
Figure 2: singular values of the merge before and after calibration against those of each task
vector (matplotlib, from the ``bench`` extra, imported lazily).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from specmerge.linalg import thin_svd, upcast
from specmerge.methods.calibration import svc_responses


@dataclass(frozen=True)
class SpectralReport:
    sigma_merged: Tensor  # (r,) singular values of W_m, descending
    sigma_tasks: list[Tensor]  # K × (r,) singular values of each τ_i
    responses: Tensor  # (K, r) s_i^r along the left singular directions of W_m
    gamma: Tensor  # (r,) SVC's γ_r = K / Σ_i max(α, s_i^r)
    sigma_calibrated: Tensor  # (r,) γ ⊙ σ
    alpha: float

    @property
    def inflation(self) -> float:
        """σ_1(W_m) / max_i σ_1(τ_i): how far the top direction is inflated by the merge."""
        top = max(float(s[0]) for s in self.sigma_tasks)
        return float(self.sigma_merged[0]) / top if top > 0 else float("nan")

    def effective_rank(self, sigma: Tensor) -> float:
        """exp(entropy of σ/Σσ) (Roy & Vetterli, 2007)."""
        p = sigma / sigma.sum().clamp_min(1e-30)
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))

    def summary(self, top: int = 8) -> str:
        k = len(self.sigma_tasks)
        lines = [f"rank {self.sigma_merged.numel()}, K={k}, alpha={self.alpha:.4g}; "
                 f"top-direction inflation σ1(W_m)/max σ1(τ_i) = {self.inflation:.3f}; "
                 f"effective rank {self.effective_rank(self.sigma_merged):.1f} → "
                 f"{self.effective_rank(self.sigma_calibrated):.1f} after SVC",
                 " r | σ(W_m)     | γ      | σ after SVC | s_i^r per task"]
        for r in range(min(top, self.sigma_merged.numel())):
            s = " ".join(f"{float(x):7.3f}" for x in self.responses[:, r])
            lines.append(f"{r + 1:2d} | {float(self.sigma_merged[r]):10.4g} | "
                         f"{float(self.gamma[r]):6.3f} | {float(self.sigma_calibrated[r]):11.4g} |"
                         f" {s}")
        return "\n".join(lines)


def spectral_report(merged: Tensor, task_vectors: Sequence[Tensor],
                    alpha: float | None = None) -> SpectralReport:
    """Spectra and SVC quantities of one merged update W_m and its task vectors τ_i (2-D)."""
    if merged.ndim != 2:
        raise ValueError(f"spectral_report needs a 2-D matrix, got shape {tuple(merged.shape)}")
    k = len(task_vectors)
    alpha = 1.0 / k if alpha is None else alpha
    w = upcast(merged)
    u, sigma, vh = thin_svd(w)
    taus = [upcast(t).to(w.dtype) for t in task_vectors]
    s = torch.stack([svc_responses(u, sigma, vh, t) for t in taus])
    clipped = torch.where(torch.isnan(s) | torch.isneginf(s), alpha, s).clamp_min(alpha)
    gamma = k / clipped.sum(0)
    sig_tasks = [torch.linalg.svdvals(t) for t in taus]
    return SpectralReport(sigma, sig_tasks, s, gamma, gamma * sigma, alpha)


def plot_spectrum(report: SpectralReport, path: str | Path, title: str = "",
                  top: int | None = None) -> Path:
    """The SVC paper's Figure 2 for one matrix: σ of W_m before/after SVC vs each τ_i."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = report.sigma_merged.numel() if top is None else min(top, report.sigma_merged.numel())
    x = range(1, n + 1)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, s in enumerate(report.sigma_tasks):
        ax.plot(x, s[:n].cpu(), color="0.6", lw=0.8, label="task vectors τ_i" if i == 0 else None)
    ax.plot(x, report.sigma_merged[:n].cpu(), color="C3", lw=1.6, label="merge (before SVC)")
    ax.plot(x, report.sigma_calibrated[:n].cpu(), color="C0", lw=1.6, label="after SVC")
    ax.set_yscale("log")
    ax.set_xlabel("singular value index r")
    ax.set_ylabel("σ_r")
    ax.set_title(title or "singular values")
    ax.legend(frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
