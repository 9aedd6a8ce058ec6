"""``scaling: auto``: specmerge's data-free rule for the WUDI family's outer scale.

This is **our rule, not the papers'** (docs/presets.md, "scaling: auto"). The official SWUDI code
multiplies its result by a hand-set ``scaling``: 1 for CLIP full fine-tunes, 0.1 for InternVL,
and 1/N for its Qwen2-VL LoRA experts, with the comment that the sum start yields about N times
a task's update (WalkerWorldPeace/MLLMerging@5f8a458; the presets in ``presets.py`` cite the
files). The rule chooses that factor per matrix from the task vectors alone:

    s* = argmin_s Σ_i w_i ‖s τ − τ_i‖²  =  Σ_i w_i ⟨τ, τ_i⟩ / (‖τ‖² Σ_i w_i),   w_i = 1 / ‖τ_i‖²

clipped to [0, 1]: the scale that brings the merged update τ closest, in the mean over tasks
of each task's relative error, to every expert's own update. It applies **only where C =
Σ w_i τ_iᵀ τ_i is rank-deficient** (its significant eigenvalues fewer than n: the low-rank, LoRA
regime, where the WUDI solution delivers every task at full strength on its own input space);
where C has full rank the scale is 1, the official setting for full fine-tunes (CLIP, Llama).
That regime switch was added after measuring: applied everywhere, the rule cost full-rank
SWUDI 11 points on text8 (docs/results/text8_lora.md). It never amplifies (s ≤ 1), it is
invariant to the τ_i's common scale, and it reproduces the official cases it was built for:

- τ = Σ τ_i of K mutually orthogonal task vectors of equal norm: s* = 1/K (the 1/N of the
  Qwen2-VL LoRA setting);
- τ = the mean of the τ_i, or any τ_i when all are equal: s* = 1 (nothing to undo).

Inner products in a factored space (``lowrank.Space``, orthonormal bases) equal the dense ones,
so the rule runs on the cores as the methods do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from specmerge.methods.registry import SCALING, AnyOf, Options

AUTO = "auto"
Scaling = float | Literal["auto"]
# a method's ``scaling``: a number (as every method's) or "auto"
SCALING_OR_AUTO = AnyOf((SCALING, Options((AUTO,))))
SCALING_AUTO_DOC = ("multiplies the result; 'auto': specmerge's data-free rule (not the "
                    "papers'), per matrix where C is rank-deficient (LoRA experts) the s in "
                    "[0, 1] that brings s·τ closest to every task's own update, else 1 "
                    "(docs/presets.md)")
_TINY = 1e-30


def auto_scale(merged: Tensor, task_vectors: Sequence[Tensor]) -> float:
    """s* = clip(Σ_i w_i ⟨τ, τ_i⟩ / (‖τ‖² Σ_i w_i), 0, 1) with w_i = 1 / ‖τ_i‖², summed in
    float64; tasks with ‖τ_i‖ = 0 are left out, and a zero τ (or no task left) gives 1."""
    m = merged.to(torch.float64)
    norm2 = float(m.square().sum())
    num = den = 0.0
    for t in task_vectors:
        t64 = t.to(torch.float64)
        tn2 = float(t64.square().sum())
        if tn2 > _TINY:
            num += float((m * t64).sum()) / tn2
            den += 1.0 / tn2
    if norm2 <= _TINY or den == 0.0:
        return 1.0
    return min(1.0, max(0.0, num / (norm2 * den)))


def resolve_scaling(scaling: Any, merged: Tensor, task_vectors: Sequence[Tensor],
                    low_rank: bool) -> float:
    """``scaling`` itself; for "auto", the rule's s* where C is rank-deficient (``low_rank``:
    the tasks' rows do not span the layer's inputs), else 1 (the official full-rank scale)."""
    if scaling != AUTO:
        return float(scaling)
    return auto_scale(merged, task_vectors) if low_rank else 1.0
