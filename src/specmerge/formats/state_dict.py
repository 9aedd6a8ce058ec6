"""An in-memory state dict (``merge_state_dicts``), in the plan's order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from specmerge.formats import Target
from specmerge.io.sinks import StateDictSink
from specmerge.plan import Plan, PlanEntry
from specmerge.recipe import Recipe

IN_MEMORY = "the tensors are in memory and merged whole"


@dataclass(frozen=True)
class StateDictFormat:
    name: str = "state_dict"
    desc: str = "merging"
    writes_files: bool = False
    refuses: dict[str, str] = field(default_factory=lambda: {
        "block_size": IN_MEMORY, "prefetch": IN_MEMORY, "shard_size": "nothing is written"})

    def check(self, recipe: Recipe, source: Any) -> None:
        """Any recipe: state dicts hold no adapters and no tokenizer."""

    def entries(self, plan: Plan, source: Any) -> Sequence[PlanEntry]:
        return plan.entries

    def step(self, merge: Any, plan: Plan, source: Any) -> Any:
        return merge

    def sink(self, plan: Plan, source: Any, target: Target) -> StateDictSink:
        return StateDictSink(plan)

    def describe(self, plan: Plan, entries: Sequence[PlanEntry], source: Any) -> str:
        return f"merging {len(entries)} state-dict tensors with {plan.recipe.merge_method}"


FORMAT = StateDictFormat()
