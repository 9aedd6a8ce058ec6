"""The maths of one parameter, whatever the stage around it: its method or fallback, then its
calibration (``merged_update``), with failures named by tensor (``run_method``), and the cast to
the output dtype (``to_output``). Nothing here reads or writes a file."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from specmerge.errors import MergeError, NonFiniteError, SpecmergeError
from specmerge.linalg import dtype_name
from specmerge.lowrank import LowRank, TaskVector, dense, is_zero
from specmerge.methods.registry import get_method
from specmerge.methods.rng import CounterRNG
from specmerge.plan import PlanEntry
from specmerge.sources import count_nonfinite
from specmerge.spaces import merge_in_space

log = logging.getLogger(__name__)


def merged_update(entry: PlanEntry, task_vectors: Sequence[TaskVector],
                  calibration: tuple[str, Mapping[str, Any]] | None,
                  statistics: Mapping[str, Any], offset: int = 0,
                  base: Tensor | None = None) -> TaskVector:
    """The merged update τ of one parameter: its method or fallback, then its calibration.

    Matrix maths (a matrix method, a calibration) sees a Conv1D weight in (out, in) orientation
    (transposed before, and back after) and a fused projection block by block (``matrix_apply``).
    Factored τ_i (LoRA) reach the methods that take them (``factored`` in the registry) as they
    are, and the result may be factored; the other methods get them densified, one tensor at a
    time. ``offset``: the flat index of the first entry of ``task_vectors`` in the parameter (a
    row block), where a counter-based generator starts. ``base``: θ0 (of the same rows), for a
    method that ``uses_base``.
    """
    if entry.method is None:
        return torch.zeros(task_vectors[0].shape, dtype=task_vectors[0].dtype,
                           device=task_vectors[0].device)
    method = get_method(entry.method)
    kwargs = dict(entry.kwargs)
    if entry.seeds:
        kwargs["generators"] = ([CounterRNG(s, offset) for s in entry.seeds] if method.counter_rng
                                else [torch.Generator().manual_seed(s) for s in entry.seeds])
    if entry.action == "method":
        kwargs.update(statistics)
    if method.uses_base:
        if base is None:
            raise MergeError(f"{method.name} needs the base weights of {entry.name!r}")
        kwargs["base"] = base
    in_space = entry.space != "full" and any(isinstance(t, LowRank) and not is_zero(t)
                                             for t in task_vectors)  # LoRA factors to merge
    taus = list(task_vectors) if method.factored or in_space else [dense(t) for t in task_vectors]
    if in_space:
        merged = space_update(entry, lambda ts: method.fn(ts, **kwargs), taus)
    elif method.matrix_only:
        merged = matrix_apply(entry, lambda ts: method.fn(ts, **kwargs), taus)
    else:
        merged = method.fn(taus, **kwargs)
    if entry.calibrate and calibration is not None:
        name, cal_kwargs = calibration
        cal = get_method(name)
        log.debug("%s: calibrating with %s", entry.name, name)  # the calibration's own lines follow
        inputs = [merged, *task_vectors]
        merged = matrix_apply(entry, lambda ts: cal.fn(ts[0], ts[1:], **cal_kwargs),
                              inputs if cal.factored else [dense(t) for t in inputs])
    return merged


def space_update(entry: PlanEntry, fn: Callable[[list[Tensor]], Tensor],
                 task_vectors: Sequence[TaskVector]) -> TaskVector:
    """``fn`` run on small matrices in the entry's merge space (``specmerge.spaces``: Core
    Space, KnOTS) and lifted back factored. Every τ_i must be an adapter's factors, and the
    weight whole (a fused projection's blocks are not)."""
    for i, t in enumerate(task_vectors):
        if not isinstance(t, LowRank):
            raise MergeError(
                f"space {entry.space!r}: models[{i}] gives tensor {entry.name!r} as a dense task "
                f"vector (a full fine-tune, or a module its adapter saves whole), but a "
                f"{entry.space} merge needs every expert's LoRA factors of it; use space: full")
    if entry.blocks is not None:
        raise MergeError(
            f"space {entry.space!r}: tensor {entry.name!r} is a fused projection merged block by "
            f"block; a {entry.space} merge needs the whole factors: set scope.split_fused: false")
    return matrix_apply(entry, lambda ts: merge_in_space(entry.space, fn, ts),  # type: ignore[arg-type]
                        task_vectors)


def matrix_apply(entry: PlanEntry, fn: Callable[[list[TaskVector]], TaskVector],
                 tensors: Sequence[TaskVector]) -> TaskVector:
    """``fn`` on same-shape tensors in (out, in) orientation: transposed for a Conv1D weight,
    and for a fused projection once per block (rows regrouped when interleaved per head), the
    results re-stacked and put back in the stored layout. Factored tensors stay factored through
    a transposition; a fused projection densifies them."""
    if entry.blocks is None:
        if not entry.transpose:
            return fn(list(tensors))
        out = fn([t.mT if isinstance(t, LowRank) else t.mT.contiguous() for t in tensors])
        return out.mT if isinstance(out, LowRank) else out.mT.contiguous()
    blocks = entry.blocks

    def to_matrix(t: Tensor) -> Tensor:
        t = t.mT.contiguous() if entry.transpose else t
        if blocks.interleave:
            h, n = blocks.interleave, len(blocks.sizes)
            t = t.reshape(h, n, -1, t.shape[-1]).transpose(0, 1).reshape(t.shape)
        return t

    def to_stored(t: Tensor) -> Tensor:
        if blocks.interleave:
            h, n = blocks.interleave, len(blocks.sizes)
            t = t.reshape(n, h, -1, t.shape[-1]).transpose(0, 1).reshape(t.shape)
        return t.mT.contiguous() if entry.transpose else t

    parts = [to_matrix(dense(t)).split(list(blocks.sizes)) for t in tensors]
    return to_stored(torch.cat([dense(fn([p[j] for p in parts]))
                                for j in range(len(blocks.sizes))]))



def run_method(entry: PlanEntry, task_vectors: Sequence[TaskVector],
               calibration: tuple[str, Mapping[str, Any]] | None,
               statistics: Mapping[str, Any], offset: int = 0,
               base: Tensor | None = None) -> TaskVector:
    """``merged_update`` with any failure of the maths reported against the tensor."""
    try:
        return merged_update(entry, task_vectors, calibration, statistics, offset, base)
    except SpecmergeError:
        raise
    except Exception as err:
        raise MergeError(f"{entry.method} failed on tensor {entry.name!r} "
                         f"(shape {list(entry.shape)}): {err}") from err



def to_output(x: Tensor, entry: PlanEntry, allow_nonfinite: bool) -> Tensor:
    """``x`` (finite, in the compute dtype) cast to the entry's output dtype on the CPU. Where
    that dtype's range is narrower (float16: ±65504), a value beyond it would be written as
    Inf: an error naming the tensor, unless ``allow_nonfinite``."""
    y = x.to("cpu", entry.out_dtype)
    narrower = (y.is_floating_point() and x.is_floating_point()
                and torch.finfo(y.dtype).max < torch.finfo(x.dtype).max)
    if narrower and not allow_nonfinite:
        bad = count_nonfinite(y)
        if bad:
            raise NonFiniteError(
                f"the merged tensor {entry.name!r}: {bad} values exceed the range of "
                f"{dtype_name(y.dtype)} (largest |x| = {float(x.abs().max()):.4g}, the most it "
                f"holds is {torch.finfo(y.dtype).max:.6g}) and would be written as Inf; use "
                f"out_dtype bfloat16 or float32, or --allow-nonfinite")
    return y

