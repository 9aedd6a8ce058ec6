"""The engine: run a plan from a source, through a backend, into a sink.

    Source ──index──► Plan ──► [statistics: rounds of map/reduce over the entries]
                                 ──► Backend.map(step, entries, source) ──► Sink.put(entry, tensor)

Per parameter, the merge step loads θ0 and the τ_i (compute dtype) → the entry's method or
fallback → [calibration] → θ0 + τ → output dtype. The engine knows no method by name: each
entry names its function, and the plan lists the whole-model statistics the recipe's method
declares.

Memory. A parameter whose method is ``rowwise`` (the element-wise methods, and the fallbacks of
the matrix methods) and whose inputs are safetensors files is merged in row blocks of at most
``block_size`` bytes of the compute dtype per tensor: θ0's and each θ_i's rows are read with
positioned reads, merged and written at their offset in the output shard, so memory is about
(K + 3) × the block size per worker, whatever the largest tensor. The method's per-tensor
statistics (TIES's thresholds and sign majority) take extra passes over the blocks. Matrix
methods, calibrations, adapters' task vectors, ``.bin`` inputs and a union vocabulary's tensors
need whole tensors: about (K + 3) × the largest such parameter per worker. With ``prefetch``
(the default), the next block is read on a thread while one is merged and the last one is
written on another (``specmerge.overlap``): up to (3K + 6) blocks in memory (float32 inputs).

NaN/Inf. A method that ``propagates_nonfinite`` is checked on its output only (one pass); when
that finds a NaN/Inf, the inputs are scanned to name the file that holds it. Other methods'
inputs are checked as they are read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from specmerge.backends import Backend, LocalBackend, Step
from specmerge.errors import Interrupted, MergeError, NonFiniteError, SpecmergeError
from specmerge.io.adapter import Adapter
from specmerge.io.hf_files import check_auto_map
from specmerge.io.peft_out import Factors, PeftDirSink
from specmerge.io.sinks import HFDirSink, StateDictSink, Written
from specmerge.io.writer import Identity, Region, check_output_path, output_path, parse_size
from specmerge.linalg import dtype_name, is_finite, parse_dtype
from specmerge.lowrank import LowRank, TaskVector, dense, is_zero, truncate
from specmerge.memory import READ_AHEAD, WRITE_BEHIND, check_memory, estimate
from specmerge.methods.registry import Method, Statistic, get_method
from specmerge.methods.rng import CounterRNG
from specmerge.overlap import read_ahead, write_behind
from specmerge.plan import Plan, PlanEntry, build_plan
from specmerge.recipe import Recipe, load_recipe, recipe_files
from specmerge.sources import (
    CheckpointSource,
    Source,
    StateDictSource,
    StoredRows,
    check_finite,
    count_nonfinite,
    nonfinite_error,
)

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = "8MiB"  # per tensor block, in the compute dtype (docs/results/overlap.md)
# with prefetch, blocks read ahead of the one being merged, and written blocks queued behind it


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


class Sink(Protocol):
    def __enter__(self) -> Any: ...

    def regions(self) -> Mapping[str, Region]: ...

    def put(self, entry: PlanEntry, result: Any) -> None: ...

    def finish(self) -> Any: ...

    def __exit__(self, *exc: Any) -> Any: ...


def merged_update(entry: PlanEntry, task_vectors: Sequence[TaskVector],
                  calibration: tuple[str, Mapping[str, Any]] | None,
                  statistics: Mapping[str, Any], offset: int = 0) -> TaskVector:
    """The merged update τ of one parameter: its method or fallback, then its calibration.

    Matrix maths (a matrix method, a calibration) sees a Conv1D weight in (out, in) orientation
    (transposed before, and back after) and a fused projection block by block (``matrix_apply``).
    Factored τ_i (LoRA) reach the methods that take them (``factored`` in the registry) as they
    are, and the result may be factored; the other methods get them densified, one tensor at a
    time. ``offset``: the flat index of the first entry of ``task_vectors`` in the parameter (a
    row block), where a counter-based generator starts.
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
    taus = list(task_vectors) if method.factored else [dense(t) for t in task_vectors]
    if method.matrix_only:
        merged = matrix_apply(entry, lambda ts: method.fn(ts, **kwargs), taus)
    else:
        merged = method.fn(taus, **kwargs)
    if entry.calibrate and calibration is not None:
        name, cal_kwargs = calibration
        cal = get_method(name)
        inputs = [merged, *task_vectors]
        merged = matrix_apply(entry, lambda ts: cal.fn(ts[0], ts[1:], **cal_kwargs),
                              inputs if cal.factored else [dense(t) for t in inputs])
    return merged


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


@dataclass(frozen=True)
class MergeStep:
    """One parameter of a merge: θ0 + merged update, in the entry's output dtype, on the CPU.
    Picklable: it holds the plan's shared settings, never a file or a lock.

    With ``regions`` (the sink's, bound by ``execute``), a parameter that can be merged in row
    blocks (``block_rows``) is written block by block into its region, and the step returns
    ``Written``; any other is returned whole, or, with ``write_whole`` (a remote backend's
    workers), written whole into its region too. With ``prefetch``, a reader thread reads the
    next block while one is merged, and a writer thread writes the last one
    (``specmerge.overlap``); the bytes are the same without."""

    calibration: tuple[str, Mapping[str, Any]] | None
    statistics: Mapping[str, Any]
    device: str
    compute_dtype: torch.dtype
    allow_nonfinite: bool = False
    block_size: int = parse_size(DEFAULT_BLOCK_SIZE)
    prefetch: bool = True
    regions: Mapping[str, Region] = field(default_factory=dict)
    write_whole: bool = False

    def __call__(self, entry: PlanEntry, source: Source) -> Tensor | Written:
        block = self.block_rows(entry, source) if entry.action != "copy" else None
        if block is not None:
            return self.merge_rows(entry, source, block)
        out = (source.base_tensor(entry.name) if entry.action == "copy"
               else self.merge_whole(entry, source))
        if self.write_whole and entry.name in self.regions:
            self.regions[entry.name].write(out)
            return Written(entry.name)
        return out

    def merge_whole(self, entry: PlanEntry, source: Source) -> Tensor:
        """θ0 + the merged update of ``entry``, read and computed whole, on the CPU."""
        lazy = self.checks_output_only(entry)
        tv = source.task_vectors(entry.name, torch.device(self.device), self.compute_dtype,
                                 factored=True, check=not lazy)
        assert tv.theta0 is not None
        if all(is_zero(t) for t in tv.taus):  # no adapter touches it: every method gives 0
            out = tv.theta0
        else:
            update = run_method(entry, tv.taus, self.calibration, self.statistics)
            del tv.taus
            out = tv.theta0.add_(dense(update))
        if entry.out_rows is not None:  # the union vocabulary: place the added tokens' rows
            full = out.new_zeros(entry.out_shape)
            full[:out.shape[0]] = out
            ids, rows = source.placed_rows(entry.name, torch.device(self.device),
                                           self.compute_dtype)
            full[ids] = rows
            out = full
        if lazy and count_nonfinite(out):
            source.check_inputs(entry.name, self.rows_per_block(entry))
        check_finite(out, f"the merged tensor {entry.name!r} (from finite inputs)",
                     self.allow_nonfinite)
        return to_output(out, entry, self.allow_nonfinite)

    def method_of(self, entry: PlanEntry) -> Method | None:
        return get_method(entry.method) if entry.method is not None else None

    def checks_output_only(self, entry: PlanEntry) -> bool:
        """Whether NaN/Inf is looked for in the output only: the entry's method propagates
        every non-finite input to the output, and no calibration follows it."""
        method = self.method_of(entry)
        return (not self.allow_nonfinite and method is not None and method.propagates_nonfinite
                and not (entry.calibrate and self.calibration is not None))

    def rows_per_block(self, entry: PlanEntry) -> int:
        """Rows of ``entry`` per block: at most ``block_size`` bytes of the compute dtype."""
        rows = entry.shape[0] if entry.shape else 1
        per_row = max(1, entry.numel // max(1, rows)) * self.compute_dtype.itemsize
        return max(1, self.block_size // per_row)

    def block_rows(self, entry: PlanEntry, source: Source) -> int | None:
        """Rows per block when ``entry`` is merged in row blocks, else None: its sink region is
        bound, its method (or fallback) is ``rowwise`` and not calibrated, it keeps the base's
        rows, its inputs are read by rows (safetensors, no adapter), and it spans 2+ blocks."""
        if entry.name not in self.regions or entry.out_rows is not None or not entry.shape:
            return None
        method = self.method_of(entry)
        if (method is not None and not method.rowwise) or (
                entry.calibrate and self.calibration is not None):
            return None
        block = self.rows_per_block(entry)
        if block >= entry.shape[0] or not source.reads_rows(entry.name):
            return None
        return block

    def merge_rows(self, entry: PlanEntry, source: Source, block: int) -> Written:
        """Merge ``entry`` ``block`` rows at a time into its region: per block, read θ0's and
        each θ_i's rows, compute, check, write. Byte-identical to the whole-tensor merge.

        With ``prefetch`` the next block is read (file I/O only, into reusable buffers) while
        this one is merged, and this one is written while the next is merged. Memory, in blocks
        of the compute dtype, with r = the inputs' bytes per entry / the compute dtype's (1 for
        float32 inputs, 1/2 for bf16): (K + 3) being merged, (READ_AHEAD + 1) × (K + 1) × r of
        read buffers, WRITE_BEHIND output blocks being written: (3K + 6) for float32 inputs,
        (2K + 5) for bf16; without prefetch (K + 3) + (K + 1) × r."""
        rows = entry.shape[0]
        spans = [(lo, min(lo + block, rows)) for lo in range(0, rows, block)]
        device = torch.device(self.device)
        method = self.method_of(entry)
        ahead, behind = (READ_AHEAD, WRITE_BEHIND) if self.prefetch else (0, 0)
        values = dict(self.statistics) if entry.action == "method" else {}
        if method is not None and entry.action == "method":
            values.update(tensor_statistics(method, {**entry.kwargs, **values}, entry, source,
                                            spans, device, self.compute_dtype, ahead))
        lazy = self.checks_output_only(entry)
        region = self.regions[entry.name]
        per_row = entry.numel // rows
        bad = 0

        read = block_reader(source, entry.name, ahead)

        def write(block_out: tuple[int, Tensor]) -> None:
            region.write_rows(*block_out)

        with read_ahead(read, list(enumerate(spans)), ahead) as blocks, \
                write_behind(write, behind) as submit:
            for (lo, _), stored in zip(spans, blocks, strict=True):
                tv = source.rows_to_task_vectors(entry.name, stored, device, self.compute_dtype,
                                                 check=not lazy)
                del stored
                assert tv.theta0 is not None
                update = run_method(entry, tv.taus, None, values, offset=lo * per_row)
                del tv.taus
                out = tv.theta0.add_(dense(update))
                if not self.allow_nonfinite:
                    found = count_nonfinite(out)
                    if found and lazy:
                        source.check_inputs(entry.name, block)
                    bad += found
                submit((lo, to_output(out, entry, self.allow_nonfinite)))
                del update, out, tv  # before the next block is taken
        if bad:
            raise nonfinite_error(f"the merged tensor {entry.name!r} (from finite inputs)", bad)
        return Written(entry.name)


def tensor_statistics(method: Method, params: Mapping[str, Any], entry: PlanEntry,
                      source: Source, spans: Sequence[tuple[int, int]], device: torch.device,
                      dtype: torch.dtype, ahead: int = 0) -> dict[str, Any]:
    """The values of ``method.tensor_statistics`` over one parameter read in row blocks
    (``spans``, ``ahead`` of them read ahead on a thread), each run as rounds of map over the
    blocks and an exact reduce; a statistic sees the values of the ones before it in
    ``params``."""
    values: dict[str, Any] = {}
    for stat in method.tensor_statistics:
        known = {**params, **values}
        if not stat.wanted(known):
            continue
        state = stat.start(known, source.num_experts, entry.numel, dtype)
        while not stat.done(state):
            state = stat.reduce(state, [map_blocks(stat, state, entry.name, source, spans,
                                                   device, dtype, ahead)])
        values[stat.kwarg] = stat.value(state)
    return values


def map_blocks(stat: Statistic, state: Any, name: str, source: Source,
               spans: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype,
               ahead: int) -> Any:
    """One partial of ``stat.map`` over the row blocks ``spans`` of ``name``, combined block by
    block (exactly); ``ahead`` blocks are read ahead on a thread."""
    read = block_reader(source, name, ahead)
    partial = None
    with read_ahead(read, list(enumerate(spans)), ahead) as blocks:
        for stored in blocks:
            taus = source.rows_to_task_vectors(name, stored, device, dtype, check=False).taus
            del stored
            part = stat.map(state, taus)
            del taus
            partial = part if partial is None else stat.combine([partial, part])
    return partial


def block_reader(source: Source, name: str, ahead: int
                 ) -> Callable[[tuple[int, tuple[int, int]]], list[StoredRows]]:
    """``read((i, (lo, hi)))``: rows lo:hi of ``name``'s inputs as stored, block ``i`` into the
    buffers of set ``i mod (ahead + 1)``. Block i + ahead + 1 is read only once the loop is done
    with block i (``read_ahead``), which ``rows_to_task_vectors`` copies out of; the buffers are
    allocated once per parameter and never churn the allocator (blocks that one thread
    allocates and another frees stay in the allocating thread's malloc arena: 2x the memory)."""
    sets: list[list[list[Tensor]]] = [[] for _ in range(ahead + 1)]

    def read(item: tuple[int, tuple[int, int]]) -> list[StoredRows]:
        i, (lo, hi) = item
        return source.read_rows(name, lo, hi, buffers=sets[i % len(sets)])

    return read


def run_method(entry: PlanEntry, task_vectors: Sequence[TaskVector],
               calibration: tuple[str, Mapping[str, Any]] | None,
               statistics: Mapping[str, Any], offset: int = 0) -> TaskVector:
    """``merged_update`` with any failure of the maths reported against the tensor."""
    try:
        return merged_update(entry, task_vectors, calibration, statistics, offset)
    except SpecmergeError:
        raise
    except Exception as err:
        raise MergeError(f"{entry.method} failed on tensor {entry.name!r} "
                         f"(shape {list(entry.shape)}): {err}") from err


@dataclass(frozen=True)
class StatisticStep:
    """One parameter's share of a statistic's current round (``Statistic.map``), read whole or,
    where the inputs are read by rows, in row blocks of at most ``block_size`` bytes whose
    partials are combined into one (``Statistic.combine``), the next block read ahead with
    ``prefetch``."""

    statistic: Statistic
    state: Any
    device: str
    compute_dtype: torch.dtype
    block_size: int = parse_size(DEFAULT_BLOCK_SIZE)
    prefetch: bool = True

    def __call__(self, entry: PlanEntry, source: Source) -> Any:
        device = torch.device(self.device)
        rows = entry.shape[0] if entry.shape else 1
        per_row = max(1, entry.numel // max(1, rows)) * self.compute_dtype.itemsize
        block = max(1, self.block_size // per_row)
        if not (entry.shape and block < rows and source.reads_rows(entry.name)):
            tv = source.task_vectors(entry.name, device, self.compute_dtype, factored=True,
                                     base=False)  # θ0 only where a τ_i needs it
            return self.statistic.map(self.state, [dense(t) for t in tv.taus])
        spans = [(lo, min(lo + block, rows)) for lo in range(0, rows, block)]
        return map_blocks(self.statistic, self.state, entry.name, source, spans, device,
                          self.compute_dtype, READ_AHEAD if self.prefetch else 0)


def run_statistics(plan: Plan, source: Source, backend: Backend, device: str,
                   progress: bool, block_size: int = parse_size(DEFAULT_BLOCK_SIZE),
                   prefetch: bool = True) -> dict[str, Any]:
    """Run every whole-model statistic the plan declares; return the method keyword values."""
    values: dict[str, Any] = {}
    entries = [e for e in plan.entries if e.action == "method"]
    numel = sum(e.numel for e in entries)
    for stat in plan.statistics:
        state = stat.start(plan.recipe.parameters, plan.recipe.num_experts, numel,
                           plan.compute_dtype)
        rounds = 0
        while not stat.done(state):
            rounds += 1
            step = StatisticStep(stat, state, device, plan.compute_dtype, block_size, prefetch)
            bar = tqdm(total=len(entries), desc=f"{stat.kwarg}, pass {rounds}", unit="tensor",
                       disable=not progress, leave=False)
            partials = []
            for _, part in backend.map(step, entries, source):
                partials.append(part)
                bar.update(1)
            bar.close()
            state = stat.reduce(state, partials)
        values[stat.kwarg] = stat.value(state)
        log.info("%s over %d parameters (%d entries): %s", stat.kwarg, numel, len(entries),
                 values[stat.kwarg])
    return values


@contextlib.contextmanager
def termination_as_error() -> Iterator[None]:
    """While an output is written, SIGTERM and SIGHUP raise ``Interrupted`` in the main thread,
    so the sink removes its partial output as on Ctrl-C. A no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def execute(step: Step[Any], entries: Sequence[PlanEntry], source: Source, backend: Backend,
            sink: Sink, *, desc: str, progress: bool, writes_files: bool = True) -> Any:
    """Run ``step`` on every entry through ``backend`` into ``sink``; return ``sink.finish()``.
    While a sink ``writes_files``, SIGTERM and SIGHUP clean up as Ctrl-C does. A merge step
    writes the parameters it merges in row blocks into the sink's regions itself, and on a
    remote backend every tensor (the workers must then see the output's files)."""
    guard = termination_as_error() if writes_files else contextlib.nullcontext()
    with guard, sink:
        if isinstance(step, MergeStep):
            regions = sink.regions()
            step = dataclasses.replace(step, regions=regions, write_whole=backend.remote)
            if backend.remote and regions:
                backend.check_files(sorted({r.file for r in regions.values()}), "output")
        bar = tqdm(total=len(entries), desc=desc, unit="tensor", disable=not progress,
                   dynamic_ncols=True)
        for entry, result in backend.map(step, entries, source):
            sink.put(entry, result)
            bar.set_postfix_str(entry.name, refresh=False)
            bar.update(1)
        bar.close()
        return sink.finish()


def plan_of(recipe: Recipe, source: Source) -> Plan:
    """``build_plan`` with everything the source knows: index, roles, union vocabulary rows."""
    return build_plan(recipe, source.index(), source.model_info(), source.vocab_rows)


def resolve_device(device: str | torch.device, remote: bool = False) -> str:
    """``device`` checked for this process, or for a remote backend's workers (``remote``):
    there CUDA is the GPU that Ray gave the task, ``cuda``, and the driver needs none."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise SpecmergeError(f"invalid device {str(device)!r}: use cpu, cuda or cuda:N") from err
    if remote:
        return dev.type
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecmergeError("device 'cuda' requested but torch.cuda.is_available() is False; "
                             "install a CUDA build of torch or use --device cpu")
    return str(dev)


def make_backend(workers: int, backend: str | Backend | None = None, device: str = "cpu",
                 ray_address: str | None = None, ray_gpus: float | None = None,
                 ray_cpus: float | None = None) -> Backend:
    """The backend a merge runs on: ``local`` (``workers`` threads in this process), ``ray``
    (tasks on the Ray cluster at ``ray_address``; ``ray_gpus``/``ray_cpus`` per task), or a
    ready Backend object."""
    if workers < 1:
        raise SpecmergeError(f"workers must be >= 1, got {workers}")
    if backend is None or backend == "local":
        if ray_address is not None or ray_gpus is not None or ray_cpus is not None:
            raise SpecmergeError("ray_address, ray_gpus and ray_cpus apply to backend 'ray' "
                                 "only (--backend ray)")
        return LocalBackend(workers)
    if not isinstance(backend, str):
        return backend
    if backend != "ray":
        raise SpecmergeError(f"unknown backend {backend!r}: use local or ray")
    if workers != 1:
        raise SpecmergeError("workers applies to the local backend; the ray backend runs as "
                             "many tasks at once as the cluster has CPUs (or GPUs)")
    from specmerge.ray_backend import RayBackend

    return RayBackend(address=ray_address, num_cpus=ray_cpus,
                      num_gpus=1.0 if ray_gpus is None else ray_gpus,
                      use_gpus=torch.device(device).type == "cuda")


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


def parse_option_size(value: str | int, option: str) -> int:
    """``parse_size`` whose error names the option."""
    try:
        return parse_size(value)
    except ValueError as err:
        raise SpecmergeError(f"{option}: {err}") from None


def merge(recipe: Recipe | dict[str, Any] | str | Path, out_dir: str | Path, *,
          device: str | torch.device = "cpu", dtype: str | None = None,
          shard_size: str | int = "5GB", workers: int = 1, force: bool = False,
          seed: int | None = None, allow_nonfinite: bool = False,
          output_format: str | None = None, rank: int | None = None,
          block_size: str | int = DEFAULT_BLOCK_SIZE, backend: str | Backend | None = None,
          ray_address: str | None = None, ray_gpus: float | None = None,
          ray_cpus: float | None = None, progress: bool = True,
          prefetch: bool = True) -> MergeResult:
    """Merge the recipe's experts into one HF-format checkpoint at ``out_dir`` (or, with the
    recipe's ``output: {format: peft}`` or ``output_format="peft"``, into a PEFT LoRA adapter of
    at most ``rank`` per weight).

    ``dtype``, ``seed``, ``output_format`` and ``rank`` override the recipe's. The output is
    written to a temporary sibling and renamed into place at the end; inputs are only ever read.
    ``block_size`` (bytes, or e.g. "8MiB", the default) bounds each tensor block of the parameters merged in
    row blocks (element-wise methods and fallbacks on safetensors inputs); it never changes the
    output's bytes. ``prefetch`` (default on) overlaps those blocks' reading, merging and
    writing on a reader and a writer thread, with up to (3K + 6) blocks in memory instead of
    (2K + 4) (float32 inputs; (2K + 5) against (1.5K + 3.5) for bf16); it never changes the
    output's bytes either.

    ``backend`` (default: the recipe's ``backend``, else ``local``): ``local`` runs ``workers``
    parameters at once on threads; ``ray`` runs tasks on the Ray cluster at ``ray_address``,
    each asking Ray for ``ray_cpus`` CPUs (default: the driver's torch thread count, which every
    task computes with, at most the largest node's CPUs) and, on a CUDA device, ``ray_gpus``
    GPUs (default 1; a fraction shares one). Every node must see the inputs and the output's
    parent directory at the same paths (docs/cluster.md). The bytes never depend on the backend.
    """
    start = time.perf_counter()
    rec = load_recipe(recipe, dtype=dtype, seed=seed, output=output_override(
        recipe, output_format, rank))
    max_shard = parse_option_size(shard_size, "shard_size (--shard-size)")
    block = parse_option_size(block_size, "block_size (--block-size)")
    out = output_path(out_dir)
    backend = make_backend(workers, *backend_choice(rec, backend, ray_address, ray_gpus,
                                                    ray_cpus, str(device)))
    dev = resolve_device(device, backend.remote)
    reset_gpu_peak(dev, backend)

    source = CheckpointSource.from_recipe(rec, allow_nonfinite)
    claim = check_output_path(out, [*source.paths, *recipe_files(recipe)], force)
    if rec.output is not None and rec.output.format == "peft":
        return merge_to_adapter(rec, source, out, backend, dev, claim, allow_nonfinite,
                                progress, start)
    check_auto_map(source.config_dir)
    backend.check_files(source.input_files(), "input")
    plan = plan_of(rec, source)
    if not backend.remote:  # a Ray task's memory is its node's, checked there by Ray
        check_memory(estimate(plan, block_size=block, workers=workers, prefetch=prefetch))
    counts = plan.counts()
    log.info("merging %d tensors (%s) with %s on %s", len(plan.entries), counts,
             rec.merge_method, dev)
    stats = run_statistics(plan, source, backend, dev, progress, block, prefetch)
    step = MergeStep(plan.calibration, stats, dev, plan.compute_dtype, allow_nonfinite, block,
                     prefetch)
    sink = HFDirSink(out, plan, base_path=source.base.path, config_dir=source.config_dir,
                     max_shard_bytes=max_shard, replace=claim, vocabulary=source.union)
    execute(step, plan.entries, source, backend, sink, desc="merging", progress=progress)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    gpu = gpu_peak_mb(dev, backend)
    log.info("wrote %s in %.1f s (peak RSS %.0f MB%s)", out, seconds, peak,
             "" if gpu is None else f", GPU peak {gpu:.0f} MB")
    return MergeResult(out, seconds, len(plan.entries), sum(e.numel for e in plan.entries),
                       peak, rec, counts, gpu)


def backend_choice(rec: Recipe, backend: str | Backend | None, ray_address: str | None,
                   ray_gpus: float | None, ray_cpus: float | None, device: str
                   ) -> tuple[str | Backend | None, str, str | None, float | None, float | None]:
    """``make_backend``'s arguments after ``workers``: the caller's, over the recipe's
    ``backend`` (the caller's backend name replaces the recipe's settings with it)."""
    spec = rec.backend
    if spec is not None and (backend is None or backend == spec.name):
        backend = spec.name
        ray_address = spec.address if ray_address is None else ray_address
        ray_gpus = spec.num_gpus if ray_gpus is None else ray_gpus
        ray_cpus = spec.num_cpus if ray_cpus is None else ray_cpus
    return backend, device, ray_address, ray_gpus, ray_cpus


def output_override(recipe: Recipe | dict[str, Any] | str | Path, output_format: str | None,
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
        tv = source.task_vectors(entry.name, torch.device(self.merge.device),
                                 self.merge.compute_dtype, factored=True, base=False)
        if all(is_zero(t) for t in tv.taus):
            return None
        update = run_method(entry, tv.taus, self.merge.calibration, self.merge.statistics)
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


def merge_to_adapter(rec: Recipe, source: CheckpointSource, out: Path, backend: Backend,
                     dev: str, claim: Identity | None, allow_nonfinite: bool, progress: bool,
                     start: float) -> MergeResult:
    """``merge`` into a PEFT LoRA adapter: every expert must be an adapter; only the weights
    they target (factors) and save (whole tensors) are computed and written."""
    adapters = [e for e in source.experts if isinstance(e, Adapter)]
    for i, e in enumerate(source.experts):
        if not isinstance(e, Adapter):
            raise SpecmergeError(f"output format peft needs every expert to be a LoRA adapter; "
                                 f"models[{i}] ({e.path}) is a full checkpoint. Write a full "
                                 f"model (output format hf) instead")
    if source.union is not None:
        raise SpecmergeError("output format peft keeps the base's vocabulary; remove "
                             "'tokenizer: {source: union}'")
    layouts = {bool(a.config.get("fan_in_fan_out")) for a in adapters}
    if len(layouts) > 1:
        raise SpecmergeError("the adapters disagree on fan_in_fan_out (the weights' layout); "
                             "merge them to a full model (output format hf) instead")
    assert rec.output is not None
    ranks = [a.file.infos[lo.a].shape[0] for a in adapters for lo in a.lora.values()]
    if not ranks:
        raise SpecmergeError("output format peft: the adapters have no LoRA factors (only "
                             "modules_to_save); write a full model (output format hf) instead")
    rank = rec.output.rank or max(ranks)
    targets = {n for a in adapters for n in a.lora} | {n for a in adapters for n in a.saved}
    backend.check_files(source.input_files(), "input")
    plan = plan_of(rec, source)
    entries = [e for e in plan.entries if e.name in targets]
    factor_dtype = (parse_dtype(rec.out_dtype) if rec.out_dtype else
                    next(a.file.infos[lo.a].dtype for a in adapters for lo in a.lora.values()))
    log.info("merging %d adapters into a LoRA adapter of rank <= %d: %d targeted weights, "
             "%d saved tensors, with %s on %s", len(adapters), rank,
             sum(e.name not in source.saved_names for e in entries),
             sum(e.name in source.saved_names for e in entries), rec.merge_method, dev)
    stats = run_statistics(plan, source, backend, dev, progress)
    step = AdapterStep(MergeStep(plan.calibration, stats, dev, plan.compute_dtype,
                                 allow_nonfinite), rank, factor_dtype, layouts.pop())
    sink = PeftDirSink(out, plan, rank=rank, base_path=source.base.path,
                       config_dir=source.config_dir, fan_in_fan_out=step.fan_in_fan_out,
                       replace=claim)
    execute(step, entries, source, backend, sink, desc="merging (LoRA)", progress=progress)
    seconds = time.perf_counter() - start
    log.info("wrote %s in %.1f s (peak RSS %.0f MB)", out, seconds, peak_rss_mb())
    return MergeResult(out, seconds, len(entries), sum(e.numel for e in entries), peak_rss_mb(),
                       rec, plan.counts(), gpu_peak_mb(dev, backend))


def plan_recipe(recipe: Recipe | dict[str, Any] | str | Path) -> Plan:
    """The plan a merge of ``recipe`` would run (headers and config.json only, no tensor)."""
    rec = load_recipe(recipe)
    source = CheckpointSource.from_recipe(rec)
    return plan_of(rec, source)


def peak_rss_mb() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / (1024 * 1024) if sys.platform == "darwin" else ru / 1024


def reset_gpu_peak(device: str, backend: Backend | None = None) -> None:
    """Start ``gpu_peak_mb``'s count afresh (a no-op off CUDA and on a remote backend)."""
    if torch.device(device).type == "cuda" and not (backend is not None and backend.remote):
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mb(device: str, backend: Backend | None = None) -> float | None:
    """The most GPU memory torch's allocator held since ``reset_gpu_peak`` (MiB), or None off
    CUDA and on a remote backend (its workers' GPUs). Memory the CUDA context and other
    processes hold is not counted."""
    if torch.device(device).type != "cuda" or (backend is not None and backend.remote):
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


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
    backend = make_backend(workers)
    dev = resolve_device(device)
    plan = plan_of(rec, source)
    stats = run_statistics(plan, source, backend, dev, progress=False)
    step = MergeStep(plan.calibration, stats, dev, plan.compute_dtype, allow_nonfinite)
    result: dict[str, Tensor] = execute(step, plan.entries, source, backend,
                                        StateDictSink(plan), desc="merging", progress=False,
                                        writes_files=False)
    return result
