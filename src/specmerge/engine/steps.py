"""The merge step: one parameter, θ0 + merged update in its output dtype, read and merged
whole or in row blocks written straight into the sink's region.

Memory. A parameter whose method is ``rowwise`` (the element-wise methods, and the fallbacks of
the matrix methods) and whose inputs are read by rows is merged in row blocks of at most
``block_size`` bytes of the compute dtype per tensor; anything else is read whole. The bound is
stated once, in ``specmerge.memory``.

NaN/Inf. A method that ``propagates_nonfinite`` is checked on its output only (one pass); when
that finds a NaN/Inf, the inputs are scanned to name the file that holds it. Other methods'
inputs are checked as they are read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from specmerge.engine.statistics import DEFAULT_BLOCK_SIZE, block_reader, tensor_statistics
from specmerge.engine.update import run_method, to_output
from specmerge.io.sinks import Written
from specmerge.io.writer import Region, parse_size
from specmerge.lowrank import dense, is_zero
from specmerge.memory import READ_AHEAD, WRITE_BEHIND
from specmerge.methods.registry import Method, get_method
from specmerge.overlap import read_ahead, write_behind
from specmerge.plan import PlanEntry
from specmerge.sources import Source, check_finite, count_nonfinite, nonfinite_error


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

    def bind(self, regions: Mapping[str, Region], remote: bool) -> MergeStep:
        """This step writing into ``regions``: row blocks always, whole tensors too on a
        ``remote`` backend (its results never travel back)."""
        return dataclasses.replace(self, regions=regions, write_whole=remote)

    def __call__(self, entry: PlanEntry, source: Source) -> Tensor | Written:
        block = self.block_rows(entry, source) if entry.action != "copy" else None
        if block is not None:
            return self.merge_rows(entry, source, block)
        if entry.action == "copy":  # the base's tensor, or the one input a slice names
            out = (to_output(source.input_tensor(entry.inputs[0]), entry,
                             self.allow_nonfinite) if entry.copies_one
                   else source.base_tensor(entry.name))
        else:
            out = self.merge_whole(entry, source)
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
            update = run_method(entry, tv.taus, self.calibration, self.statistics,
                                base=tv.theta0)
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
                update = run_method(entry, tv.taus, None, values, offset=lo * per_row,
                                    base=tv.theta0)
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

