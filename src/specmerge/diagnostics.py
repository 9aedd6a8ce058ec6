"""Spectral diagnostics of a merge, for one matrix parameter (pure maths, no files).

``spectral_report`` answers the questions SVC is built on: how inflated is the merged spectrum
relative to the tasks' own, how much does each task already receive along each singular
direction (s_i^r), and what does SVC do about it (γ_r). ``matrix_metrics`` adds what SWUDI reads
from the same matrix: how much the tasks' top subspaces overlap (outputs and inputs), the rank
each SWUDI-A rule would pick, the share of C's trace that SWUDI's top-k keeps and whether that
truncation can bind at all (k against rank C), the merged norm against task arithmetic's, and
the scale ``scaling: auto`` would choose. ``specmerge analyze`` runs
``matrix_metrics`` on every matrix parameter; the pictures are drawn by ``specmerge.io.plots``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specmerge.linalg import numerical_rank, thin_svd, upcast
from specmerge.methods.calibration import svc_gamma, svc_responses
from specmerge.methods.interference import (
    CORE_DTYPE,
    RANK_RULES,
    eigen,
    interference_gram,
    prepare,
    select_rank,
    significant,
    swudi_rank,
)
from specmerge.methods.registry import get_method
from specmerge.methods.scale_rule import AUTO, resolve_scaling
from specmerge.methods.subspace import tsv_rank

# the method whose update the merged norm is compared with, at its registry default λ
TA_METHOD = "task_arithmetic"


@dataclass(frozen=True)
class SpectralReport:
    sigma_merged: Tensor  # (r,) singular values of W_m, descending
    sigma_tasks: list[Tensor]  # K × (r,) singular values of each τ_i
    responses: Tensor  # (K, r) s_i^r along the left singular directions of W_m
    gamma: Tensor  # (r,) SVC's γ_r = K / Σ_i max(α, s_i^r)
    sigma_calibrated: Tensor  # (r,) γ ⊙ σ
    alpha: float
    rank: int  # numerical rank of W_m: γ_r beyond it multiplies rounding noise

    @property
    def gamma_kept(self) -> Tensor:
        """γ_r on the directions W_m has (r < its numerical rank)."""
        return self.gamma[:self.rank]

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
    gamma = svc_gamma(u, sigma, vh, taus, alpha=alpha)
    sig_tasks = list(sigma_tasks) if sigma_tasks is not None else [
        torch.linalg.svdvals(t) for t in taus]
    return SpectralReport(sigma, sig_tasks, s, gamma, gamma * sigma, alpha,
                          numerical_rank(sigma, tuple(w.shape)))


def subspace_overlap(bases: Sequence[Tensor]) -> float:
    """Mean over task pairs i < j of ‖U_iᵀ U_j‖_F² / min(k_i, k_j), for orthonormal m × k_i
    bases U_i; pairs with an empty basis (a zero τ_i) are left out.

    1 when one task's subspace lies in the other's (equal k: they share it), 0 when they are
    orthogonal, about k/m for random subspaces. NaN for fewer than two non-empty bases.
    """
    pairs = [(a, b) for a, b in itertools.combinations(bases, 2)
             if a.shape[1] and b.shape[1]]
    if not pairs:
        return math.nan
    return sum(float((a.mT @ b).square().sum()) / min(a.shape[1], b.shape[1])
               for a, b in pairs) / len(pairs)


def top_bases(svds: Sequence[tuple[Tensor, Tensor, Tensor]], k: int, shape: Sequence[int],
              side: str) -> list[Tensor]:
    """Each τ_i's top-k left (``side="left"``: m × k) or right (n × k) singular vectors, at most
    its numerical rank: past it (a rank-r LoRA τ_i has r) they are arbitrary null directions."""
    out = []
    for u, sigma, vh in svds:
        ki = min(k, numerical_rank(sigma, shape))
        out.append(u[:, :ki] if side == "left" else vh[:ki].mT)
    return out


def norm_ratio(merged: Tensor, task_vectors: Sequence[Tensor], scaling: float) -> float:
    """‖W_m‖_F / ‖λ Σ_i τ_i‖_F: the merged update's norm against task arithmetic's at λ (NaN
    when Σ τ_i = 0)."""
    total = torch.zeros_like(task_vectors[0])
    for t in task_vectors:
        total.add_(t)
    ta = scaling * float(torch.linalg.vector_norm(total))
    return float(torch.linalg.vector_norm(merged)) / ta if ta > 0 else math.nan


def _stats(x: Tensor) -> tuple[float, float, float]:
    if x.numel() == 0:
        return math.nan, math.nan, math.nan
    return float(x.min()), float(x.median()), float(x.max())


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
    rank_c: int
    truncation_cannot_bind: bool
    norm_ratio_ta: float
    input_overlap: float
    auto_scale: float


def matrix_metrics(merged: Tensor, task_vectors: Sequence[Tensor], *, alpha: float | None,
                   rank_ratio: float, ta_scaling: float | None = None
                   ) -> tuple[MatrixMetrics, SpectralReport]:
    """The analyze metrics of one merged update W_m (the recipe's base merge) and its τ_i.

    - inflation σ1(W_m) / max_i σ1(τ_i);
    - ``subspace_overlap`` of the tasks' top-k left singular subspaces (``overlap``: their
      outputs) and right ones (``input_overlap``: their inputs, the rows of τ_i that WUDI's
      objective stands on), k = max(1, ⌊r/K⌋) (the per-task rank of TSV-M, arXiv 2412.00081),
      at most each τ_i's numerical rank;
    - SVC's γ_r (arXiv 2602.05536) at ``alpha`` (None: 1/K), on W_m's numerical rank: min,
      median, max;
    - the effective rank of σ(W_m) before and after SVC;
    - with C = Σ w_i τ_iᵀ τ_i in float64 (eigenvalues floored at 1e-8, as SWUDI's code): the
      rank k_ℓ each SWUDI-A rule picks (default clips), SWUDI's k = max(1, ⌊n·rank_ratio +
      0.999⌋) and the share Σ_{j<k} λ_j / Σ λ_j of trace C it keeps (arXiv 2606.07289), and
      ``rank_c``, C's eigenvalues above rounding (``significant``): k > rank_c means the
      truncation cannot bind (SWUDI is then its filtered closed form; every LoRA merge with
      K·r < k);
    - ``norm_ratio_ta`` ‖W_m‖_F / ‖λ Σ τ_i‖_F, λ = ``ta_scaling`` (None: task arithmetic's
      registry default);
    - ``auto_scale``: the factor ``scaling: auto`` (``methods/scale_rule.py``) gives W_m (1
      where C has full rank).
    """
    taus = prepare(task_vectors)
    svds = [thin_svd(t) for t in taus]
    report = spectral_report(merged, taus, alpha, sigma_tasks=[s for _, s, _ in svds])
    shape = (taus[0].shape[0], taus[0].shape[1])
    k_top = tsv_rank(min(shape), len(taus))
    lam, _ = eigen(interference_gram(taus, CORE_DTYPE))
    n = lam.numel()
    k = swudi_rank(n, rank_ratio)
    rank_c = significant(lam)
    if ta_scaling is None:
        ta_scaling = get_method(TA_METHOD).defaults()["scaling"]
    g_min, g_median, g_max = _stats(report.gamma_kept)
    w = upcast(merged).to(taus[0].dtype)
    metrics = MatrixMetrics(
        inflation=report.inflation,
        overlap=subspace_overlap(top_bases(svds, k_top, shape, "left")),
        overlap_k=k_top,
        gamma_min=g_min, gamma_median=g_median, gamma_max=g_max,
        erank_before=effective_rank(report.sigma_merged),
        erank_after=effective_rank(report.sigma_calibrated),
        swudi_a_ranks={rule: select_rank(lam, shape, rule) for rule in RANK_RULES},
        swudi_rank=k,
        swudi_trace_share=float(lam[:k].sum() / lam.sum()),
        n=n,
        rank_c=rank_c,
        truncation_cannot_bind=k > rank_c,
        norm_ratio_ta=norm_ratio(w, taus, ta_scaling),
        input_overlap=subspace_overlap(top_bases(svds, k_top, shape, "right")),
        auto_scale=resolve_scaling(AUTO, w, taus, low_rank=rank_c < n),
    )
    return metrics, report
