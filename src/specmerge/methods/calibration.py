"""Calibrations: post-process the merged update of any base method. SVC (Li et al., 2026).

A calibration takes the base method's merged update W_m (its own scaling already applied) and
the task vectors τ_1..τ_K of one matrix parameter, and returns the update that replaces W_m,
used at scale 1.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from specmerge.linalg import numerical_rank, thin_svd
from specmerge.lowrank import LowRank, TaskVector, embed
from specmerge.methods.registry import Interval, register

log = logging.getLogger(__name__)
_EPS = 1e-12  # floor of ‖a_i^r‖² in s_i^r, as in the official code


def svc_responses(u: Tensor, sigma: Tensor, vh: Tensor, tau: Tensor) -> Tensor:
    """s^r = σ_r ⟨a^r, v_r⟩ / max(‖a^r‖², 1e-12) for every r at once, with a^r = u_rᵀ τ.

    ``u`` (m × r), ``sigma`` (r), ``vh`` (r × n) is the thin SVD of W_m. One product Uᵀτ gives
    every a^r as a row; ⟨u_rᵀ W_m, a^r⟩ = σ_r ⟨v_r, a^r⟩.
    """
    a = u.mT @ tau
    return sigma * (a * vh).sum(1) / (a * a).sum(1).clamp_min(_EPS)


def svc_gamma(u: Tensor, sigma: Tensor, vh: Tensor, task_vectors: Sequence[Tensor], *,
              alpha: float, target: int | None = None) -> Tensor:
    """SVC's factors γ_r, one per singular direction of W_m = U diag(σ) Vᵀ (see ``svc``):
    K / Σ_i max(α, s_i^r) (a NaN or −inf s_i^r counts as α), or with ``target`` 1 / η_r."""
    if target is not None:
        s_t = svc_responses(u, sigma, vh, task_vectors[target])
        one = torch.ones((), dtype=s_t.dtype, device=s_t.device)
        eta = torch.where(s_t > 0, s_t.clamp_min(alpha), one)  # NaN > 0 is False: η = 1
        return 1.0 / eta
    total = torch.zeros_like(sigma)
    for tau in task_vectors:
        s = svc_responses(u, sigma, vh, tau)
        s = torch.where(torch.isnan(s) | torch.isneginf(s), alpha, s)
        total.add_(s.clamp_min(alpha))
    return len(task_vectors) / total


def gamma_in_range(gamma: Tensor, sigma: Tensor, shape: Sequence[int]) -> Tensor:
    """γ_r on the directions W_m has (r < its numerical rank): elsewhere σ_r is rounding noise
    and γ_r ⊙ σ_r changes nothing (a LoRA merge has rank ≤ Σ r_i, and there γ_r = 1/α)."""
    return gamma[:numerical_rank(sigma, shape)]


def _log_gamma(gamma: Tensor, sigma: Tensor, shape: Sequence[int]) -> None:
    g = gamma_in_range(gamma, sigma, shape)
    if g.numel():
        log.debug("svc: γ over the %d directions of W_m (%d × %d): min %.4g, median %.4g, "
                  "max %.4g", g.numel(), shape[0], shape[1], float(g.min()), float(g.median()),
                  float(g.max()))


def svc_from_svd(u: Tensor, sigma: Tensor, vh: Tensor, task_vectors: Sequence[Tensor], *,
                 alpha: float, target: int | None = None,
                 shape: Sequence[int] | None = None) -> Tensor:
    """SVC (left space) given the thin SVD W_m = U diag(σ) Vᵀ; see ``svc`` for the rule.
    ``shape``: W_m's logical (m, n), for the DEBUG log of γ (default: from u and vh).

    The result is unchanged when any pair (u_r, v_r) flips sign: s_i^r, hence γ_r, is even in
    the pair and u_r v_rᵀ is too.
    """
    scale = svc_gamma(u, sigma, vh, task_vectors, alpha=alpha, target=target)
    if log.isEnabledFor(logging.DEBUG):
        _log_gamma(scale, sigma, shape or (u.shape[0], vh.shape[1]))
    return (u * (scale * sigma)) @ vh


# Adjacent singular values within 64 eps of each other (relative) count as equal. Iso-C's flat
# spectrum, computed, has adjacent gaps up to about 13 eps (1024 × 1024, float32 and float64).
CLUSTER_TOL = 64


def clusters(sigma: Tensor, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Runs [c0, c1) of two or more singular values (descending, above the numerical rank) that
    are equal to rounding: σ_j − σ_{j+1} ≤ 64 · eps · σ_j for each adjacent pair."""
    rank = numerical_rank(sigma, shape)
    if rank < 2:
        return []
    tol = CLUSTER_TOL * torch.finfo(sigma.dtype).eps
    close = (sigma[:rank - 1] - sigma[1:rank] <= tol * sigma[:rank - 1]).tolist()
    runs, start = [], 0
    for j in range(1, rank + 1):
        if j == rank or not close[j - 1]:
            if j - start >= 2:
                runs.append((start, j))
            start = j
    return runs


def canonical_basis(u: Tensor, sigma: Tensor, vh: Tensor, taus: Sequence[Tensor],
                    shape: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The SVD of W_m with a unique basis inside each cluster of equal singular values.

    Where σ repeats (after Iso-C every σ is equal), the SVD of W_m is not unique: inside a
    cluster, (U_c G, V_c G) is an SVD for every orthogonal G, and SVC's responses depend on which
    one LAPACK returns. This picks G = P, the left singular vectors of U_cᵀ (Σ_i τ_i) V_c, on both
    sides, so W_m is unchanged and the choice does not depend on the basis given (U_c R, V_c R
    give the same U_c P and V_c P). After Iso-C it is Iso-C's own basis, the singular vectors of
    Σ_i τ_i. ``shape`` is the logical (m, n) for the rank cutoff (default: from u and vh).
    Without clusters the inputs are returned as they are.
    """
    runs = clusters(sigma, shape or (u.shape[0], vh.shape[1]))
    if not runs:
        return u, sigma, vh
    total = torch.zeros_like(taus[0])
    for tau in taus:
        total.add_(tau)
    u, vh = u.clone(), vh.clone()
    for c0, c1 in runs:
        p = thin_svd(u[:, c0:c1].mT @ total @ vh[c0:c1].mT)[0]
        u[:, c0:c1] = u[:, c0:c1] @ p
        vh[c0:c1] = p.mT @ vh[c0:c1]
    return u, sigma, vh


def _target_is_a_task(params: Mapping[str, Any], weights: Sequence[float]) -> None:
    target = params.get("target")
    if target is not None and target >= len(weights):
        raise ValueError(f"calibrate.target {target} is not a task index: the recipe has "
                         f"{len(weights)} experts (0 to {len(weights) - 1})")


@register(
    "svc",
    family="calibration",
    summary="Singular Value Calibration: rescale each singular value of the merged update by how "
            "much the tasks already receive along its direction.",
    citation="Li et al., Singular Value Calibration for model merging, ICML 2026, arXiv 2602.05536 "
             "(rule after the official code's 2026-03 'Method Correction')",
    docs={
        "alpha": "floor α of each task's response s_i^r; null means 1/K (official run script; "
                 "it uses 1.0 after TSV-M). γ_r ≤ 1/α",
        "space": "left: responses u_rᵀτ_i (the paper's method); right: τ_i v_r (ablation)",
        "target": "0-based index of one task: σ_r / max(s_target^r, α) where s_target^r > 0, "
                  "σ_r elsewhere; null calibrates for all tasks",
    },
    constraints={"alpha": Interval(float, 0, None, closed="neither"),
                 "target": Interval(int, 0, None, closed="left")},
    matrix_only=True,
    factored=True,
    check=_target_is_a_task,
    notes="After Iso-C or Iso-CTS every singular value of the merged update is equal, so its "
          "SVD is not unique and the official code's result depends on the basis LAPACK "
          "returns; specmerge rotates each cluster of equal singular values to the singular "
          "vectors of Σ τ_i inside it (after Iso-C, Iso-C's own basis), so the output is a "
          "function of the inputs (a deviation where the official result is undefined). The "
          "output replaces the base update at scale 1.",
)
def svc(merged: TaskVector, task_vectors: Sequence[TaskVector], *, alpha: float | None = None,
        space: Literal["left", "right"] = "left", target: int | None = None) -> TaskVector:
    """SVC (Li et al., arXiv 2602.05536), with the official code's corrected (2026-03) rule.

    W_m = U diag(σ) Vᵀ (thin SVD, r = min(m, n)). For every r at once:
      a_i^r = u_rᵀ τ_i,   s_i^r = σ_r ⟨a_i^r, v_r⟩ / max(‖a_i^r‖², 1e-12),
      γ_r = K / Σ_i max(α, s_i^r)   (a NaN or −inf s_i^r counts as α),
      W̃ = U diag(γ ⊙ σ) Vᵀ.
    W̃ replaces W_m at scale 1. Since every term is ≥ α, γ_r ∈ (0, 1/α]: with α < 1 a direction
    can be amplified. ``alpha`` None means 1/K, as in the official run script (which uses 1.0
    for TSV-M). ``space="right"`` uses b_i^r = τ_i v_r and s_i^r = σ_r ⟨b_i^r, u_r⟩ / ‖b_i^r‖²
    (SVC of the transposes; the paper's weaker variant). ``target`` (0-based task index) sets
    σ̃_r = σ_r / η_r with η_r = max(s_target^r, α) where s_target^r > 0 and η_r = 1 elsewhere.

    Repeated singular values (after Iso-C / Iso-CTS every σ_r is equal) make the SVD of W_m
    non-unique, and the official code's result then depends on the basis LAPACK returns. Here
    each cluster of equal σ gets a canonical basis (``canonical_basis``: the singular vectors of
    Σ τ_i inside it, which after Iso-C is Iso-C's own basis), so the output is a function of the
    inputs: the same on every machine, and for dense and factored τ. A documented deviation that
    changes nothing where the σ_r are distinct. Computes in float32 (float64 if an input is).

    Factored input (W_m and every τ_i ``LowRank``): the same rule on the cores of
    ``specmerge.lowrank.embed`` (the SVD of W_m and every response a_i^r = u_rᵀ τ_i live in the
    span of the factors), returned factored; it equals the dense result.
    """
    k = len(task_vectors)
    if k == 0:
        raise ValueError("svc: needs at least one task vector, got none")
    if merged.shape != task_vectors[0].shape:
        raise ValueError(f"svc: merged update has shape {tuple(merged.shape)}, the task vectors "
                         f"{tuple(task_vectors[0].shape)}")
    if alpha is None:
        alpha = 1.0 / k
    if target is not None and target >= k:
        raise ValueError(f"svc: target must be a task index in [0, {k}), got {target}")
    if len(merged.shape) != 2:
        raise ValueError(f"svc: expects 2-D (out, in) matrices, got shape {tuple(merged.shape)}")
    tensors = [merged, *task_vectors]
    if space == "right":
        tensors = [t.mT for t in tensors]
    basis, (w, *taus) = embed(tensors, "svc")
    u, sigma, vh = canonical_basis(*thin_svd(w), taus, basis.shape)
    out = basis.lift(svc_from_svd(u, sigma, vh, taus, alpha=alpha, target=target,
                                  shape=basis.shape))
    if space == "right":
        return out.mT if isinstance(out, LowRank) else out.mT.contiguous()
    return out
