"""Passthrough: an output assembled from chosen layers of chosen models, copied as they are."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from specmerge.methods.registry import register


@register(
    "passthrough",
    family="elementwise",
    summary="Copy layers as they are: the output's layers are the recipe's 'slices' (layer "
            "ranges of chosen models, in order), its other tensors those of the first and "
            "last slice's model.",
    citation="mergekit 0.1.5 (mergekit/merge_methods/passthrough.py, mergekit/plan.py); "
             "layer stacking as in SOLAR 10.7B's depth up-scaling, arXiv 2312.15166",
    docs={},
    notes="needs 'slices' (a mergekit recipe's slices with layer_range); every tensor is a copy "
          "of one input tensor, read whole (a copy does no arithmetic, so there is nothing to "
          "stream); config.json's layer count is the output's",
)
def passthrough(task_vectors: Sequence[Tensor]) -> Tensor:
    """τ = τ_1: the one model's tensor (θ0 + τ_1 = θ_1). The plan of a recipe with slices
    copies each output tensor from its input directly; this is the same rule per tensor."""
    if len(task_vectors) != 1:
        raise ValueError(f"passthrough copies one model's tensor, got {len(task_vectors)}")
    return task_vectors[0].clone()
