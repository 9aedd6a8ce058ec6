"""The public API, and the one pipeline every entry point runs:

    recipe ──► Source ──► Plan ──► format.entries ──► statistics pre-pass
           ──► format.step(MergeStep) ──► Backend.map ──► format.sink

``merge`` (files), ``merge_state_dicts`` (memory) and ``plan_recipe`` (no tensor read) differ
only in their source and output format. The engine names no method and no format: the plan
names each entry's function, and the format table (``specmerge.formats``) the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from specmerge.backends import Backend
from specmerge.engine.execute import execute
from specmerge.engine.runtime import (
    backend_choice,
    gpu_peak_mb,
    make_backend,
    parse_option_size,
    peak_rss_mb,
    reset_gpu_peak,
    resolve_device,
)
from specmerge.engine.statistics import DEFAULT_BLOCK_SIZE, run_statistics
from specmerge.engine.steps import MergeStep
from specmerge.errors import SpecmergeError
from specmerge.formats import (
    DEFAULT_FORMAT,
    IN_MEMORY_FORMAT,
    STREAM_OPTIONS,
    OutputFormat,
    Target,
    get_format,
    refuse_unused,
)
from specmerge.io.writer import check_output_path, output_path
from specmerge.memory import check_memory, estimate
from specmerge.plan import Plan, build_plan
from specmerge.recipe import Recipe, load_recipe, recipe_files
from specmerge.sources import CheckpointSource, Source, StateDictSource

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = "5GB"
RecipeLike = Recipe | dict[str, Any] | str | Path


@dataclass(frozen=True)
class MergeOptions:
    """How a merge runs. None: the default (or the recipe's). ``dtype``, ``seed``,
    ``output_format`` and ``rank`` override the recipe's. ``block_size`` (default 8MiB) bounds
    each tensor block of the parameters merged in row blocks; ``prefetch`` (default on)
    overlaps their reading, merging and writing; ``shard_size`` (default 5GB) is the largest
    output shard. None of them changes the output's bytes. An option the output format has no
    use for is refused when given. ``backend`` (default: the recipe's, else ``local``):
    ``local`` runs ``workers`` parameters at once on threads; ``ray`` runs tasks on the Ray
    cluster at ``ray_address`` with ``ray_cpus`` CPUs (default: the driver's torch thread
    count) and, on CUDA, ``ray_gpus`` GPUs (default 1) each (docs/cluster.md)."""

    device: str | torch.device = "cpu"
    dtype: str | None = None
    seed: int | None = None
    output_format: str | None = None
    rank: int | None = None
    shard_size: str | int | None = None
    block_size: str | int | None = None
    prefetch: bool | None = None
    workers: int = 1
    force: bool = False
    allow_nonfinite: bool = False
    backend: str | Backend | None = None
    ray_address: str | None = None
    ray_gpus: float | None = None
    ray_cpus: float | None = None
    progress: bool = True

    def given(self) -> list[str]:
        """The streaming options set away from their defaults."""
        return [o for o in STREAM_OPTIONS
                if getattr(self, o) is not None and not (o == "workers" and self.workers == 1)]


@dataclass
class MergeResult:
    out_dir: Path
    seconds: float
    num_tensors: int
    num_params: int
    peak_rss_mb: float
    recipe: Recipe
    counts: dict[str, int] = field(default_factory=dict)
    peak_gpu_mb: float | None = None  # torch.cuda.max_memory_allocated (MiB); None on CPU


def options_of(options: MergeOptions | None, kwargs: Mapping[str, Any]) -> MergeOptions:
    """``options``, or one built from keyword arguments (not both)."""
    if options is not None and kwargs:
        raise TypeError("pass either options=MergeOptions(...) or keyword options, not both")
    try:
        return options if options is not None else MergeOptions(**kwargs)
    except TypeError as err:
        raise TypeError(f"merge: {err}") from None


def merge(recipe: RecipeLike, out_dir: str | Path, options: MergeOptions | None = None,
          **kwargs: Any) -> MergeResult:
    """Merge the recipe's experts into ``out_dir``: a Hugging Face checkpoint, or the recipe's
    ``output`` format (``peft``: a LoRA adapter of at most ``rank`` per weight). ``options``
    (or the same fields as keyword arguments): ``MergeOptions``. The output is written to a
    temporary sibling and renamed into place at the end; inputs are only ever read; the bytes
    never depend on the backend, the workers, the block size or prefetch."""
    opts = options_of(options, kwargs)
    start = time.perf_counter()
    rec = load_recipe(recipe, dtype=opts.dtype, seed=opts.seed, output=output_override(
        recipe, opts.output_format, opts.rank))
    fmt = get_format(rec.output.format if rec.output is not None else DEFAULT_FORMAT)
    refuse_unused(fmt, opts.given())
    max_shard = parse_option_size(opts.shard_size or DEFAULT_SHARD_SIZE,
                                  "shard_size (--shard-size)")
    out = output_path(out_dir)
    backend = make_backend(opts.workers, *backend_choice(
        rec, opts.backend, opts.ray_address, opts.ray_gpus, opts.ray_cpus, str(opts.device)))
    dev = resolve_device(opts.device, backend.remote)
    reset_gpu_peak(dev, backend)
    source = CheckpointSource.from_recipe(rec, opts.allow_nonfinite)
    claim = check_output_path(out, [*source.paths, *recipe_files(recipe)], opts.force)
    fmt.check(rec, source)
    backend.check_files(source.input_files(), "input")
    plan, entries = run(rec, source, fmt, backend, dev, opts, Target(out, claim, max_shard),
                        memory=not backend.remote)  # a Ray task's memory is checked by Ray
    seconds = time.perf_counter() - start
    peak, gpu = peak_rss_mb(), gpu_peak_mb(dev, backend)
    log.info("wrote %s in %.1f s (peak RSS %.0f MB%s)", out, seconds, peak,
             "" if gpu is None else f", GPU peak {gpu:.0f} MB")
    return MergeResult(out, seconds, len(entries), sum(e.numel for e in entries), peak, rec,
                       plan.counts(), gpu)


def run(rec: Recipe, source: Source, fmt: OutputFormat, backend: Backend, dev: str,
        opts: MergeOptions, target: Target, memory: bool = False) -> tuple[Plan, Any]:
    """The pipeline from a checked source to a finished output: plan, the format's entries,
    the statistics pre-pass, the format's step through the backend into its sink. Returns the
    plan and the sink's ``finish()`` (an output path, or a state dict)."""
    block = parse_option_size(opts.block_size or DEFAULT_BLOCK_SIZE, "block_size (--block-size)")
    prefetch = True if opts.prefetch is None else opts.prefetch
    plan = plan_of(rec, source)
    entries = fmt.entries(plan, source)
    if memory:
        check_memory(estimate(plan, block_size=block, workers=opts.workers, prefetch=prefetch,
                              entries=entries))
    log.info("%s on %s", fmt.describe(plan, entries, source), dev)
    progress = opts.progress and fmt.writes_files
    stats = run_statistics(plan, source, backend, dev, progress, block, prefetch)
    step = fmt.step(MergeStep(plan.calibration, stats, dev, plan.compute_dtype,
                              opts.allow_nonfinite, block, prefetch), plan, source)
    done = execute(step, entries, source, backend, fmt.sink(plan, source, target),
                   desc=fmt.desc, progress=progress, writes_files=fmt.writes_files)
    return (plan, entries) if fmt.writes_files else (plan, done)


def output_override(recipe: RecipeLike, output_format: str | None,
                    rank: int | None) -> dict[str, Any] | None:
    """The recipe's ``output`` with the caller's format and rank laid over it (None: as is)."""
    if output_format is None and rank is None:
        return None
    current = load_recipe(recipe).output
    spec = current.model_dump() if current is not None else {}
    if output_format is not None:
        spec["format"] = output_format
    if rank is not None:
        spec["rank"] = rank
    return spec


def plan_of(recipe: Recipe, source: Source) -> Plan:
    """``build_plan`` with everything the source knows: index, roles, union vocabulary rows.
    The sources read an entry's inputs by its own name in every model; a plan that takes
    them elsewhere is refused by name, except copies of one input (layer slices)."""
    if recipe.space != "full":  # Core Space, KnOTS: every expert a LoRA adapter
        experts = source.experts if isinstance(source, CheckpointSource) else None
        if experts is None:
            raise SpecmergeError(f"space {recipe.space!r} merges LoRA adapters' factors; "
                                 f"in-memory state dicts hold dense task vectors: use space: full")
        for i, e in enumerate(experts):
            if not e.targets:
                raise SpecmergeError(f"space {recipe.space!r}: models[{i}] ({e.path}) is not a "
                                     f"LoRA adapter; a {recipe.space} merge needs every expert's "
                                     f"LoRA factors (use space: full)")
    plan = build_plan(recipe, source.index(), source.model_info(), source.vocab_rows)
    moved = [e for e in plan.entries if e.copies_one]
    for e in plan.entries:
        if not (e.same_inputs or e.copies_one):
            raise SpecmergeError(f"tensor {e.name!r}: its plan takes inputs from other tensors "
                                 f"({e.inputs}), which the sources cannot read yet")
    if moved:
        check_refs = getattr(source, "check_refs", None)
        if check_refs is None:
            raise SpecmergeError("slices copy tensors from checkpoints on disk; in-memory state "
                                 "dicts cannot be sliced")
        check_refs(moved)
    return plan


def plan_recipe(recipe: RecipeLike) -> Plan:
    """The plan a merge of ``recipe`` would run (headers and config.json only, no tensor)."""
    rec = load_recipe(recipe)
    return plan_of(rec, CheckpointSource.from_recipe(rec))


def merge_state_dicts(recipe: Recipe | dict[str, Any], base: Mapping[str, Tensor],
                      experts: Sequence[Mapping[str, Tensor]], *, device: str = "cpu",
                      workers: int = 1, allow_nonfinite: bool = False,
                      config: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """In-memory merge of state dicts with the same plan, maths and bytes as ``merge``.

    For research code that already holds tensors; the recipe's paths are ignored. The inputs
    are never modified. ``config`` (the model's config.json as a dict) gives parameter roles,
    e.g. GPT-2's Conv1D weights; without it roles come from names and shapes.
    """
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(
        {"base_model": "<memory>", "models": [f"<memory:{i}>" for i in range(len(experts))],
         **{k: v for k, v in recipe.items() if k not in ("base_model", "models")}})
    if rec.num_experts != len(experts):
        raise SpecmergeError(f"the recipe lists {rec.num_experts} experts but "
                             f"{len(experts)} state dicts were given")
    source = StateDictSource(base, experts, allow_nonfinite, config)
    opts = MergeOptions(device=device, workers=workers, allow_nonfinite=allow_nonfinite,
                        progress=False)
    fmt = get_format(IN_MEMORY_FORMAT)
    _, result = run(rec, source, fmt, make_backend(workers), resolve_device(device), opts,
                    Target(None))
    return dict(result)


__all__ = ["DEFAULT_BLOCK_SIZE", "MergeOptions", "MergeResult", "merge",
           "merge_state_dicts", "plan_of", "plan_recipe", "run"]
