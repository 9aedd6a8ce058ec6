"""An in-memory state dict (``merge_state_dicts``), in the plan's order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from specmerge.formats import Format, Target
from specmerge.io.sinks import StateDictSink
from specmerge.plan import Plan, PlanEntry

IN_MEMORY = "the tensors are in memory and merged whole"


@dataclass(frozen=True)
class StateDictFormat(Format):
    name: str = "state_dict"
    writes_files: bool = False
    refuses: Mapping[str, str] = field(default_factory=lambda: {
        "block_size": IN_MEMORY, "prefetch": IN_MEMORY, "shard_size": "nothing is written"})

    def sink(self, plan: Plan, source: Any, target: Target) -> StateDictSink:
        return StateDictSink(plan)

    def describe(self, plan: Plan, entries: Sequence[PlanEntry], source: Any) -> str:
        return f"merging {len(entries)} state-dict tensors with {plan.recipe.merge_method}"


FORMAT = StateDictFormat()
