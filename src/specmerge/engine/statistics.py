"""The statistics pre-pass: whole-model statistics (TIES's global threshold) as rounds of map
over the plan's entries and an exact reduce, and per-tensor statistics over a parameter's row
blocks. Each round runs on the merge's backend."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from specmerge.backends import Backend
from specmerge.io.writer import parse_size
from specmerge.lowrank import dense
from specmerge.memory import READ_AHEAD
from specmerge.methods.registry import Method, Statistic
from specmerge.overlap import read_ahead
from specmerge.plan import Plan, PlanEntry
from specmerge.sources import Source, StoredRows

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = "8MiB"  # per tensor block, in the compute dtype (docs/results/overlap.md)


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

