"""A PEFT LoRA adapter as the merge's output (``output: {format: peft}``).

Each targeted weight's merged update ΔW (out, in) is written as ``lora_B`` (out, k) and
``lora_A`` (k, in) with ΔW ≈ B A, k = min(rank of ΔW, the requested rank), by an exact SVD of
a factored update or a truncated SVD of a dense one (``specmerge.lowrank.truncate``). Scales are
1: ``lora_alpha`` = r, and every module whose k differs from r has ``rank_pattern`` and
``alpha_pattern`` entries equal to its k. ``modules_to_save`` tensors are written whole. The
relative truncation error of every tensor is in the model card. Written like a checkpoint: in a
hidden partial directory renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from torch import Tensor

from specmerge._version import __version__
from specmerge.errors import OutputError
from specmerge.io.adapter import PREFIX
from specmerge.io.hf_files import INPUTS_NOTE, base_model_id, input_names
from specmerge.io.writer import Identity, Region, atomic_output_dir, write_safetensors, write_text
from specmerge.methods.registry import get_method
from specmerge.plan import Plan, PlanEntry

WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Factors:
    """One targeted weight of the output adapter: ΔW ≈ b @ a, and the relative error of that."""

    b: Tensor  # (out, k)
    a: Tensor  # (k, in)
    error: float

    @property
    def rank(self) -> int:
        return self.b.shape[1]


def module_of(name: str) -> str:
    return name.removesuffix(".weight")


class PeftDirSink:
    """Collects the factors (small) and saved modules, then writes the adapter directory."""

    def __init__(self, out: Path, plan: Plan, *, rank: int, base_path: Path,
                 config_dir: Path | None, fan_in_fan_out: bool,
                 replace: Identity | None = None):
        self.out, self.plan, self.rank = out, plan, rank
        self.base_path, self.config_dir = base_path, config_dir
        self.fan_in_fan_out, self.replace = fan_in_fan_out, replace
        self.factors: dict[str, Factors | None] = {}
        self.saved: dict[str, Tensor] = {}
        self._stack = contextlib.ExitStack()
        self._finished = False

    def __enter__(self) -> PeftDirSink:
        with contextlib.ExitStack() as stack:
            self.tmp = stack.enter_context(atomic_output_dir(self.out, self.replace))
            self._stack = stack.pop_all()
        return self

    def regions(self) -> Mapping[str, Region]:
        return {}  # saved modules are written whole, with the factors, by ``finish``

    def put(self, entry: PlanEntry, result: Factors | Tensor | None) -> None:
        if isinstance(result, Tensor):
            self.saved[entry.name] = result
        else:
            self.factors[entry.name] = result

    def finish(self) -> Path:
        tensors: dict[str, Tensor] = {}
        kept = {n: f for n, f in self.factors.items() if f is not None and f.rank > 0}
        for name, f in kept.items():
            tensors[f"{PREFIX}{module_of(name)}.lora_A.weight"] = f.a.contiguous()
            tensors[f"{PREFIX}{module_of(name)}.lora_B.weight"] = f.b.contiguous()
        for name, t in self.saved.items():
            tensors[f"{PREFIX}{name}"] = t.contiguous()
        if not kept:
            raise OutputError("the merged update is zero on every weight the adapters target: "
                              "there is no adapter to write")
        write_safetensors(self.tmp / WEIGHTS, dict(sorted(tensors.items())),
                          {"specmerge_version": __version__,
                           "merge_method": self.plan.recipe.merge_method})
        write_text(self.tmp / "adapter_config.json",
                   json.dumps(self.config(kept), indent=2, sort_keys=True) + "\n")
        header = f"# Resolved by specmerge {__version__}: every default filled in.\n"
        write_text(self.tmp / "specmerge_recipe.yaml",
                   header + yaml.safe_dump(self.plan.recipe.resolved(), sort_keys=False))
        write_text(self.tmp / "README.md", self.card(kept))
        self._finished = True
        return self.out

    def config(self, kept: dict[str, Factors]) -> dict[str, Any]:
        """adapter_config.json: LoRA with scale 1 on every module (α = its rank)."""
        r = max(f.rank for f in kept.values())
        pattern = {re.escape(module_of(n)): f.rank for n, f in kept.items() if f.rank != r}
        saved = sorted({n.rsplit(".", 1)[0] for n in self.saved})
        return {
            "peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": r,
            "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(module_of(n) for n in kept),
            "modules_to_save": saved or None, "fan_in_fan_out": self.fan_in_fan_out,
            "base_model_name_or_path": str(self.plan.recipe.base_model), "bias": "none",
            "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
            "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
            "layers_pattern": None, "revision": None,
        }

    def card(self, kept: dict[str, Factors]) -> str:
        """The model card: method, rank, and every tensor's relative truncation error."""
        recipe = self.plan.recipe
        method = get_method(recipe.merge_method)
        errors = sorted(((f.error, n, f.rank) for n, f in kept.items()), reverse=True)
        zero = sorted(n for n, f in self.factors.items() if f is None or f.rank == 0)
        cal = f" + `{recipe.calibrate['method']}`" if recipe.calibrate else ""
        base, *experts = input_names(recipe)
        lines = [
            "---", f"base_model: {json.dumps(base_model_id(self.config_dir, self.base_path))}",
            "library_name: peft", f"tags: [merge, specmerge, lora, {recipe.merge_method}]", "---",
            "", f"# LoRA adapter merged with specmerge {__version__}", "",
            f"- **Method:** `{recipe.merge_method}`{cal}: {method.summary} ({method.citation})",
            f"- **Parameters:** `{json.dumps(recipe.recorded_parameters, sort_keys=True)}`",
            f"- **Rank:** at most {self.rank} per weight (each weight: min(rank of its merged "
            f"update, {self.rank})); scale 1 (lora_alpha = rank)",
            f"- **Weights:** {len(kept)} LoRA pairs, {len(self.saved)} saved module tensors",
            "", "## Inputs", "", f"- base: `{base}`",
            *[f"- expert {i + 1}: `{name}` (weight {m.weight})"
              for i, (name, m) in enumerate(zip(experts, recipe.models, strict=True))],
            "", INPUTS_NOTE,
            "", "## Truncation error per weight", "",
            "‖ΔW − B A‖_F / ‖ΔW‖_F, where ΔW is the merged update the full-model output would "
            "add to the base and B, A the stored factors: the truncation, plus the rounding of "
            "the factors' dtype when the update's rank fits.", "",
            "| weight | rank | relative error |", "|---|---:|---:|",
            *[f"| `{n}` | {k} | {e:.3g} |" for e, n, k in errors], "",
        ]
        if zero:
            lines += [f"{len(zero)} targeted weight(s) have a zero merged update and are left "
                      f"out: {', '.join(f'`{n}`' for n in zero)}", ""]
        return "\n".join(lines)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> bool | None:
        if et is None and not self._finished:
            err = OutputError(f"{self.out}: the output was closed before it was finished; "
                              f"nothing was written")
            self._stack.__exit__(OutputError, err, None)
            raise err
        return self._stack.__exit__(et, ev, tb)

