"""Backends: run a step over plan entries and yield (entry, result) pairs as they finish.

``map(step, entries, source)`` calls ``step(entry, source)`` for every entry. A step and a source
are picklable, so a backend may run them in other processes or on other machines; results never
depend on the backend, on how many steps run at once or on the order they finish in (the sinks
place each result by its entry). The local backend runs in this process: serially, or on threads
with at most ``workers`` entries in flight (torch releases the GIL in its kernels). The Ray
backend (``specmerge.ray_backend``, imported only when asked for) runs them as Ray tasks.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from specmerge.plan import PlanEntry

R = TypeVar("R")
Step = Callable[[PlanEntry, Any], R]


class Backend(Protocol):
    """``remote``: steps run in other processes, which write their tensors into the output's
    regions themselves; ``check_files``: raise unless every worker sees ``paths`` as this
    process does (``what`` names them in the error: "input", "output")."""

    remote: bool

    def map(self, step: Step[R], entries: Sequence[PlanEntry], source: Any
            ) -> Iterator[tuple[PlanEntry, R]]: ...

    def check_files(self, paths: Sequence[Path], what: str) -> None: ...


@dataclass(frozen=True)
class LocalBackend:
    """This process: serial with ``workers`` 1, else a thread pool with ``workers`` in flight."""

    workers: int = 1
    remote = False

    def check_files(self, paths: Sequence[Path], what: str) -> None:
        """Nothing to check: the steps run in this process."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    def map(self, step: Step[R], entries: Sequence[PlanEntry], source: Any
            ) -> Iterator[tuple[PlanEntry, R]]:
        if self.workers == 1:
            for entry in entries:
                yield entry, step(entry, source)
            return
        # each worker computes with the caller's torch threads: a new thread starts from
        # OpenMP's default team size, and another team size rounds LAPACK and BLAS differently
        with cf.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="specmerge",
                                   initializer=torch.set_num_threads,
                                   initargs=(torch.get_num_threads(),)) as pool:
            pending: dict[cf.Future[R], PlanEntry] = {}
            it = iter(entries)
            try:
                for entry in it:
                    pending[pool.submit(step, entry, source)] = entry
                    if len(pending) >= self.workers:
                        break
                while pending:
                    done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        entry = pending.pop(fut)
                        yield entry, fut.result()
                        nxt = next(it, None)
                        if nxt is not None:
                            pending[pool.submit(step, nxt, source)] = nxt
            finally:
                for fut in pending:
                    fut.cancel()
