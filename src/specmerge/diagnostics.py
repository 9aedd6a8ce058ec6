"""Spectral diagnostics of a merge, for one matrix parameter (pure maths, no files).

``spectral_report`` answers the questions SVC is built on: how inflated is the merged spectrum
relative to the tasks' own, how much does each task already receive along each singular
direction (s_i^r), and what does SVC do about it (γ_r). ``matrix_metrics`` adds what SWUDI reads
from the same matrix: how much the tasks' top subspaces overlap, the rank each SWUDI-A rule
would pick, and the share of C's trace that SWUDI's top-k keeps. ``specmerge analyze`` runs
``matrix_metrics`` on every matrix parameter; the pictures are drawn by ``specmerge.io.plots``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specmerge.linalg import thin_svd, upcast
from specmerge.methods.calibration import svc_responses
from specmerge.methods.interference import (
    RANK_RULES,
    eigen,
    interference_gram,
    prepare,
    select_rank,
    swudi_rank,
)
from specmerge.methods.subspace import tsv_rank


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

    def summary(self, top: int = 8) -> str:
        k = len(self.sigma_tasks)
        lines = [f"rank {self.sigma_merged.numel()}, K={k}, alpha={self.alpha:.4g}; "
                 f"top-direction inflation σ1(W_m)/max σ1(τ_i) = {self.inflation:.3f}; "
                 f"effective rank {effective_rank(self.sigma_merged):.1f} → "
                 f"{effective_rank(self.sigma_calibrated):.1f} after SVC",
                 " r | σ(W_m)     | γ      | σ after SVC | s_i^r per task"]
        for r in range(min(top, self.sigma_merged.numel())):
            s = " ".join(f"{float(x):7.3f}" for x in self.responses[:, r])
            lines.append(f"{r + 1:2d} | {float(self.sigma_merged[r]):10.4g} | "
                         f"{float(self.gamma[r]):6.3f} | {float(self.sigma_calibrated[r]):11.4g} |"
                         f" {s}")
        return "\n".join(lines)


def effective_rank(sigma: Tensor) -> float:
    """exp(entropy of σ/Σσ) (Roy & Vetterli, 2007)."""
    p = sigma / sigma.sum().clamp_min(1e-30)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def spectral_report(merged: Tensor, task_vectors: Sequence[Tensor],
                    alpha: float | None = None,
                    sigma_tasks: Sequence[Tensor] | None = None) -> SpectralReport:
    """Spectra and SVC quantities of one merged update W_m and its task vectors τ_i (2-D).

    ``sigma_tasks`` passes the τ_i's singular values when the caller already has them.
    """
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
    sig_tasks = list(sigma_tasks) if sigma_tasks is not None else [
        torch.linalg.svdvals(t) for t in taus]
    return SpectralReport(sigma, sig_tasks, s, gamma, gamma * sigma, alpha)


def subspace_overlap(bases: Sequence[Tensor]) -> float:
    """Mean over task pairs i < j of ‖U_iᵀ U_j‖_F² / k, for orthonormal m × k bases U_i.

    1 when the tasks share their top-k left singular subspace, 0 when they are orthogonal, about
    k/m for random subspaces. NaN for a single task.
    """
    pairs = list(itertools.combinations(bases, 2))
    if not pairs:
        return math.nan
    k = bases[0].shape[1]
    return sum(float((a.mT @ b).square().sum()) / k for a, b in pairs) / len(pairs)


@dataclass(frozen=True)
class MatrixMetrics:
    """What ``specmerge analyze`` reports for one matrix parameter."""

    inflation: float
    overlap: float
    overlap_k: int
    gamma_min: float
    gamma_median: float
    gamma_max: float
    erank_before: float
    erank_after: float
    swudi_a_ranks: dict[str, int]
    swudi_rank: int
    swudi_trace_share: float
    n: int


def matrix_metrics(merged: Tensor, task_vectors: Sequence[Tensor], *, alpha: float | None,
                   rank_ratio: float) -> tuple[MatrixMetrics, SpectralReport]:
    """The analyze metrics of one merged update W_m (the recipe's base merge) and its τ_i.

    - inflation σ1(W_m) / max_i σ1(τ_i);
    - ``subspace_overlap`` of the tasks' top-k left singular subspaces, k = max(1, ⌊r/K⌋) (the
      per-task rank of TSV-M, arXiv 2412.00081);
    - SVC's γ_r (arXiv 2602.05536) at ``alpha`` (None: 1/K): min, median, max;
    - the effective rank of σ(W_m) before and after SVC;
    - with C = Σ w_i τ_iᵀ τ_i (eigenvalues floored at 1e-8, as SWUDI's code): the rank k_ℓ each
      SWUDI-A rule picks (default clips), and the share Σ_{j<k} λ_j / Σ λ_j that SWUDI's top-k,
      k = max(1, ⌊n·rank_ratio + 0.999⌋), keeps (arXiv 2606.07289).
    """
    taus = prepare(task_vectors)
    svds = [thin_svd(t) for t in taus]
    report = spectral_report(merged, taus, alpha, sigma_tasks=[s for _, s, _ in svds])
    k_top = tsv_rank(min(taus[0].shape), len(taus))
    lam, _ = eigen(interference_gram(taus))
    shape = (taus[0].shape[0], taus[0].shape[1])
    n = lam.numel()
    k = swudi_rank(n, rank_ratio)
    gamma = report.gamma
    metrics = MatrixMetrics(
        inflation=report.inflation,
        overlap=subspace_overlap([u[:, :k_top] for u, _, _ in svds]),
        overlap_k=k_top,
        gamma_min=float(gamma.min()), gamma_median=float(gamma.median()),
        gamma_max=float(gamma.max()),
        erank_before=effective_rank(report.sigma_merged),
        erank_after=effective_rank(report.sigma_calibrated),
        swudi_a_ranks={rule: select_rank(lam, shape, rule) for rule in RANK_RULES},
        swudi_rank=k,
        swudi_trace_share=float(lam[:k].sum() / lam.sum()),
        n=n,
    )
    return metrics, report
