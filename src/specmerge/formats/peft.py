"""A PEFT LoRA adapter of the merged update (``output: {format: peft}``): every expert is an
adapter; only the weights they target (written as factors) and save (``modules_to_save``,
written whole) are computed (``specmerge.io.peft_out.PeftDirSink``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from specmerge.engine.steps import MergeStep
from specmerge.engine.update import run_method
from specmerge.errors import MergeError, NonFiniteError, SpecmergeError
from specmerge.formats import Format, Target
from specmerge.io.peft_out import Factors, PeftDirSink
from specmerge.linalg import is_finite, parse_dtype
from specmerge.lowrank import LowRank, is_zero, truncate
from specmerge.plan import Plan, PlanEntry
from specmerge.recipe import Recipe
from specmerge.sources import Source

WHOLE = ("a targeted weight's update is formed from its adapters' whole factors, and a saved "
         "module is merged whole: there are no row blocks")


@dataclass(frozen=True)
class AdapterStep:
    """One weight of a PEFT-adapter output: the factors of a targeted weight's merged update
    (None when it is zero), or a saved module's merged tensor. Targeted weights read no base
    weight: their τ_i are the adapters' factors."""

    merge: MergeStep
    rank: int
    factor_dtype: torch.dtype
    fan_in_fan_out: bool

    def __call__(self, entry: PlanEntry, source: Source) -> Factors | Tensor | None:
        if source.needs_base(entry.name):  # a saved module: the full merged tensor
            return self.merge(entry, source)
        method = self.merge.method_of(entry)
        uses_base = method is not None and method.uses_base
        tv = source.task_vectors(entry.name, torch.device(self.merge.device),
                                 self.merge.compute_dtype, factored=True, base=uses_base)
        if all(is_zero(t) for t in tv.taus):
            return None
        update = run_method(entry, tv.taus, self.merge.calibration, self.merge.statistics,
                            base=tv.theta0)
        if self.fan_in_fan_out:  # stored (in, out): PEFT's factors are of the (out, in) matrix
            update = update.mT
        parts = (update.core, update.b, update.a) if isinstance(update, LowRank) else (update,)
        for part in parts:
            if part is not None and not is_finite(part):
                raise NonFiniteError(f"the merged update of {entry.name!r} holds NaN/Inf; a "
                                     f"LoRA adapter of it cannot be written (write a full "
                                     f"model, output format hf, to keep it)")
        try:
            b, a, error = truncate(update, self.rank, self.factor_dtype)
        except Exception as err:
            raise MergeError(f"the SVD of the merged update of {entry.name!r} (shape "
                             f"{list(entry.shape)}) failed: {err}") from err
        return Factors(b.to("cpu"), a.to("cpu"), error)


@dataclass(frozen=True)
class PeftFormat(Format):
    name: str = "peft"
    desc: str = "merging (LoRA)"
    refuses: Mapping[str, str] = field(default_factory=lambda: {
        "block_size": WHOLE, "prefetch": WHOLE,
        "shard_size": "an adapter is written as one file, adapter_model.safetensors"})

    def check(self, recipe: Recipe, source: Any) -> None:
        for i, e in enumerate(source.experts):
            if e.kind != "adapter":
                raise SpecmergeError(f"output format peft needs every expert to be a LoRA "
                                     f"adapter; models[{i}] ({e.path}) is a full checkpoint. "
                                     f"Write a full model (output format hf) instead")
        if source.union is not None:
            raise SpecmergeError("output format peft keeps the base's vocabulary; remove "
                                 "'tokenizer: {source: union}'")
        if recipe.chat_template is not None or source.tokenizer_dir is not None:
            raise SpecmergeError("output format peft writes no tokenizer; remove "
                                 "'chat_template' and a tokenizer source other than the base")
        if len({e.fan_in_fan_out for e in source.experts}) > 1:
            raise SpecmergeError("the adapters disagree on fan_in_fan_out (the weights' "
                                 "layout); merge them to a full model (output format hf) "
                                 "instead")
        if not any(e.ranks for e in source.experts):
            raise SpecmergeError("output format peft: the adapters have no LoRA factors (only "
                                 "modules_to_save); write a full model (output format hf) "
                                 "instead")

    def rank(self, recipe: Recipe, source: Any) -> int:
        """The output's largest rank: the recipe's, else the largest among the adapters."""
        assert recipe.output is not None
        return recipe.output.rank or max(r for e in source.experts for r in e.ranks)

    def entries(self, plan: Plan, source: Any) -> Sequence[PlanEntry]:
        targets = {n for e in source.experts for n in (*e.targets, *e.saved)}
        return [e for e in plan.entries if e.name in targets]

    def step(self, merge: MergeStep, plan: Plan, source: Any) -> AdapterStep:
        rec = plan.recipe
        factor_dtype = (parse_dtype(rec.out_dtype) if rec.out_dtype
                        else source.experts[0].factor_dtype)
        return AdapterStep(merge, self.rank(rec, source), factor_dtype,
                           source.experts[0].fan_in_fan_out)

    def sink(self, plan: Plan, source: Any, target: Target) -> PeftDirSink:
        assert target.out is not None
        return PeftDirSink(target.out, plan, rank=self.rank(plan.recipe, source),
                           base_path=source.base.path, config_dir=source.config_dir,
                           fan_in_fan_out=source.experts[0].fan_in_fan_out,
                           replace=target.claim)

    def describe(self, plan: Plan, entries: Sequence[PlanEntry], source: Any) -> str:
        saved = {n for e in source.experts for n in e.saved}
        return (f"merging {source.num_experts} adapters into a LoRA adapter of rank <= "
                f"{self.rank(plan.recipe, source)}: {sum(e.name not in saved for e in entries)} "
                f"targeted weights, {sum(e.name in saved for e in entries)} saved tensors, with "
                f"{plan.recipe.merge_method}")


FORMAT = PeftFormat()
