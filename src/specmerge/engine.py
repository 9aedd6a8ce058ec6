"""The engine: plan every parameter, stream base and experts one tensor at a time, write.

Per parameter: load θ0 and θ1..θK → τ_i = θ_i − θ0 (compute dtype) → method → [calibration]
→ θ0 + τ → cast → shard writer. Only the tensors of the parameters in flight are in memory:
about (K + 3) × the parameter's size per worker, whatever the model size.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import Tensor
from tqdm.auto import tqdm

from specmerge import __version__
from specmerge.errors import MergeError, NonFiniteError, OutputError, SpecmergeError
from specmerge.io.checkpoint import Checkpoint, check_compatible
from specmerge.io.writer import (
    OutTensor,
    ShardedWriter,
    atomic_output_dir,
    check_output_path,
    parse_size,
    write_text,
)
from specmerge.linalg import compute_dtype, dtype_name, parse_dtype
from specmerge.methods.elementwise import (
    AbsKthSelector,
    task_arithmetic,
    trim_count,
    weight_average,
)
from specmerge.methods.registry import Method, get_method
from specmerge.recipe import Recipe, Scope, load_recipe

log = logging.getLogger(__name__)

Action = Literal["method", "fallback", "copy"]
# files copied from the base directory next to the weights
SIDE_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|vocab\..*|"
    r"merges\.txt|added_tokens\.json|spiece\.model|sentencepiece.*\.model|chat_template.*|"
    r"preprocessor_config\.json)$")


@dataclass(frozen=True)
class PlanEntry:
    """What happens to one parameter: the method, its scope fallback, or a plain copy."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    action: Action
    calibrate: bool


@dataclass
class MergeResult:
    out_dir: Path
    seconds: float
    num_tensors: int
    num_params: int
    peak_rss_mb: float
    recipe: Recipe
    counts: dict[str, int] = field(default_factory=dict)


def is_matrix_param(name: str, shape: Sequence[int], dtype: torch.dtype, scope: Scope) -> bool:
    """2-D floating tensors whose name matches none of the scope's exclusion patterns."""
    if len(shape) != 2 or not dtype.is_floating_point:
        return False
    for pat in scope.exclude:
        if pat.startswith("re:"):
            if re.search(pat[3:], name):
                return False
        elif pat in name:
            return False
    return True


def build_plan(recipe: Recipe, base: Checkpoint) -> list[PlanEntry]:
    method = get_method(recipe.merge_method)
    out_override = parse_dtype(recipe.out_dtype) if recipe.out_dtype else None
    plan = []
    for name, info in base.infos.items():
        floating = info.dtype.is_floating_point
        matrix = is_matrix_param(name, info.shape, info.dtype, recipe.scope)
        if not floating:
            action: Action = "copy"
        elif method.matrix_only and not matrix:
            action = "fallback"
        else:
            action = "method"
        out_dtype = out_override if (out_override is not None and floating) else info.dtype
        plan.append(PlanEntry(name, info.shape, out_dtype, action,
                              calibrate=recipe.calibrate is not None and matrix))
    return plan


def parameter_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed from (recipe seed, parameter name, expert index): order-independent."""
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _engine_kwargs(method: Method, recipe: Recipe, name: str,
                   thresholds: Mapping[str, Any] | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(recipe.parameters)
    if method.uses_weights:
        kwargs["weights"] = [m.weight for m in recipe.models]
    if method.uses_rng:
        kwargs["generators"] = [torch.Generator().manual_seed(parameter_seed(recipe.seed, name, i))
                                for i in range(recipe.num_experts)]
    if thresholds is not None:
        kwargs["thresholds"] = thresholds["per_task"]
    return kwargs


def merge_update(entry: PlanEntry, task_vectors: list[Tensor], recipe: Recipe,
                 thresholds: Mapping[str, Any] | None = None) -> Tensor:
    """The merged update τ of one parameter (method or fallback, then calibration)."""
    if entry.action == "fallback":
        fb = recipe.scope.fallback
        weights = [m.weight for m in recipe.models]
        if fb == "average":
            merged = weight_average(task_vectors)
        elif fb == "task_arithmetic":
            merged = task_arithmetic(task_vectors, weights=weights,
                                     scaling=recipe.scope.fallback_scaling)
        else:
            merged = torch.zeros_like(task_vectors[0])
    else:
        method = get_method(recipe.merge_method)
        merged = method.fn(task_vectors, **_engine_kwargs(method, recipe, entry.name, thresholds))
    if entry.calibrate and recipe.calibrate is not None:
        cal = dict(recipe.calibrate)
        cal_method = get_method(cal.pop("method"))
        merged = cal_method.fn(merged, task_vectors, **cal)
    return merged


def _check_finite(t: Tensor, what: str, allow: bool) -> None:
    if not allow and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(f"{what} holds {bad} NaN/Inf value(s); pass --allow-nonfinite "
                             f"(allow_nonfinite=True) to merge anyway")


@dataclass
class _Context:
    recipe: Recipe
    base: Checkpoint
    experts: list[Checkpoint]
    device: torch.device
    cdtype: torch.dtype
    allow_nonfinite: bool
    thresholds: dict[str, Any] | None = None

    def task_vectors(self, name: str) -> tuple[Tensor, list[Tensor]]:
        """θ0 and the τ_i of one parameter, on the device, in the compute dtype."""
        theta0 = self.base.read(name)
        _check_finite(theta0, f"{self.base.infos[name].file}: tensor {name!r}",
                      self.allow_nonfinite)
        theta0 = theta0.to(self.device, self.cdtype)
        taus = []
        for ckpt in self.experts:
            t = ckpt.read(name)
            _check_finite(t, f"{ckpt.infos[name].file}: tensor {name!r}", self.allow_nonfinite)
            taus.append(t.to(self.device, self.cdtype).sub_(theta0))
        return theta0, taus

    def merge_one(self, entry: PlanEntry) -> Tensor:
        if entry.action == "copy":
            return self.base.read(entry.name)
        theta0, taus = self.task_vectors(entry.name)
        try:
            update = merge_update(entry, taus, self.recipe, self.thresholds)
        except SpecmergeError:
            raise
        except Exception as err:
            raise MergeError(f"{self.recipe.merge_method} failed on tensor {entry.name!r} "
                             f"(shape {list(entry.shape)}): {err}") from err
        del taus
        out = theta0.add_(update)
        _check_finite(out, f"the merged tensor {entry.name!r} (from finite inputs)",
                      self.allow_nonfinite)
        return out.to("cpu", entry.out_dtype)


def _resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecmergeError("device 'cuda' requested but torch.cuda.is_available() is False; "
                             "install a CUDA build of torch or use --device cpu")
    return dev


def _iter_ordered(fn: Callable[[PlanEntry], Tensor], plan: Sequence[PlanEntry],
                  workers: int) -> Iterator[tuple[PlanEntry, Tensor]]:
    """Run ``fn`` over the plan with at most ``workers`` parameters in flight."""
    if workers <= 1:
        for entry in plan:
            yield entry, fn(entry)
        return
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="specmerge") as pool:
        pending: dict[cf.Future[Tensor], PlanEntry] = {}
        it = iter(plan)
        try:
            for entry in it:
                pending[pool.submit(fn, entry)] = entry
                if len(pending) >= workers:
                    break
            while pending:
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    entry = pending.pop(fut)
                    yield entry, fut.result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending[pool.submit(fn, nxt)] = nxt
        finally:
            for fut in pending:
                fut.cancel()


def global_ties_thresholds(ctx: _Context, plan: Sequence[PlanEntry],
                           progress: bool) -> dict[str, Any]:
    """Whole-model TIES thresholds t_i: the (d − ⌊d·density⌋)-th smallest |τ_i| over the model.

    Exact, without holding the model: ``AbsKthSelector`` streams every parameter once per radix
    pass (2 passes in float32, 4 in float64), one selector per task.
    """
    entries = [e for e in plan if e.action == "method"]
    density = ctx.recipe.parameters["density"]
    total = sum(int(torch.Size(e.shape).numel()) for e in entries)
    k_rank = trim_count(total, density)
    if density >= 1.0 or k_rank <= 0:
        return {"per_task": [float("-inf")] * ctx.recipe.num_experts}
    selectors = [AbsKthSelector(k_rank, ctx.cdtype) for _ in range(ctx.recipe.num_experts)]
    passes = selectors[0].passes
    for level in range(passes):
        bar = tqdm(entries, desc=f"TIES global threshold, pass {level + 1}/{passes}",
                   disable=not progress, unit="tensor", leave=False)
        for entry in bar:
            _, taus = ctx.task_vectors(entry.name)
            for sel, tau in zip(selectors, taus, strict=True):
                sel.update(tau)
        for sel in selectors:
            sel.next_pass()
    per_task = [sel.value() for sel in selectors]
    log.info("TIES global thresholds (k=%d of %d): %s", k_rank, total, per_task)
    return {"per_task": per_task, "k": k_rank, "d": total}


def merge(recipe: Recipe | dict[str, Any] | str | Path, out_dir: str | Path, *,
          device: str | torch.device = "cpu", dtype: str | None = None,
          shard_size: str | int = "5GB", workers: int = 1, force: bool = False,
          seed: int | None = None, allow_nonfinite: bool = False,
          progress: bool = True) -> MergeResult:
    """Merge the recipe's experts into one HF-format checkpoint at ``out_dir``.

    ``dtype`` and ``seed`` override the recipe's. The output is written to a temporary sibling
    and renamed into place at the end; inputs are only ever read.
    """
    start = time.perf_counter()
    rec = load_recipe(recipe, dtype=dtype, seed=seed)
    if workers < 1:
        raise SpecmergeError(f"workers must be >= 1, got {workers}")
    max_shard = parse_size(shard_size)
    out = Path(out_dir).expanduser().resolve()
    dev = _resolve_device(device)

    base = Checkpoint(rec.base_model)
    experts = [Checkpoint(m.model) for m in rec.models]
    for ckpt in experts:
        check_compatible(base, ckpt)
    check_output_path(out, [base.path, *(e.path for e in experts)], force)

    plan = build_plan(rec, base)
    ctx = _Context(rec, base, experts, dev, compute_dtype(rec.dtype), allow_nonfinite)
    counts = {a: sum(e.action == a for e in plan) for a in ("method", "fallback", "copy")}
    counts["calibrated"] = sum(e.calibrate for e in plan)
    log.info("merging %d tensors (%s) with %s on %s", len(plan), counts, rec.merge_method, dev)
    if rec.merge_method == "ties" and rec.parameters.get("trim_scope") == "global":
        ctx.thresholds = global_ties_thresholds(ctx, plan, progress)

    out_specs = [OutTensor(e.name, e.shape, e.out_dtype) for e in plan]
    with atomic_output_dir(out) as tmp:
        writer = ShardedWriter(tmp, out_specs, max_shard,
                               metadata={"specmerge_version": __version__,
                                         "merge_method": rec.merge_method})
        try:
            bar = tqdm(total=len(plan), desc="merging", unit="tensor", disable=not progress,
                       dynamic_ncols=True)
            for entry, tensor in _iter_ordered(ctx.merge_one, plan, workers):
                writer.write(entry.name, tensor)
                bar.set_postfix_str(entry.name, refresh=False)
                bar.update(1)
            bar.close()
            weight_map = writer.finish()
        finally:
            writer.close()
        writer.write_index(weight_map)
        _write_side_files(tmp, base, rec, plan)
        _write_model_card(tmp, rec, base, counts)
    seconds = time.perf_counter() - start
    peak = _peak_rss_mb()
    log.info("wrote %s in %.1f s (peak RSS %.0f MB)", out, seconds, peak)
    return MergeResult(out, seconds, len(plan), sum(torch.Size(e.shape).numel() for e in plan),
                       peak, rec, counts)


def _peak_rss_mb() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / (1024 * 1024) if sys.platform == "darwin" else ru / 1024


def _output_dtype_name(plan: Sequence[PlanEntry]) -> str | None:
    floats = [e for e in plan if e.out_dtype.is_floating_point]
    if not floats:
        return None
    sizes: dict[torch.dtype, int] = {}
    for e in floats:
        sizes[e.out_dtype] = sizes.get(e.out_dtype, 0) + torch.Size(e.shape).numel()
    return dtype_name(max(sizes, key=lambda d: sizes[d]))


def _write_side_files(tmp: Path, base: Checkpoint, rec: Recipe, plan: Sequence[PlanEntry]) -> None:
    if base.config_dir is not None:
        for f in sorted(base.config_dir.iterdir()):
            if f.is_file() and SIDE_FILES.match(f.name):
                try:
                    shutil.copy2(f, tmp / f.name)
                except OSError as err:
                    raise OutputError(f"{tmp / f.name}: cannot copy from the base: {err}") from err
    config = tmp / "config.json"
    out_dtype = _output_dtype_name(plan)
    if config.is_file() and out_dtype is not None:
        try:
            cfg = json.loads(config.read_text())
        except ValueError:
            log.warning("%s is not valid JSON; copied as is", config)
        else:
            keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
            for k in keys:
                cfg[k] = out_dtype
            write_text(config, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    header = f"# Resolved by specmerge {__version__}: every default filled in.\n"
    write_text(tmp / "specmerge_recipe.yaml",
               header + yaml.safe_dump(rec.resolved(), sort_keys=False))


def _write_model_card(tmp: Path, rec: Recipe, base: Checkpoint,
                      counts: Mapping[str, int]) -> None:
    """The model card: method, calibration, scope and inputs (no timings, so it is deterministic)."""
    method = get_method(rec.merge_method)
    lines = [
        "---", "library_name: transformers", "tags: [merge, specmerge]", "---", "",
        f"# Merged with specmerge {__version__}", "",
        f"- **Method:** `{rec.merge_method}`: {method.summary} ({method.citation})",
        f"- **Parameters:** `{json.dumps(rec.parameters, sort_keys=True)}`",
    ]
    if rec.calibrate is not None:
        cal = get_method(rec.calibrate["method"])
        params = {k: v for k, v in rec.calibrate.items() if k != "method"}
        lines.append(f"- **Calibration:** `{cal.name}` after `{rec.merge_method}`: {cal.summary} "
                     f"({cal.citation}); parameters `{json.dumps(params, sort_keys=True)}`")
    else:
        lines.append("- **Calibration:** none")
    lines += [
        f"- **Scope:** exclude {rec.scope.exclude}, fallback `{rec.scope.fallback}`",
        f"- **Compute dtype:** {rec.dtype}; seed {rec.seed}",
        f"- **Tensors:** {counts.get('method', 0)} by the method, {counts.get('fallback', 0)} by "
        f"the fallback, {counts.get('copy', 0)} copied, {counts.get('calibrated', 0)} calibrated",
        "", "## Inputs", "", f"- base: `{base.path}`",
        *[f"- expert {i + 1}: `{m.model}` (weight {m.weight})" for i, m in enumerate(rec.models)],
        "", "The full resolved recipe is in `specmerge_recipe.yaml`.", "",
    ]
    write_text(tmp / "README.md", "\n".join(lines))


def merge_state_dicts(recipe: Recipe | dict[str, Any], base: Mapping[str, Tensor],
                      experts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """In-memory merge of state dicts with the same plan and maths as ``merge`` (no files).

    For research code that already holds tensors; ``recipe`` paths are ignored.
    """
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(
        {"base_model": "<memory>", "models": [f"<memory:{i}>" for i in range(len(experts))],
         **{k: v for k, v in recipe.items() if k not in ("base_model", "models")}})
    if rec.merge_method == "ties" and rec.parameters.get("trim_scope") == "global":
        raise SpecmergeError("trim_scope=global needs the streaming engine (specmerge.merge)")
    cdtype = compute_dtype(rec.dtype)
    method = get_method(rec.merge_method)
    out = {}
    for name, theta0 in base.items():
        if not theta0.is_floating_point():
            out[name] = theta0.clone()
            continue
        matrix = is_matrix_param(name, theta0.shape, theta0.dtype, rec.scope)
        action: Action = "fallback" if method.matrix_only and not matrix else "method"
        entry = PlanEntry(name, tuple(theta0.shape), theta0.dtype, action,
                          calibrate=rec.calibrate is not None and matrix)
        t0 = theta0.to(cdtype)
        taus = [e[name].to(cdtype) - t0 for e in experts]
        out[name] = (t0 + merge_update(entry, taus, rec)).to(theta0.dtype)
    return out
