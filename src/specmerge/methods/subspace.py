"""Subspace merges built on the SVD of task vectors: TSV-M, Iso-C, Iso-CTS, STAR.

Every function takes the task vectors τ_i = θ_i − θ_0 (i = 1..K) of one matrix parameter,
shape (m, n) = (out, in), and returns the merged update τ (the engine adds θ_0). Their
non-matrix parameters take the recipe's scope fallback (the mean of the τ_i by default); the
engine applies it, not these functions. r = min(m, n) is the rank of a thin SVD.

Compute dtype: float32, or float64 when an input is float64; bf16/fp16 inputs are upcast before
any SVD, and the result stays in the compute dtype. Tensors stay on their device.

Factored task vectors (``LowRank``, LoRA) take the exact reduced path of ``specmerge.lowrank``:
the method runs on small cores in the span of the stacked factors, with the cutoffs of the full
shape, and returns a factored τ equal to the dense path's result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from specmerge.linalg import numerical_rank, polar, thin_svd
from specmerge.lowrank import TaskVector, embed
from specmerge.methods.elementwise import weighted_sum
from specmerge.methods.registry import Interval, register, warn_unbound


def tsv_rank(r: int, num_tasks: int) -> int:
    """TSV-M's per-task rank k = ⌊r / K⌋, at least 1 (see ``tsv_m``)."""
    return max(1, r // num_tasks)


def tsv_from_triplets(triplets: Sequence[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """U⊥ diag(σ_cat) V⊥ᵀ from per-task triplets (U_i, σ_i, V_iᵀ), concatenated in task order,
    with U⊥ = polar(U_cat) and V⊥ᵀ = polar(V_catᵀ). Invariant to the sign of any pair."""
    u_cat = torch.cat([u for u, _, _ in triplets], dim=1)
    s_cat = torch.cat([s for _, s, _ in triplets])
    vh_cat = torch.cat([vh for _, _, vh in triplets], dim=0)
    return (polar(u_cat) * s_cat) @ polar(vh_cat)


@register(
    "tsv_m",
    family="subspace",
    summary="Task Singular Vectors: keep each τ_i's top ⌊r/K⌋ singular triplets, "
            "orthogonalise the concatenated bases (polar factor), reconstruct.",
    citation="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model "
             "Merging, CVPR 2025, arXiv 2412.00081",
    docs={"scaling": "multiplier of the merged update (official code: 1.0)"},
    matrix_only=True,
    factored=True,
    notes="Per-task rank k = ⌊min(m, n)/K⌋ as in the official code; when K > min(m, n) each task "
          "still keeps k = 1 triplet (the official code would keep none and return 0). A task "
          "keeps no triplet below its numerical rank (a deviation: the official code takes "
          "arbitrary null-space directions of an exactly low-rank τ_i, e.g. a LoRA update).",
)
def tsv_m(task_vectors: Sequence[TaskVector], *, scaling: float = 1.0) -> TaskVector:
    """TSV-M (Gargiulo et al., arXiv 2412.00081), as in the official code.

    1. τ_i = U_i diag(σ_i) V_iᵀ (thin SVD); keep the top k = ⌊r / K⌋ triplets of each task.
    2. Concatenate in task order: U_cat (m × Kk), σ_cat (Kk), V_catᵀ (Kk × n).
    3. U⊥ = polar(U_cat), V⊥ᵀ = polar(V_catᵀ); if U_cat = P Σ Qᵀ then polar(U_cat) = P Qᵀ.
    4. τ = ``scaling`` · U⊥ diag(σ_cat) V⊥ᵀ.

    With K = 1 the full rank is kept and τ = τ_1. Edge cases: when K > r, k is raised to 1 (the
    official code would give k = 0, an all-zero update); U⊥ then has orthonormal rows. A task
    keeps at most its numerical rank (``numerical_rank``) of triplets: on an exactly low-rank τ_i
    the official code would also take arbitrary null-space directions (with σ ≈ 0), which
    rounding moves freely. The result does not depend on the sign convention of any SVD.
    """
    space, taus = embed(task_vectors, "tsv_m")
    k = tsv_rank(min(space.shape), len(taus))
    triplets = []
    for i, tau in enumerate(taus):
        u, s, vh = thin_svd(tau)
        rank_i = numerical_rank(s, space.shape)
        if k > rank_i > 0:
            warn_unbound(f"tsv_m: each task keeps k = ⌊r/K⌋ = {k} singular triplets, but task "
                         f"{i + 1}'s update has rank {rank_i}, so its truncation cannot bind "
                         f"(a LoRA update is kept whole)")
        k_i = min(k, rank_i)
        if k_i:
            triplets.append((u[:, :k_i], s[:k_i], vh[:k_i]))
    if not triplets:
        return space.lift(torch.zeros_like(taus[0]))
    return space.lift(tsv_from_triplets(triplets).mul_(scaling))


@register(
    "iso_c",
    family="subspace",
    summary="Isotropic merge: the SVD of Σ τ_i with every singular value replaced by their mean.",
    citation="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and "
             "Task-Specific Subspaces, ICML 2025, arXiv 2502.04959",
    docs={"scaling": "multiplier of the merged update (the paper tunes it; FusionBench uses 1.5)"},
    matrix_only=True,
    factored=True,
)
def iso_c(task_vectors: Sequence[TaskVector], *, scaling: float = 1.0) -> TaskVector:
    """Iso-C (Marczak et al., arXiv 2502.04959).

    M = Σ_i τ_i = U diag(σ) Vᵀ (thin SVD), kept up to its numerical rank ρ, σ̄ = mean(σ_1..ρ);
    τ = ``scaling`` · U_ρ (σ̄ I) V_ρᵀ. The default ``scaling`` 1.0 is neutral: the paper tunes it
    on validation data and FusionBench uses 1.5. On full-rank M this is the official rule; on an
    exactly low-rank M (LoRA updates) the official code also flattens the zero singular values,
    giving weight σ̄ to arbitrary null-space directions: here they are dropped (a deviation).
    """
    space, taus = embed(task_vectors, "iso_c")
    m = weighted_sum(taus)
    u, s, vh = thin_svd(m)
    rho = numerical_rank(s, space.shape)
    if rho == 0:
        return space.lift(torch.zeros_like(m))
    return space.lift((u[:, :rho] @ vh[:rho]).mul_(s[:rho].mean() * scaling))


def iso_cts_split(r: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """Iso-CTS rank split (official code): returns (k_c, s), the common rank and per-task rank.

    c = ⌊common_fraction · r⌋, t = round((r − c) / K) · K (Python round, half to even),
    k_c = r − t, s = t / K. For r = 768, K = 4, 0.8: c = 614, t = 152, (k_c, s) = (616, 38).
    Edge case: if t > r (possible for small r and small common_fraction), s is lowered to
    ⌊r / K⌋ so that k_c = r − K·s ≥ 0. s = 0 (e.g. small r) makes Iso-CTS equal Iso-C.
    """
    c = int(common_fraction * r)
    s = round((r - c) / num_tasks)
    s = min(s, r // num_tasks)
    return r - s * num_tasks, s


@register(
    "iso_cts",
    family="subspace",
    summary="Isotropic merge with common and task-specific subspaces: top directions of Σ τ_i "
            "plus each task's top directions outside them, orthogonalised, with a flat spectrum.",
    citation="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and "
             "Task-Specific Subspaces, ICML 2025, arXiv 2502.04959",
    docs={
        "common_fraction": "share of the rank given to the common subspace (paper: 0.8)",
        "scaling": "multiplier of the merged update (the paper tunes it on validation data)",
    },
    constraints={"common_fraction": Interval(float, 0, 1)},
    matrix_only=True,
    factored=True,
    notes="The rank split follows the official code: c = ⌊fraction·r⌋, "
          "t = round((r − c)/K)·K (half to even), k_c = r − t, s = t/K per task.",
)
def iso_cts(task_vectors: Sequence[TaskVector], *, common_fraction: float = 0.8,
            scaling: float = 1.0) -> TaskVector:
    """Iso-CTS (Marczak et al., arXiv 2502.04959), as in the official code.

    1. (k_c, s) = ``iso_cts_split(r, K, common_fraction)``.
    2. Σ_i τ_i = U diag(σ) Vᵀ; the common part is its top-k_c triplets (U_c, σ_c, V_cᵀ).
    3. Per task, the top-s SVD triplets of τ_i − U_c U_cᵀ τ_i.
    4. Concatenate the task triplets (task order) then the common ones: U_cat, σ_cat, V_catᵀ,
       with K·s + k_c = r columns, and take U⊥ = polar(U_cat), V⊥ᵀ = polar(V_catᵀ).
    5. τ = ``scaling`` · mean(σ_cat) · U⊥ V⊥ᵀ.

    With ``common_fraction`` 1 (or s = 0) this is Iso-C; with K = 1 it is Iso-C as well. As in
    ``iso_c``, the common part and each task's part keep at most their numerical rank (on
    full-rank input, the official rule; on exactly low-rank input a deviation that drops
    arbitrary null-space directions).
    """
    space, taus = embed(task_vectors, "iso_cts")
    k_c, s = iso_cts_split(min(space.shape), len(taus), common_fraction)
    total = weighted_sum(taus)
    u, sig, vh = thin_svd(total)
    k_c = min(k_c, numerical_rank(sig, space.shape))
    u_c, sig_c, vh_c = u[:, :k_c], sig[:k_c], vh[:k_c]
    triplets = []
    if s > 0:
        for tau in taus:
            residual = tau - u_c @ (u_c.mT @ tau)
            ut, st, vht = thin_svd(residual)
            s_i = min(s, numerical_rank(st, space.shape, float(torch.linalg.norm(tau))))
            triplets.append((ut[:, :s_i], st[:s_i], vht[:s_i]))
    triplets.append((u_c, sig_c, vh_c))
    if sum(t[1].numel() for t in triplets) == 0:
        return space.lift(torch.zeros_like(total))
    u_cat = torch.cat([t[0] for t in triplets], dim=1)
    s_mean = torch.cat([t[1] for t in triplets]).mean()
    vh_cat = torch.cat([t[2] for t in triplets], dim=0)
    return space.lift((polar(u_cat) @ polar(vh_cat)).mul_(s_mean * scaling))


def star_rank(sigma: Tensor, eta: float) -> int:
    """STAR's kept rank: the smallest ρ with cumsum(σ)_ρ / Σσ ≥ eta/100 (σ descending)."""
    csum = torch.cumsum(sigma, 0)
    below = int((csum < (eta / 100.0) * csum[-1]).sum())
    return min(below + 1, sigma.numel())


@register(
    "star",
    family="subspace",
    summary="Spectral Truncation And Rescale: truncate each τ_i to the rank holding eta% of its "
            "nuclear norm, rescale to keep the nuclear norm, average.",
    citation="Lee et al., STAR: Spectral Truncation and Rescale for Model Merging, NAACL 2025, "
             "arXiv 2502.10339",
    docs={"eta": "percentage of each task's nuclear norm kept by the truncation (paper: 40)",
          "scaling": "multiplies the result (specmerge's addition; 1 is the paper's mean)"},
    constraints={"eta": Interval(float, 0, 100, closed="right")},
    matrix_only=True,
    factored=True,
    recorded_if_set=("scaling",),
)
def star(task_vectors: Sequence[TaskVector], *, eta: float = 40.0,
         scaling: float = 1.0) -> TaskVector:
    """STAR (Lee et al., arXiv 2502.10339); default ``eta`` 40 as in the paper.

    For each task: τ_i = U diag(σ) Vᵀ, ρ = min{ρ : Σ_{j≤ρ} σ_j ≥ (eta/100) Σ_j σ_j},
    τ̂_i = U_ρ diag(σ_ρ · Σσ / Σσ_ρ) V_ρᵀ (nuclear norm preserved). τ = scaling · (1/K) Σ_i τ̂_i.
    Tensors with more than 2 dims are reshaped to (shape[0], −1) and back. A zero τ_i
    contributes zero. With eta 100 the result is the mean of the τ_i.
    """
    space, taus = embed(task_vectors, "star", matrix=False)
    shape = taus[0].shape
    if len(shape) < 2:
        raise ValueError(f"star: expects a tensor with at least 2 dims, got shape {tuple(shape)}")
    out = torch.zeros((shape[0], shape[1:].numel()), dtype=taus[0].dtype, device=taus[0].device)
    for tau in taus:
        u, s, vh = thin_svd(tau.reshape(shape[0], -1))
        total = s.sum()
        if total == 0:
            continue
        rho = star_rank(s, eta)
        kept = s[:rho] * (total / s[:rho].sum())
        out.add_((u[:, :rho] * kept) @ vh[:rho])
    return space.lift(out.div_(len(taus)).mul_(scaling).reshape(shape))
