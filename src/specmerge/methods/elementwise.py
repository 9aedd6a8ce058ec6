"""Element-wise merges: weight average, task arithmetic, TIES, DARE.

All functions take the task vectors τ_i = θ_i − θ_0 of one parameter and return the merged
update τ (the engine adds θ_0). They apply to every floating parameter, whatever its shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from specmerge.methods.registry import register


def _weights(task_vectors: Sequence[Tensor], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(task_vectors)
    if len(weights) != len(task_vectors):
        raise ValueError(f"got {len(weights)} weights for {len(task_vectors)} task vectors")
    return [float(w) for w in weights]


def weighted_sum(task_vectors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Σ_i w_i τ_i, accumulated in place (one output buffer, no K-fold stack)."""
    ws = _weights(task_vectors, weights)
    out = torch.zeros_like(task_vectors[0])
    for w, tau in zip(ws, task_vectors, strict=True):
        out.add_(tau, alpha=w)
    return out


@register(
    "weight_average",
    family="elementwise",
    summary="θ0 + Σ w_i τ_i / Σ w_i: the plain (weighted) mean of the experts.",
    citation="Wortsman et al., Model soups, ICML 2022, arXiv 2203.05482",
    docs={},
    uses_weights=True,
)
def weight_average(task_vectors: Sequence[Tensor], *, weights: Sequence[float] | None = None
                   ) -> Tensor:
    """τ = Σ_i w_i τ_i / Σ_i w_i; with unit weights, the mean of the task vectors."""
    ws = _weights(task_vectors, weights)
    total = sum(ws)
    if total == 0:
        raise ValueError("weight_average: the model weights sum to zero")
    return weighted_sum(task_vectors, ws).div_(total)


@register(
    "task_arithmetic",
    family="elementwise",
    summary="θ0 + λ Σ w_i τ_i.",
    citation="Ilharco et al., Editing models with task arithmetic, ICLR 2023, arXiv 2212.04089",
    docs={"scaling": "λ, the scaling coefficient applied to the sum of task vectors"},
    uses_weights=True,
)
def task_arithmetic(task_vectors: Sequence[Tensor], *, weights: Sequence[float] | None = None,
                    scaling: float = 0.3) -> Tensor:
    """τ = λ Σ_i w_i τ_i, with λ = ``scaling`` (default 0.3, Ilharco et al.)."""
    return weighted_sum(task_vectors, weights).mul_(scaling)


def trim_count(numel: int, density: float) -> int:
    """TIES' rank k: the threshold is the k-th smallest |τ|, k = d − ⌊d · density⌋ (official code)."""
    return numel - int(numel * density)


def kth_smallest_abs(x: Tensor, k: int) -> Tensor:
    """The k-th smallest |x| (1-based), as ``kthvalue`` gives it, via ``topk`` on the short side."""
    flat = x.reshape(-1).abs()
    d = flat.numel()
    if not 1 <= k <= d:
        raise ValueError(f"k={k} out of range for {d} entries")
    if k <= d - k + 1:
        return torch.topk(flat, k, largest=False, sorted=False).values.max()
    return torch.topk(flat, d - k + 1, largest=True, sorted=False).values.min()


@register(
    "ties",
    family="elementwise",
    summary="Trim each τ_i to its top-density magnitudes, elect a sign per entry, "
            "average the agreeing entries, scale.",
    citation="Yadav et al., TIES-Merging, NeurIPS 2023, arXiv 2306.01708 (official code's rules)",
    docs={
        "density": "fraction of each task vector's entries kept by magnitude",
        "aggregate": "mean: divide by the number of kept agreeing entries; sum: add them",
        "scaling": "λ applied after the disjoint aggregate",
        "trim_scope": "tensor: top-k per tensor; global: top-k over the whole model (2 extra passes)",
    },
    choices={"aggregate": ("mean", "sum"), "trim_scope": ("tensor", "global")},
    ranges={"density": "(0, 1]"},
    notes="Defaults (density 0.2, mean, λ=1.0) are the SVC paper's TIES setting; the TIES paper "
          "and FusionBench use aggregate=sum with scaling=0.3.",
)
def ties(task_vectors: Sequence[Tensor], *, density: float = 0.2,
         aggregate: Literal["mean", "sum"] = "mean", scaling: float = 1.0,
         trim_scope: Literal["tensor", "global"] = "tensor",
         thresholds: Sequence[float] | None = None) -> Tensor:
    """TIES-Merging as in the official code (Yadav et al., arXiv 2306.01708).

    1. Trim: keep |τ_i| ≥ t_i, t_i the (d − ⌊d·density⌋)-th smallest |τ_i|. ``thresholds``
       overrides t_i (the engine passes whole-model thresholds for ``trim_scope: global``).
    2. Elect: s = sign(Σ_i trim(τ_i)); zeros of s take sign(Σ s).
    3. Disjoint aggregate: keep trim(τ_i) where it is > 0 and s > 0, or < 0 and s ≤ 0; then
       sum, or divide by the count of nonzero kept entries (at least 1) for ``mean``.
    4. Multiply by ``scaling``.
    Masks are recomputed from the scalar thresholds and kept as booleans, so beyond the inputs
    only one float buffer and one float temporary are alive at a time.
    """
    if thresholds is None:
        if trim_scope == "global":
            raise ValueError("ties with trim_scope=global needs whole-model thresholds; "
                             "run it through specmerge.merge, which computes them")
        if density >= 1.0:
            thresholds = [float("-inf")] * len(task_vectors)
        else:
            k = trim_count(task_vectors[0].numel(), density)
            thresholds = [float(kth_smallest_abs(t, k)) for t in task_vectors]

    zero = torch.zeros((), dtype=task_vectors[0].dtype, device=task_vectors[0].device)
    total = torch.zeros_like(task_vectors[0])
    for tau, t in zip(task_vectors, thresholds, strict=True):
        total.add_(torch.where(tau.abs() >= t, tau, zero))
    # elected sign > 0; zeros take sign(Σ signs), and a zero majority stays "not > 0"
    positive = total > 0
    majority = int(positive.sum()) - int((total < 0).sum())
    if majority > 0:
        positive |= total == 0

    # disjoint aggregate, reusing the sum's buffer; counts fit in uint8 for K < 256
    merged = total.zero_()
    count = torch.zeros(merged.shape, device=merged.device,
                        dtype=torch.uint8 if len(task_vectors) < 256 else torch.int32)
    for tau, t in zip(task_vectors, thresholds, strict=True):
        agree = torch.where(positive, tau > 0, tau < 0)
        agree &= tau.abs() >= t
        merged.add_(torch.where(agree, tau, zero))
        count.add_(agree)
    if aggregate == "mean":
        merged.div_(count.clamp_(min=1))
    return merged.mul_(scaling)


@register(
    "dare",
    family="elementwise",
    summary="Drop each entry of τ_i with probability p, rescale survivors by 1/(1−p), "
            "then task arithmetic.",
    citation="Yu et al., Language models are Super Mario (DARE), ICML 2024, arXiv 2311.03099",
    docs={
        "drop_rate": "p, the probability of dropping each entry of each task vector",
        "scaling": "λ of the task arithmetic applied after drop-and-rescale",
    },
    ranges={"drop_rate": "[0, 1)"},
    uses_weights=True,
    uses_rng=True,
)
def dare(task_vectors: Sequence[Tensor], *, weights: Sequence[float] | None = None,
         generators: Sequence[torch.Generator] | None = None, drop_rate: float = 0.5,
         scaling: float = 0.3) -> Tensor:
    """DARE (arXiv 2311.03099): τ = λ Σ_i w_i (m_i ⊙ τ_i) / (1 − p), m_i ~ Bernoulli(1 − p).

    The masks are drawn on the CPU from ``generators[i]`` (one per expert, seeded by the
    engine from the recipe seed, the parameter name and i), so the result does not depend on
    the device, the processing order or the number of workers.
    """
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"dare: drop_rate must lie in [0, 1), got {drop_rate}")
    ws = _weights(task_vectors, weights)
    if generators is None:
        generators = [torch.Generator().manual_seed(i) for i in range(len(task_vectors))]
    out = torch.zeros_like(task_vectors[0])
    for w, tau, gen in zip(ws, task_vectors, generators, strict=True):
        if drop_rate == 0.0:
            out.add_(tau, alpha=w)
            continue
        keep = torch.rand(tau.shape, generator=gen, dtype=torch.float32) >= drop_rate
        out.add_(tau * keep.to(tau.device), alpha=w / (1.0 - drop_rate))
    return out.mul_(scaling)
