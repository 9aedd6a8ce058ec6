"""PEFT's own LoRA merges, as peer rows of ``specmerge bench text8 --experts lora``.

PEFT merges adapters with ``LoraModel.add_weighted_adapter(adapters, weights, adapter_name,
combination_type, svd_rank, density, majority_sign_method)`` (peft ``tuners/lora/model.py``):

- ``svd``: the weighted sum Σ w_i s_i B_i A_i of each weight, truncated by an SVD to
  ``svd_rank`` (default: the largest rank of the merged adapters, here r = 8);
- ``cat``: the factors concatenated, rank Σ r_i, exactly Σ w_i s_i B_i A_i;
- ``linear``: A = Σ √(w_i s_i) A_i and B = Σ √(w_i s_i) B_i, so that B A carries cross terms
  B_i A_j (PEFT's docs call it "a very rough approximation"); equal ranks only;
- ``ties`` and ``dare_ties``: TIES (arXiv:2306.01708) and DARE + TIES (arXiv:2311.03099)
  applied to the A factors and to the B factors separately, with ``density``; equal ranks only.

The row at PEFT's documented defaults uses the function's defaults (``svd_rank=None``,
``majority_sign_method="total"``), weight 1.0 per adapter (``weights`` has no default; 1.0 is
the unweighted sum of the PEFT model-merging guide) and ``density = 0.2``, the value of every
TIES and DARE-TIES example for LoRA adapters in that guide
(docs/source/developer_guides/model_merging.md). The ``@val`` rows sweep a common weight
λ = w_i over the bench's λ grid on validation, like the ``@val`` rows of the methods.

The merged update of each targeted weight is read with ``LoraLayer.get_delta_weight`` and added
to the base weight, which is what ``merge_and_unload`` writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from . import text8 as T

log = logging.getLogger(__name__)

COMBINATIONS = ("svd", "linear", "cat", "ties", "dare_ties")
PREFIX = "peft_"
DEFAULT_DENSITY = 0.2
DEFAULT_WEIGHT = 1.0


def is_peft_row(row: str) -> bool:
    return row.startswith(PREFIX)


def combination(row: str) -> str:
    """``peft_dare_ties@val`` → ``dare_ties``; a clear error for an unknown one."""
    name = row.split("@")[0].removeprefix(PREFIX)
    if name not in COMBINATIONS:
        raise T.BenchError(f"unknown PEFT row {row!r}: the PEFT rows are "
                           f"{[PREFIX + c for c in COMBINATIONS]}, optionally with '@val'")
    return name


def merge_kwargs(comb: str, weight: float, k: int) -> dict:
    """add_weighted_adapter's arguments for one row: K equal weights, and density where the
    combination prunes."""
    kw: dict = {"weights": [weight] * k, "combination_type": comb}
    if comb in ("ties", "dare_ties"):
        kw["density"] = DEFAULT_DENSITY
    return kw


class PeftMerger:
    """The base model with the K LoRA experts loaded as named adapters ``e0 … e{K-1}``;
    ``loader(dir)`` returns (model, tokenizer): text8's encoder by default."""

    def __init__(self, base: Path, adapters: Sequence[Path], loader: Callable | None = None):
        peft = T.import_peft()
        model, _ = (loader or T.load_encoder)(base)
        self.names = [f"e{i}" for i in range(len(adapters))]
        self.model = peft.PeftModel.from_pretrained(model, str(adapters[0]),
                                                    adapter_name=self.names[0])
        for name, path in zip(self.names[1:], adapters[1:], strict=True):
            self.model.load_adapter(str(path), adapter_name=name)
        self._count = 0

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        inner = self.model.base_model.model
        for name, module in inner.named_modules():
            if isinstance(module, LoraLayer):
                yield name, module

    def deltas(self, adapter: str) -> dict[str, Tensor]:
        """Δ = s B A of one loaded adapter, per targeted weight name (base keys)."""
        return {f"{name}.weight": m.get_delta_weight(adapter).detach().clone()
                for name, m in self._lora_layers() if adapter in m.lora_A}

    def merged_deltas(self, kwargs: dict, seed: int = 0) -> tuple[dict[str, Tensor], float]:
        """add_weighted_adapter with ``kwargs``; the merged Δ per weight and the seconds it took
        (the merged adapter is deleted again)."""
        name = f"merged{self._count}"
        self._count += 1
        torch.manual_seed(seed)  # DARE's random drop
        t0 = time.perf_counter()
        with torch.no_grad():
            self.model.add_weighted_adapter(self.names, adapter_name=name, **kwargs)
            out = self.deltas(name)
        secs = time.perf_counter() - t0
        self.model.delete_adapter(name)
        return out, secs


def apply_deltas(model, base_state: dict[str, Tensor], deltas: dict[str, Tensor]) -> None:
    """Set ``model``'s weights to θ0 + Δ for the weights in ``deltas`` (θ0 elsewhere)."""
    own = model.state_dict()
    unknown = [k for k in deltas if k not in own]
    if unknown:
        raise T.BenchError(f"PEFT merge produced weights the model lacks: {unknown[:3]}")
    with torch.no_grad():
        for k, v in own.items():
            if k in base_state:
                v.copy_(base_state[k])
        for k, d in deltas.items():
            own[k].add_(d.to(own[k].dtype))
