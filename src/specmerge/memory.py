"""The memory bound of a merge, stated once: ``specmerge plan`` prints it, ``merge`` checks it
against the memory available before any tensor is read, and the docs quote ``FORMULA``.

Per worker, with K experts, c the compute dtype's bytes per entry and r = the inputs' bytes per
entry / c (1 for float32 inputs, 1/2 for bf16; taken as 1, the larger):

- a parameter merged whole (matrix methods, calibrated parameters, tensors of one block):
  (K + 3) × its size in the compute dtype (K task vectors, θ0, the merged update and one
  temporary), plus 3 float64 copies for the WUDI family's float64 core (D, τ_0 and the m × k
  temporary of ``methods.interference``);
- a parameter merged in row blocks: (K + 3) blocks being merged, (READ_AHEAD + 1)(K + 1) r of
  read buffers and WRITE_BEHIND blocks being written with prefetch, (K + 3) + (K + 1) r without;

and the whole merge holds ``workers`` × the largest of those, plus the process itself (Python,
torch and the libraries: ``BASELINE``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from specmerge.errors import SpecmergeError
from specmerge.methods import get_method
from specmerge.plan import Plan, PlanEntry

log = logging.getLogger(__name__)

FORMULA = ("workers × max over parameters of: (K + 3) × the parameter (merged whole; + 3 float64 "
           "copies for the WUDI family) or (3K + 6) blocks ((2K + 4) without prefetch; merged in "
           "row blocks), in the compute dtype, + the process (~300 MB)")
BASELINE = 300 * 2**20  # Python, torch and the libraries, measured at 240-300 MB RSS
READ_AHEAD, WRITE_BEHIND = 1, 1  # the prefetch depths of the row-block loop (engine.merge_rows)
CORE_COPIES = 3  # float64 m × n matrices of the WUDI family's core (methods.interference)


@dataclass(frozen=True)
class Estimate:
    """The peak a merge is expected to hold, in bytes, and the parameter that sets it."""

    peak: int
    largest: str
    per_worker: int
    workers: int

    def describe(self) -> str:
        return (f"{human(self.peak)} ({self.workers} worker(s) × {human(self.per_worker)} for "
                f"{self.largest!r}, + {human(BASELINE)} for the process)")


def human(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def blocks_in_memory(k: int, prefetch: bool, r: float = 1.0) -> float:
    """Blocks (of the compute dtype) a parameter merged in row blocks holds at once."""
    merging = k + 3
    if not prefetch:
        return merging + (k + 1) * r
    return merging + (READ_AHEAD + 1) * (k + 1) * r + WRITE_BEHIND


def entry_bytes(entry: PlanEntry, k: int, itemsize: int, block_size: int,
                prefetch: bool) -> int:
    """The bytes one parameter holds while it is merged (see the module docstring)."""
    size = entry.numel * itemsize
    if entry.action == "copy" or entry.method is None:
        return size
    method = get_method(entry.method)
    if method.rowwise and not entry.calibrate and size > block_size:
        return int(blocks_in_memory(k, prefetch) * block_size)
    extra = CORE_COPIES * entry.numel * 8 if method.family == "interference" else 0
    return (k + 3) * size + extra


def estimate(plan: Plan, *, block_size: int, workers: int = 1, prefetch: bool = True,
             entries: Sequence[PlanEntry] | None = None) -> Estimate:
    """The expected peak of merging ``plan`` (``FORMULA``), or only its ``entries`` (an output
    format that writes some); a factored update is counted as dense, an upper bound."""
    k = len(plan.recipe.models)
    itemsize = plan.compute_dtype.itemsize
    sizes = {e.name: entry_bytes(e, k, itemsize, block_size, prefetch)
             for e in (plan.entries if entries is None else entries)}
    largest = max(sizes, key=lambda n: sizes[n]) if sizes else "-"
    per_worker = sizes.get(largest, 0)
    return Estimate(min(workers, max(1, len(sizes))) * per_worker + BASELINE, largest,
                    per_worker, workers)


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(est: Estimate, available: int | None = None) -> None:
    """Refuse a merge whose estimate exceeds the available memory, with the numbers; warn when
    it takes more than 80 % of it. Nothing is checked where the available memory is unknown."""
    available = available_memory() if available is None else available
    if available is None:
        return
    if est.peak > available:
        raise SpecmergeError(
            f"not enough memory: this merge needs about {est.describe()}, and "
            f"{human(available)} is available; use fewer --workers, a smaller "
            f"--block-size, or a machine with more memory (the estimate: {FORMULA})")
    if est.peak > 0.8 * available:
        log.warning("this merge needs about %s, close to the %s available", est.describe(),
                    human(available))
