"""Sinks: where merged tensors go. Each receives (entry, tensor) pairs in any order.

A sink is a context manager: entering claims the destination, ``put`` places one result by its
entry, ``finish`` completes the output once every entry is in, and leaving without ``finish``
(an error, Ctrl-C) leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from torch import Tensor

from specmerge._version import __version__
from specmerge.errors import OutputError
from specmerge.io.chat_template import write_chat_template
from specmerge.io.hf_files import main_dtype, model_card, write_side_files
from specmerge.io.tokenizer import VocabularyUnion, write_union_tokenizer
from specmerge.io.writer import (
    Identity,
    OutTensor,
    Region,
    ShardedWriter,
    atomic_output_dir,
    write_text,
)
from specmerge.plan import Plan, PlanEntry


@dataclass(frozen=True)
class Written:
    """A step's result when the step wrote the entry's rows itself, through the sink's
    ``regions()`` (a parameter merged in row blocks)."""

    name: str


class HFDirSink:
    """A Hugging Face directory: pre-allocated safetensors shards written at fixed offsets, the
    shard index, the base's config and tokenizer files, the resolved recipe and a model card,
    all in a hidden partial directory that is renamed into place by ``finish``."""

    def __init__(self, out: Path, plan: Plan, *, base_path: Path, config_dir: Path | None,
                 max_shard_bytes: int, replace: Identity | None = None,
                 vocabulary: VocabularyUnion | None = None, tokenizer_dir: Path | None = None,
                 chat_template: str | None = None):
        self.out, self.plan = out, plan
        self.base_path, self.config_dir = base_path, config_dir
        self.max_shard_bytes, self.replace = max_shard_bytes, replace
        self.vocabulary = vocabulary
        self.tokenizer_dir, self.chat_template = tokenizer_dir, chat_template
        self._stack = contextlib.ExitStack()
        self._finished = False

    def __enter__(self) -> HFDirSink:
        with contextlib.ExitStack() as stack:
            self.tmp = stack.enter_context(atomic_output_dir(self.out, self.replace))
            specs = [OutTensor(e.name, e.out_shape, e.out_dtype) for e in self.plan.entries]
            self.writer = ShardedWriter(
                self.tmp, specs, self.max_shard_bytes,
                metadata={"specmerge_version": __version__,
                          "merge_method": self.plan.recipe.merge_method})
            stack.callback(self.writer.close)
            self._stack = stack.pop_all()
        return self

    def regions(self) -> Mapping[str, Region]:
        """Where each tensor's bytes go: a step may write a parameter's row blocks there itself
        and return ``Written``. Valid once the sink is entered."""
        return {name: self.writer.region(name) for name in self.writer.slots}

    def put(self, entry: PlanEntry, tensor: Tensor | Written) -> None:
        if isinstance(tensor, Written):
            self.writer.mark_written(entry.name)
        else:
            self.writer.write(entry.name, tensor)

    def finish(self) -> Path:
        weight_map = self.writer.finish()
        self.writer.close()
        self.writer.write_index(weight_map)
        out_dtype = main_dtype([(e.shape, e.out_dtype) for e in self.plan.entries])
        write_side_files(self.tmp, self.config_dir, self.plan.recipe, out_dtype,
                         self.plan.num_layers, self.tokenizer_dir)
        if self.vocabulary is not None:
            rows = max(e.out_rows or 0 for e in self.plan.entries)
            write_union_tokenizer(self.tmp, self.vocabulary, rows)
        if self.chat_template is not None:
            write_chat_template(self.tmp, self.chat_template)
        write_text(self.tmp / "README.md",
                   model_card(self.plan, self.base_path, self.config_dir))
        self._finished = True
        return self.out

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> bool | None:
        if et is None and not self._finished:  # never rename an unfinished directory into place
            err = OutputError(f"{self.out}: the output was closed before it was finished; "
                              f"nothing was written")
            self._stack.__exit__(OutputError, err, None)
            raise err
        return self._stack.__exit__(et, ev, tb)


class CollectingSink:
    """Keeps every result in memory; ``ordered()`` gives them in the plan's order."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.results: dict[str, Any] = {}

    def __enter__(self) -> Any:
        return self

    def regions(self) -> Mapping[str, Region]:
        return {}  # results are kept whole

    def put(self, entry: PlanEntry, result: Any) -> None:
        self.results[entry.name] = result

    def ordered(self) -> dict[str, Any]:
        return {e.name: self.results[e.name] for e in self.plan.entries if e.name in self.results}

    def __exit__(self, *exc: Any) -> None:
        return None


class StateDictSink(CollectingSink):
    """An in-memory state dict, in the plan's order (``merge_state_dicts``)."""

    def finish(self) -> dict[str, Tensor]:
        return self.ordered()
