"""Output formats, a table like the methods: each is one object behind ``OutputFormat``,
registered by name in ``FORMATS``. Adding a format adds one file here and one line below.

A format says what the merge must satisfy (``check``), which plan entries it writes
(``entries``), the step that computes each one's result from the shared merge step (``step``:
dense tensors, factors, row blocks), the sink that writes them (``sink``), and which of the
merge's streaming options it has no use for (``refuses``, with the reason); the engine refuses
such an option when it is given, so that none is ever silently ignored.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from specmerge.errors import SpecmergeError
from specmerge.io.writer import Identity
from specmerge.plan import Plan, PlanEntry
from specmerge.recipe import Recipe

# name → module that defines ``FORMAT``; imported when asked for
FORMATS: dict[str, str] = {
    "hf": "specmerge.formats.hf",
    "peft": "specmerge.formats.peft",
    "state_dict": "specmerge.formats.state_dict",
}
DEFAULT_FORMAT = "hf"  # a recipe without ``output``
IN_MEMORY_FORMAT = "state_dict"  # merge_state_dicts
# the options a format may refuse, by their Python name (the CLI's flag in brackets)
STREAM_OPTIONS = {"block_size": "--block-size", "prefetch": "--no-prefetch",
                  "shard_size": "--shard-size", "workers": "--workers"}


@dataclass(frozen=True)
class Target:
    """Where a sink writes: the output directory (None in memory), the previous output it may
    replace (``--force``), and the largest shard in bytes."""

    out: Path | None
    claim: Identity | None = None
    max_shard_bytes: int | None = None


class OutputFormat(Protocol):
    name: str
    desc: str  # the progress bar's label
    writes_files: bool
    refuses: Mapping[str, str]  # option → why this format has no use for it

    def check(self, recipe: Recipe, source: Any) -> None: ...

    def entries(self, plan: Plan, source: Any) -> Sequence[PlanEntry]: ...

    def step(self, merge: Any, plan: Plan, source: Any) -> Any: ...

    def sink(self, plan: Plan, source: Any, target: Target) -> Any: ...

    def describe(self, plan: Plan, entries: Sequence[PlanEntry], source: Any) -> str: ...


@dataclass(frozen=True)
class Format:
    """The defaults a format overrides: every entry, the merge step as it is, no check."""

    name: str = ""
    desc: str = "merging"
    writes_files: bool = True
    refuses: Mapping[str, str] = field(default_factory=dict)

    def check(self, recipe: Recipe, source: Any) -> None:
        """Nothing to check."""

    def entries(self, plan: Plan, source: Any) -> Sequence[PlanEntry]:
        return plan.entries

    def step(self, merge: Any, plan: Plan, source: Any) -> Any:
        return merge


def get_format(name: str) -> OutputFormat:
    """The registered format ``name``; an unknown one is an error listing the known ones."""
    if name not in FORMATS:
        raise SpecmergeError(f"unknown output format {name!r}; choose one of "
                             f"{', '.join(sorted(FORMATS))}")
    fmt: OutputFormat = importlib.import_module(FORMATS[name]).FORMAT
    return fmt


def refuse_unused(fmt: OutputFormat, given: Sequence[str]) -> None:
    """Raise if an option in ``given`` (set by the caller) is one ``fmt`` has no use for."""
    for option in given:
        if option in fmt.refuses:
            raise SpecmergeError(f"{option} ({STREAM_OPTIONS[option]}) does not apply to output "
                                 f"format {fmt.name}: {fmt.refuses[option]}")
