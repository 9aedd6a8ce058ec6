"""Merge spaces for LoRA experts: run any method on small matrices, lift the result back factored.

Each τ_i = b_i a_i (b_i = s_i B_i, m × r_i; a_i = A_i, r_i × n; R = Σ r_i) of one weight.

- **Core Space** (Panariello et al., NeurIPS 2025, arXiv 2509.17786; official code
  apanariello4/core-space-merging, ``task_merger.py: get_core_matrices``): with the thin SVDs
  [b_1 … b_K] = U_B Σ_B V_Bᵀ and [a_1; …; a_K] = U_A Σ_A V_Aᵀ, the bases are U_B (m × p) and
  V_A (n × q), p = min(m, R), q = min(n, R), and τ_i's core is M_i = U_Bᵀ b_i a_i V_A (p × q).
  The method runs on the cores as if they were the task vectors; τ = U_B M V_Aᵀ.
- **KnOTS** (Stoica et al., ICLR 2025, arXiv 2410.19735; official code gstoica27/KnOTS,
  ``task_merger.py: SVDMerger.apply_svd, merge``): the thin SVD of the concatenated updates
  [τ_1 … τ_K] = U Σ [V_1ᵀ … V_Kᵀ] (m × Kn), kept to its numerical rank ρ; the method runs on
  the right factors ΣV_iᵀ = Uᵀ τ_i (ρ × n, the official code scales V by Σ before merging); τ =
  U · merged. The SVD is computed from the factors: [τ_1 … τ_K] = [b_1 … b_K] diag(a_i), with
  [b_1 … b_K] = Q_b R_b and a_iᵀ = Q_i R_i (QR), its singular values and U come from the
  p × R matrix R_b diag(R_iᵀ), never from an m × Kn one.

Linear methods (task arithmetic, weight average) give the dense merge in every space; the
others (TIES, DARE, TSV-M, Iso-C, …) depend on the space, and element-wise ones on its basis
(docs/spaces.md). Every function here is pure: no I/O, no global state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specmerge.linalg import numerical_rank, thin_svd
from specmerge.lowrank import LowRank, Space

SPACES = ("full", "core", "knots")


@dataclass(frozen=True)
class KnotsSpace:
    """KnOTS's shared left basis U (m × ρ, orthonormal columns)."""

    u: Tensor

    def lift(self, merged: Tensor) -> LowRank:
        """τ = U · merged, factored (merged: ρ × n)."""
        return LowRank(self.u, merged)


def _factors(terms: Sequence[LowRank]) -> list[tuple[Tensor, Tensor]]:
    """(b_i, a_i) with τ_i = b_i a_i, in float32 at least (float64 if any factor is)."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in terms) else torch.float32
    shape = terms[0].shape
    for i, t in enumerate(terms):
        if t.shape != shape:
            raise ValueError(f"task vector {i} has shape {tuple(t.shape)}, expected "
                             f"{tuple(shape)} like task vector 0")
    return [t.to(dtype=dtype).factors() for t in terms]


def core_space(terms: Sequence[LowRank]) -> tuple[Space, list[Tensor]]:
    """Core Space's bases (U_B, V_A) as a ``Space`` and the cores M_i = U_Bᵀ b_i a_i V_A."""
    parts = _factors(terms)
    left = thin_svd(torch.cat([b for b, _ in parts], dim=1))[0]
    right = thin_svd(torch.cat([a for _, a in parts], dim=0))[2].mT
    cores = [(left.mT @ b) @ (a @ right) for b, a in parts]
    return Space(tuple(terms[0].shape), left, right), cores  # type: ignore[arg-type]


def knots_space(terms: Sequence[LowRank]) -> tuple[KnotsSpace, list[Tensor]]:
    """KnOTS's basis U and the right factors ΣV_iᵀ = Uᵀ τ_i (ρ × n each)."""
    parts = _factors(terms)
    m, n = terms[0].shape
    q_b, r_b = torch.linalg.qr(torch.cat([b for b, _ in parts], dim=1), mode="reduced")
    r_a = [torch.linalg.qr(a.mT, mode="reduced")[1].mT for _, a in parts]  # a_i = R_iᵀ Q_iᵀ
    w, s, _ = thin_svd(r_b @ torch.block_diag(*r_a))
    rho = numerical_rank(s, (m, len(parts) * n))
    u = q_b @ w[:, :rho]
    return KnotsSpace(u), [(u.mT @ b) @ a for b, a in parts]


def merge_in_space(space: str, method: Callable[[list[Tensor]], Tensor],
                   terms: Sequence[LowRank]) -> LowRank:
    """``method`` run on the task vectors' small matrices in ``space`` ("core" or "knots"),
    its result lifted back as a factored τ (rank 0 when no expert touches the weight)."""
    if sum(t.rank for t in terms) == 0:
        m, n = terms[0].shape
        return LowRank(terms[0].b.new_zeros(m, 0), terms[0].a.new_zeros(0, n))
    if space == "core":
        basis, small = core_space(terms)
        merged = method(small)
        return basis.lift(merged)  # type: ignore[return-value]
    if space == "knots":
        knots, small = knots_space(terms)
        return knots.lift(method(small))
    raise ValueError(f"unknown space {space!r}; one of {list(SPACES)}")
