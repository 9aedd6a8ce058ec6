"""Numerical helpers shared by the methods: dtype policy, thin SVD, polar factor, eigh.

Each helper exists once here; methods never call ``torch.linalg`` for these directly, so the
fallbacks (float64 retry, symmetrisation, sign conventions) apply everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
COMPUTE_DTYPES = ("float32", "float64")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map ``"float32"``-style names (and aliases fp32/bf16/fp16/fp64) to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16",
               "half": "float16", "float": "float32", "double": "float64"}
    key = aliases.get(name, name)
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compute_dtype(requested: str | torch.dtype = "float32") -> torch.dtype:
    """The compute dtype policy: float32 at least, float64 on request. Never bf16/fp16."""
    dt = parse_dtype(requested)
    if dt not in (torch.float32, torch.float64):
        raise ValueError(f"compute dtype must be float32 or float64, got {dtype_name(dt)}")
    return dt


def upcast(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cast to at least ``dtype`` (float32 by default); float64 input stays float64."""
    if x.dtype == torch.float64 and dtype == torch.float32:
        return x
    return x.to(dtype)


def prepare_task_vectors(tensors: Sequence[torch.Tensor], method: str, *,
                         matrix: bool = False) -> list[torch.Tensor]:
    """Validate the task vectors a method receives and cast them to one compute dtype.

    They must be K ≥ 1 floating tensors of one shape on one device (2-D when ``matrix``). The
    compute dtype is float64 if any input is float64, float32 otherwise (bf16/fp16 upcast).
    Errors name the method and the offending task vector.
    """
    if len(tensors) == 0:
        raise ValueError(f"{method}: needs at least one task vector, got none")
    shape, device = tensors[0].shape, tensors[0].device
    if matrix and len(shape) != 2:
        raise ValueError(f"{method}: expects 2-D (out, in) matrices, got shape {tuple(shape)}")
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise ValueError(f"{method}: task vector {i} has dtype {t.dtype}; expected floating")
        if t.shape != shape:
            raise ValueError(f"{method}: task vector {i} has shape {tuple(t.shape)}, "
                             f"expected {tuple(shape)} like task vector 0")
        if t.device != device:
            raise ValueError(f"{method}: task vector {i} is on {t.device}, expected {device}")
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return [upcast(t, dtype) for t in tensors]


def thin_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``a = U diag(S) Vh`` with S descending, r = min(m, n) triplets.

    Inputs below float32 are upcast. A wide matrix (m < n) is decomposed as its transpose,
    a = (Aᵀ)ᵀ = (V S Uᵀ)ᵀ, because LAPACK is several times slower on the wide layout (4096 ×
    11008: 3.5×); the factors are the same up to rounding and SVD signs. If LAPACK fails to
    converge (rare, ill-conditioned input), it retries in float64 and casts back. Returns tensors
    in the (upcast) dtype of ``a``.
    """
    a = upcast(a)
    if a.ndim == 2 and a.shape[0] < a.shape[1]:
        v, s, uh = thin_svd(a.mT)
        return uh.mT, s, v.mT
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
        log.warning("SVD of a %s matrix failed (%s); retrying in float64", tuple(a.shape), err)
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
        return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def numerical_rank(sigma: torch.Tensor, shape: Sequence[int],
                   reference: float | None = None) -> int:
    """How many singular values (descending) stand above rounding: σ_j > s · max(m, n) · eps of
    their dtype, with s = σ_1 (the default tolerance of ``torch.linalg.matrix_rank``) or the
    ``reference`` scale of the matrix this one was computed from (a residual's own σ_1 may be
    rounding noise)."""
    scale = float(sigma[0]) if reference is None and sigma.numel() else (reference or 0.0)
    if sigma.numel() == 0 or scale == 0.0:
        return 0
    cutoff = scale * max(shape) * torch.finfo(sigma.dtype).eps
    return int((sigma > cutoff).sum())


# σ_j ≤ 16 eps σ_1 in ``polar`` is an exact zero seen through rounding. Tighter than
# ``numerical_rank``: a basis concatenation of full-rank task vectors can be ill-conditioned
# (σ_min ≈ 80 eps σ_1 in a 128 × 128 TSV-M case) and those directions stay, as officially.
POLAR_CUTOFF = 16


def polar(a: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor of ``a``: if ``a = P Σ Qᵀ`` then ``polar(a) = P Qᵀ``.

    This is the closest matrix with orthonormal columns (rows, if wide) to ``a`` in
    Frobenius norm (Higham, 1986). It is invariant to the sign convention of the SVD. On a
    rank-deficient ``a`` (σ_j ≤ 16 eps σ_1) the pairs with σ = 0 are arbitrary, so only the ρ
    others are kept: P_ρ Q_ρᵀ, the partial isometry on a's row and column spaces
    (e.g. TSV-M or Iso-CTS bases of LoRA updates that span fewer directions than they count).
    """
    p, s, qh = thin_svd(a)
    rho = int((s > POLAR_CUTOFF * torch.finfo(s.dtype).eps * s[0]).sum()) if s.numel() else 0
    if rho < s.numel():
        return p[:, :rho] @ qh[:rho]
    return p @ qh


def sym_eigh(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric matrix, ``c = Q diag(λ) Qᵀ``, λ sorted descending.

    ``c`` is symmetrised as (c + cᵀ)/2 first, so rounding asymmetry cannot hurt. Retries in
    float64 if the solver fails.
    """
    c = upcast(c)
    c = 0.5 * (c + c.mT)
    try:
        lam, q = torch.linalg.eigh(c)
    except RuntimeError as err:
        log.warning("eigh of a %s matrix failed (%s); retrying in float64", tuple(c.shape), err)
        lam, q = torch.linalg.eigh(c.double())
        lam, q = lam.to(c.dtype), q.to(c.dtype)
    return lam.flip(-1), q.flip(-1)


def is_finite(x: torch.Tensor) -> bool:
    """True when every entry of ``x`` is finite (floating tensors only)."""
    if not x.is_floating_point():
        return True
    return bool(torch.isfinite(x).all())
