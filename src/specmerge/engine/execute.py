"""The last stage: a step run on every entry through a backend into a sink, under a guard that
turns SIGTERM and SIGHUP into a clean-up. The sink interface is defined here."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from tqdm.auto import tqdm

from specmerge.backends import Backend, Step
from specmerge.errors import Interrupted
from specmerge.io.writer import Region
from specmerge.plan import PlanEntry
from specmerge.sources import Source


class Sink(Protocol):
    """Where results go. Entering claims the destination; ``regions`` are the places a step may
    write a parameter's bytes into itself (empty: results come back whole); ``put`` places one
    result by its entry, in any order; ``finish`` completes the output once every entry is in;
    leaving without ``finish`` leaves nothing that looks complete."""

    def __enter__(self) -> Any: ...

    def regions(self) -> Mapping[str, Region]: ...

    def put(self, entry: PlanEntry, result: Any) -> None: ...

    def finish(self) -> Any: ...

    def __exit__(self, *exc: Any) -> Any: ...


@runtime_checkable
class WritesRegions(Protocol):
    """A step that writes results into a sink's regions itself: ``execute`` binds them."""

    def bind(self, regions: Mapping[str, Region], remote: bool) -> Any: ...


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
    remote backend every tensor (the workers must then see the output's files): ``execute``
    binds the sink's regions to a step that ``WritesRegions``."""
    guard = termination_as_error() if writes_files else contextlib.nullcontext()
    with guard, sink:
        regions = sink.regions()
        if regions and isinstance(step, WritesRegions):
            step = step.bind(regions, backend.remote)
            if backend.remote:
                backend.check_files(sorted({r.file for r in regions.values()}), "output")
        bar = tqdm(total=len(entries), desc=desc, unit="tensor", disable=not progress,
                   dynamic_ncols=True)
        for entry, result in backend.map(step, entries, source):
            sink.put(entry, result)
            bar.set_postfix_str(entry.name, refresh=False)
            bar.update(1)
        bar.close()
        return sink.finish()

