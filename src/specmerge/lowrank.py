"""Factored task vectors τ = s · B A (LoRA) and the exact reduction that lets the spectral methods
run on small matrices.

For K factored τ_i = s_i B_i A_i of shape (m, n) with ranks r_i (R = Σ r_i), let
Q_L (m × p) and Q_R (n × q) be orthonormal bases of the column spaces of [B_1 … B_K] and of
[A_1; …; A_K]ᵀ (reduced QR, p = min(m, R), q = min(n, R)). Every τ_i is Q_L c_i Q_Rᵀ with the
small core c_i = (Q_Lᵀ s_i B_i)(A_i Q_R) (p × q). Each spectral method commutes with this
embedding: the SVD of Q_L c Q_Rᵀ is (Q_L U) Σ (Q_R V)ᵀ, polar factors, Frobenius norms, the
WUDI Gram C = Q_R (Σ w_i c_iᵀ c_i) Q_Rᵀ and D = Q_L (Σ w_i c_i c_iᵀ c_i) Q_Rᵀ all map across.
So a method runs on the cores (O(R³) instead of O(m n min(m, n))) and its result is lifted back
as a factored τ. Only what depends on the full shape (rank rules, numerical-rank cutoffs, the
eigenvalues of C on its null space) needs the logical shape (m, n), which ``Space`` carries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specmerge.linalg import numerical_rank, prepare_task_vectors, thin_svd


@dataclass(frozen=True)
class LowRank:
    """τ = scale · b @ a, with b (m × r) and a (r × n); r may be 0 (τ = 0).

    With a ``core`` (p × q), τ = scale · b @ core @ a, where b (m × p) has orthonormal columns
    and a (q × n) orthonormal rows: the form a factored method returns (``Space.lift``), whose
    SVD needs no QR and whose bases the next step (SVC) reuses.
    """

    b: Tensor
    a: Tensor
    scale: float = 1.0
    core: Tensor | None = None

    def __post_init__(self) -> None:
        inner = (self.a.shape[0],) if self.core is None else tuple(self.core.shape)
        if (self.b.ndim != 2 or self.a.ndim != 2 or self.b.shape[1] != inner[0]
                or self.a.shape[0] != inner[-1]):
            raise ValueError(f"LowRank: factors of shapes {tuple(self.b.shape)} and "
                             f"{tuple(self.a.shape)} do not multiply")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.b.shape[0], self.a.shape[1]))

    @property
    def rank(self) -> int:
        """An upper bound of the rank: the inner dimension."""
        return self.b.shape[1] if self.core is None else min(self.core.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.b.dtype

    @property
    def device(self) -> torch.device:
        return self.b.device

    def factors(self) -> tuple[Tensor, Tensor]:
        """(B', A) with τ = B' A: the scale (and core) folded into the left factor."""
        b = self.b if self.core is None else self.b @ self.core
        return b * self.scale, self.a

    def dense(self) -> Tensor:
        """The m × n matrix τ."""
        if self.rank == 0:
            return self.b.new_zeros(self.shape)
        if self.core is None:
            return (self.b @ self.a).mul_(self.scale)
        return (self.b @ self.core @ self.a).mul_(self.scale)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
           ) -> LowRank:
        core = None if self.core is None else self.core.to(device, dtype)
        return LowRank(self.b.to(device, dtype), self.a.to(device, dtype), self.scale, core)

    @property
    def mT(self) -> LowRank:  # noqa: N802 (mirrors Tensor.mT)
        return LowRank(self.a.mT, self.b.mT, self.scale,
                       None if self.core is None else self.core.mT)

    def scaled(self, factor: float) -> LowRank:
        return LowRank(self.b, self.a, self.scale * factor, self.core)


TaskVector = Tensor | LowRank


def dense(t: TaskVector) -> Tensor:
    """A dense tensor for either kind of task vector."""
    return t.dense() if isinstance(t, LowRank) else t


def all_factored(tensors: Sequence[TaskVector]) -> bool:
    return len(tensors) > 0 and all(isinstance(t, LowRank) for t in tensors)


def is_zero(t: TaskVector) -> bool:
    """True for a rank-0 factored τ (an adapter that does not touch the weight)."""
    return isinstance(t, LowRank) and (t.rank == 0 or t.scale == 0.0)


@dataclass(frozen=True)
class Space:
    """Where a method's cores live: the identity (dense τ) or Q_L · core · Q_Rᵀ.

    ``shape`` is the logical (m, n) of the task vectors, which rank rules and cutoffs use.
    """

    shape: tuple[int, int]
    left: Tensor | None = None  # (m, p), orthonormal columns
    right: Tensor | None = None  # (n, q), orthonormal columns

    @property
    def factored(self) -> bool:
        return self.left is not None

    def lift(self, core: Tensor) -> TaskVector:
        """The m × n result Q_L core Q_Rᵀ, factored (or ``core`` itself for dense input)."""
        if self.left is None or self.right is None:
            return core
        return LowRank(self.left, self.right.mT, 1.0, core)


def concat(terms: Sequence[LowRank], weights: Sequence[float]) -> LowRank:
    """Σ_i w_i τ_i as one factored τ: the factors concatenated (rank Σ r_i)."""
    parts = [t.factors() for t in terms]
    b = torch.cat([b * w for (b, _), w in zip(parts, weights, strict=True)], dim=1)
    return LowRank(b, torch.cat([a for _, a in parts], dim=0))


def span_basis(orthonormal: Sequence[Tensor], others: Sequence[Tensor]) -> Tensor:
    """Orthonormal columns spanning (a superset of) the columns of every matrix given.

    ``orthonormal`` matrices already have orthonormal columns: the first is kept as it is and
    the rest, with ``others``, extend it by two passes of block Gram–Schmidt then a QR of what
    is left (columns already in the span to 100 eps are not added). Without an orthonormal
    matrix it is the reduced QR of all columns.
    """
    parts = list(orthonormal[1:]) + list(others)
    if not orthonormal:
        return torch.linalg.qr(torch.cat(parts, dim=1), mode="reduced")[0]
    q = orthonormal[0]
    if not parts:
        return q
    x = torch.cat(parts, dim=1)
    norms = torch.linalg.vector_norm(x, dim=0)
    for _ in range(2):
        x = x - q @ (q.mT @ x)
    x = x[:, torch.linalg.vector_norm(x, dim=0) > 100 * torch.finfo(x.dtype).eps * norms]
    if x.shape[1] == 0:
        return q
    extra = torch.linalg.qr(x, mode="reduced")[0]
    extra = torch.linalg.qr(extra - q @ (q.mT @ extra), mode="reduced")[0]
    return torch.cat([q, extra], dim=1)


def embed(task_vectors: Sequence[TaskVector], method: str, *, matrix: bool = True
          ) -> tuple[Space, list[Tensor]]:
    """The task vectors as cores of a common ``Space``.

    Dense input (or a mix of dense and factored, densified) gives the identity space and the
    prepared dense tensors (``prepare_task_vectors``). All-factored input of total rank R ≥ 1
    gives the cores c_i (p × q) of the module docstring, in the compute dtype (float64 if any
    factor is, else float32).
    """
    if not all_factored(task_vectors) or sum(t.rank for t in task_vectors) == 0:  # type: ignore[union-attr]
        taus = prepare_task_vectors([dense(t) for t in task_vectors], method, matrix=matrix)
        shape = taus[0].shape
        return Space((shape[0], shape[1:].numel()) if len(shape) else (1, 1)), taus
    terms: list[LowRank] = list(task_vectors)  # type: ignore[arg-type]
    shape = terms[0].shape
    for i, t in enumerate(terms):
        if t.shape != shape:
            raise ValueError(f"{method}: task vector {i} has shape {tuple(t.shape)}, expected "
                             f"{tuple(shape)} like task vector 0")
        if t.device != terms[0].device:
            raise ValueError(f"{method}: task vector {i} is on {t.device}, expected "
                             f"{terms[0].device}")
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in terms) else torch.float32
    terms = [t.to(dtype=dtype) for t in terms]
    cored = [t for t in terms if t.core is not None]  # bases of an earlier factored result
    left = span_basis([t.b for t in cored], [t.b for t in terms if t.core is None])
    right = span_basis([t.a.mT for t in cored], [t.a.mT for t in terms if t.core is None])
    cores = []
    for t in terms:
        lb = left.mT @ t.b if t.core is None else (left.mT @ t.b) @ t.core
        cores.append((lb * t.scale) @ (t.a @ right))
    return Space((shape[0], shape[1]), left, right), cores


def factored_svd(t: TaskVector) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of τ (U, σ, Vᵀ), σ descending. For a factored τ it is exact and cheap: QR of
    each factor, then the SVD of the small r × r core; it returns r ≤ min(m, n) triplets."""
    if not isinstance(t, LowRank):
        return thin_svd(t)
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    t = t.to(dtype=dtype)
    if t.core is not None:  # orthonormal bases already: the SVD of the core
        u, s, vh = thin_svd(t.core * t.scale)
        return t.b @ u, s, vh @ t.a
    qb, rb = torch.linalg.qr(t.b, mode="reduced")
    qa, ra = torch.linalg.qr(t.a.mT, mode="reduced")
    u, s, vh = thin_svd((rb * t.scale) @ ra.mT)
    return qb @ u, s, vh @ qa.mT


def truncate(t: TaskVector, rank: int, dtype: torch.dtype | None = None
             ) -> tuple[Tensor, Tensor, float]:
    """Factors (B, A) of the best rank-k approximation of τ, k = min(numerical rank, ``rank``),
    balanced as B = U_k √σ_k, A = √σ_k V_kᵀ and cast to ``dtype`` (default: kept), and the
    relative error ‖τ − B A‖_F / ‖τ‖_F of the stored factors (0 for τ = 0).

    The error is √(t² + e²): t² = Σ_{j>k} σ_j² / Σ σ_j², the truncation, exact; e = ‖B'A' − BA‖
    / ‖τ‖, the rounding of the cast factors B' = B + ΔB, A' = A + ΔA, from the Gram matrices of
    [ΔB, B] and [A'; ΔA] in float64 (B'A' − BA = ΔB A' + B ΔA; its cross term with the
    truncation residual is of second order)."""
    u, s, vh = factored_svd(t)
    k = min(rank, numerical_rank(s, tuple(t.shape)))
    root = s[:k].sqrt()
    b, a = (u[:, :k] * root).contiguous(), (root[:, None] * vh[:k]).contiguous()
    total = float(s.double().square().sum())
    if total == 0.0:
        return b.to(dtype or b.dtype), a.to(dtype or a.dtype), 0.0
    error2 = float(s[k:].double().square().sum()) / total
    if dtype is not None and dtype != b.dtype:
        bc, ac = b.to(dtype), a.to(dtype)
        x = torch.cat([bc.double() - b.double(), b.double()], dim=1)
        y = torch.cat([ac.double(), ac.double() - a.double()], dim=0)
        error2 += max(float(((x.mT @ x) * (y @ y.mT)).sum()), 0.0) / total
        b, a = bc, ac
    return b, a, error2 ** 0.5
