"""mergekit 0.1.5's selective methods: Arcee Fusion, RAM and RAM+ (tensor-local).

Each keeps the parts of the task vectors τ_i = θ_i − θ0 that a rule selects: Arcee Fusion the
entries whose change is unusually important, RAM the entries that some expert changes,
averaged where several do. They are the formulas of mergekit 0.1.5 (arcee-ai/mergekit,
``mergekit/merge_methods/arcee_fusion.py`` and ``ram.py``), written again on specmerge's terms:
each function returns the merged update τ (the engine adds θ0). RAM is element-wise and RAM+'s
per-expert counts add up over row blocks, so both stream; Arcee Fusion's threshold is a
quantile of the whole tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from specmerge.methods.registry import Interval, register
from specmerge.methods.weightspace import WHOLE_TENSOR, _one_expert

QUANTILE_SAMPLE = 1_000_000  # mergekit 0.1.5 estimates the quartiles from this many entries
RAM_CITATION = ("Reinforced Agent Merging (RAM), arXiv 2601.13572; as in mergekit 0.1.5 "
                "(mergekit/merge_methods/ram.py)")
EPSILON_DOC = "an entry of τ_i counts as changed where |τ_i| > epsilon"
NONNEGATIVE = Interval(float, 0, None)


# ---------------------------------------------------------------------------------------------
# Arcee Fusion
# ---------------------------------------------------------------------------------------------

def fusion_importance(theta1: Tensor, theta0: Tensor) -> Tensor:
    """Arcee Fusion's importance of each entry: |θ1 − θ0| times the KL divergence, per row
    (the last axis), of softmax(θ1) from softmax(θ0), each + 1e-8:
    I = |θ1 − θ0| · Σ_j p_j log(p_j / q_j),  p = softmax(θ1) + 1e-8,  q = softmax(θ0) + 1e-8."""
    p = torch.softmax(theta1, dim=-1) + 1e-8
    q = torch.softmax(theta0, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (theta1 - theta0).abs() * kl


def quartiles(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Q1, median and Q3 of ``x`` as mergekit 0.1.5 takes them: the sorted entries at index
    ⌊q (n − 1)⌋ (q in float32), over at most ``QUANTILE_SAMPLE`` entries drawn with replacement
    (``torch.randint`` from ``generator``) when x has more."""
    flat = x.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        idx = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator)
        flat = flat[idx.to(flat.device)]
    ordered = torch.sort(flat).values
    q = torch.tensor([0.25, 0.5, 0.75])
    return ordered[(q * (ordered.numel() - 1)).long().to(ordered.device)]


@register(
    "arcee_fusion",
    family="elementwise",
    summary="Keep the expert's change where its importance |τ| · KL(softmax θ1 ‖ softmax θ0) "
            "reaches median + 1.5 IQR of the tensor's importances.",
    citation="Arcee AI, Arcee Fusion (arcee.ai, mergekit's reference); as in mergekit 0.1.5 "
             "(mergekit/merge_methods/arcee_fusion.py)",
    docs={},
    uses_base=True,
    uses_rng=True,
    check=_one_expert("arcee_fusion"),
    notes="No parameters, as in mergekit. The importances and the threshold are computed in "
          "float64: in float32 the KL of two near-equal softmaxes loses most of its digits to "
          "cancellation, and 1.4e-4 of the masks' entries flipped between two CPU code paths "
          "of one machine (none in float64). mergekit computes them in the tensor's dtype, so "
          "the two masks may differ at entries within float32 rounding of the threshold. "
          "Tensors of more than 1,000,000 entries take their "
          "quartiles from 1,000,000 entries drawn with replacement, as mergekit does, from "
          "specmerge's per-parameter seed (mergekit uses torch's global RNG). " + WHOLE_TENSOR
          + ": the threshold is over the whole tensor.",
)
def arcee_fusion(task_vectors: Sequence[Tensor], *, base: Tensor,
                 generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """Arcee Fusion of θ0 and θ1 = θ0 + τ_1 (mergekit 0.1.5):

        I = ``fusion_importance``(θ1, θ0),  (Q1, M, Q3) = ``quartiles``(I)
        m = [I ≥ M + 1.5 (Q3 − Q1)],  τ = m ⊙ τ_1,

    with I and the threshold in float64 (θ1 = θ0 + τ_1 formed there too).
    """
    if len(task_vectors) != 1:
        raise ValueError(f"arcee_fusion takes exactly one task vector, got {len(task_vectors)}")
    tau = task_vectors[0]
    theta0 = base.to(torch.float64)  # float64: see the notes (cancellation in the KL)
    importance = fusion_importance(theta0 + tau.to(torch.float64), theta0)
    q1, median, q3 = quartiles(importance, generators[0] if generators else None)
    return tau * (importance >= median + 1.5 * (q3 - q1)).to(tau.dtype)


# ---------------------------------------------------------------------------------------------
# RAM and RAM+
# ---------------------------------------------------------------------------------------------

def _changed(task_vectors: Sequence[Tensor], epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """τ stacked (K, …), its mask m_i = [|τ_i| > ε] and the count c = Σ_i m_i per entry."""
    taus = torch.stack(list(task_vectors))
    mask = taus.abs() > epsilon
    return taus, mask, mask.sum(dim=0, keepdim=True)


def _ram_sum(taus: Tensor, mask: Tensor, counts: Tensor, unique_scale: Tensor | None) -> Tensor:
    """Σ_i m_i τ_i ([c = 1] λ_i + [c > 1] / c), λ_i = 1 without ``unique_scale``. Products, not
    selections: a NaN/Inf entry stays non-finite."""
    kept = taus * mask
    unique = kept * (counts == 1)
    if unique_scale is not None:
        unique = unique * unique_scale.view(-1, *([1] * (taus.dim() - 1)))
    return (unique + kept * (counts > 1) / counts.clamp(min=1)).sum(dim=0)


@register(
    "ram",
    family="elementwise",
    summary="RAM: each entry changed by one expert takes that change; by several, their mean; "
            "a change is |τ_i| > epsilon.",
    citation=RAM_CITATION,
    docs={"epsilon": EPSILON_DOC},
    constraints={"epsilon": NONNEGATIVE},
    rowwise=True,
    propagates_nonfinite=True,
    notes="Streams in row blocks.",
)
def ram(task_vectors: Sequence[Tensor], *, epsilon: float = 1e-5) -> Tensor:
    """RAM (arXiv 2601.13572) as mergekit 0.1.5 computes it:

        m_i = [|τ_i| > ε],  c = Σ_i m_i,  τ = Σ_i m_i τ_i ([c = 1] + [c > 1] / c).
    """
    taus, mask, counts = _changed(task_vectors, epsilon)
    return _ram_sum(taus, mask, counts, None)


def ram_counts(task_vectors: Sequence[Tensor], epsilon: float) -> list[tuple[int, int]]:
    """Per expert i: (shared_i, unique_i) = the entries τ_i changes that another expert changes
    too (c > 1), and that it alone changes (c = 1)."""
    _, mask, counts = _changed(task_vectors, epsilon)
    shared = (mask & (counts > 1)).reshape(len(task_vectors), -1).sum(dim=1)
    unique = (mask & (counts == 1)).reshape(len(task_vectors), -1).sum(dim=1)
    return [(int(s), int(u)) for s, u in zip(shared, unique, strict=True)]


class RamCounts:
    """RAM+'s per-expert counts over one parameter read in row blocks (``ram_counts``: integer
    counts add up exactly over blocks); one round."""

    kwarg: str = "counts"

    def wanted(self, params: Mapping[str, Any]) -> bool:
        return True

    def start(self, params: Mapping[str, Any], num_experts: int, numel: int,
              dtype: torch.dtype) -> tuple[float, list[tuple[int, int]] | None]:
        return float(params.get("epsilon", 1e-5)), None

    def done(self, state: tuple[float, list[tuple[int, int]] | None]) -> bool:
        return state[1] is not None

    def map(self, state: tuple[float, Any], task_vectors: Sequence[Tensor]
            ) -> list[tuple[int, int]]:
        return ram_counts([t.reshape(-1) for t in task_vectors], state[0])

    def combine(self, partials: Sequence[list[tuple[int, int]]]) -> list[tuple[int, int]]:
        return [(sum(s for s, _ in col), sum(u for _, u in col))
                for col in zip(*partials, strict=True)]

    def reduce(self, state: tuple[float, Any], partials: Sequence[list[tuple[int, int]]]
               ) -> tuple[float, list[tuple[int, int]]]:
        return state[0], self.combine(partials)

    def value(self, state: tuple[float, list[tuple[int, int]] | None]) -> list[tuple[int, int]]:
        assert state[1] is not None
        return state[1]


@register(
    "ramplus_tl",
    family="elementwise",
    summary="RAM+ (tensor-local): RAM, with each expert's unique changes scaled by "
            "λ_i = 1 + r · clamp(shared_i / unique_i, 0, alpha) over the tensor.",
    citation=RAM_CITATION,
    docs={"r": "strength of the rescaling of each expert's unique changes",
          "alpha": "cap on the ratio shared_i / unique_i",
          "epsilon": EPSILON_DOC},
    constraints={"epsilon": NONNEGATIVE},
    tensor_statistics=(RamCounts(),),
    rowwise=True,
    propagates_nonfinite=True,
    notes="Streams in row blocks: the counts are a first pass over the blocks.",
)
def ramplus_tl(task_vectors: Sequence[Tensor], *, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5, counts: Sequence[tuple[int, int]] | None = None
               ) -> Tensor:
    """RAM+ tensor-local (arXiv 2601.13572) as mergekit 0.1.5 computes it, with
    (shared_i, unique_i) = ``ram_counts`` over the whole tensor (``counts``: given by the
    row-block pass; else counted here):

        ρ_i = shared_i / max(unique_i, ε),  λ_i = 1 + r · clamp(ρ_i, 0, α)
        τ = Σ_i m_i τ_i ([c = 1] λ_i + [c > 1] / c)   (m_i, c as in ``ram``).
    """
    taus, mask, per_entry = _changed(task_vectors, epsilon)
    if counts is None:
        counts = ram_counts(task_vectors, epsilon)
    shared = torch.tensor([s for s, _ in counts], dtype=taus.dtype, device=taus.device)
    unique = torch.tensor([u for _, u in counts], dtype=taus.dtype, device=taus.device)
    scale = 1 + r * (shared / unique.clamp(min=epsilon)).clamp(min=0, max=alpha)
    return _ram_sum(taus, mask, per_entry, scale)
