"""A full Hugging Face checkpoint (the default): safetensors shards pre-allocated and written
at fixed offsets, row blocks straight into place, with the base's side files and a model card
(``specmerge.io.sinks.HFDirSink``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from specmerge.errors import SpecmergeError
from specmerge.formats import Format, Target
from specmerge.io.chat_template import resolve_chat_template
from specmerge.io.hf_files import check_auto_map
from specmerge.io.sinks import HFDirSink
from specmerge.plan import Plan, PlanEntry
from specmerge.recipe import Recipe


@dataclass(frozen=True)
class HFFormat(Format):
    name: str = "hf"  # it streams: every option applies

    def check(self, recipe: Recipe, source: Any) -> None:
        check_auto_map(source.config_dir)
        tokenizer = source.tokenizer_dir or source.config_dir
        if recipe.chat_template is not None and (
                tokenizer is None or not (tokenizer / "tokenizer_config.json").is_file()):
            raise SpecmergeError(f"chat_template: {tokenizer} has no tokenizer_config.json to "
                                 f"write it into (the output's tokenizer comes from there)")

    def sink(self, plan: Plan, source: Any, target: Target) -> HFDirSink:
        assert target.out is not None and target.max_shard_bytes is not None
        template = plan.recipe.chat_template
        return HFDirSink(target.out, plan, base_path=source.base.path,
                         config_dir=source.config_dir, max_shard_bytes=target.max_shard_bytes,
                         replace=target.claim, vocabulary=source.union,
                         tokenizer_dir=source.tokenizer_dir,
                         chat_template=None if template is None else resolve_chat_template(
                             template, source.config_dirs))

    def describe(self, plan: Plan, entries: Sequence[PlanEntry], source: Any) -> str:
        return f"merging {len(entries)} tensors ({plan.counts()}) with {plan.recipe.merge_method}"


FORMAT = HFFormat()
