"""What every benchmark measures with, written once: the page cache, timers, memory, rounds.

- **Cold cache.** ``evict`` drops input files from the page cache (``posix_fadvise(DONTNEED)``
  on those files only, or ``/proc/sys/vm/drop_caches`` for all of them, as root);
  ``resident_bytes`` says how much of them stayed (``fincore``); ``read_floor`` times reading
  every byte once (16 MiB positioned reads into one buffer: what a reader must do at least).
- **Timers.** ``sync`` waits for a CUDA device; ``timer`` adds a block's seconds to a dict;
  ``timed`` times one call; ``time_call`` warms up, then times up to ``repeat`` calls within a
  budget and keeps every time (``Timing.median``, ``Timing.best``).
- **Memory.** ``status_mb`` reads ``VmRSS`` and ``RssAnon`` (private memory: what a process
  allocates itself, not the page cache of the files it maps) from ``/proc/PID/status``;
  ``watch`` waits for a child with ``wait4`` while a thread samples those peaks;
  ``PeakMemory`` samples this process's own RSS (or the CUDA allocator's peak) in a ``with``.
- **Interleaved rounds.** ``round_order`` turns the variants by one place per round (A, B, then
  B, A, …), so that drift in the machine's load falls on every variant alike; ``interleave``
  runs them for N rounds; ``median`` and ``median_ratio`` summarise.

Standard library only at import (torch and psutil are imported where needed): ``wudi_family``
imports it in a virtualenv without specmerge. Scripts in ``benchmarks/`` import it as
``toolkit`` (their folder is first on ``sys.path``); ``benchmarks/peers/`` puts ``benchmarks/``
on ``sys.path`` first.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
READ_BUFFER = 16 << 20


# ---------------------------------------------------------------------------------------------
# the page cache
# ---------------------------------------------------------------------------------------------

def resident_bytes(files: Sequence[Path]) -> tuple[int, int] | None:
    """(bytes of ``files`` in the page cache, their size) from util-linux ``fincore``, or None
    without it."""
    if shutil.which("fincore") is None:
        return None
    res = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE",
                          *map(str, files)], capture_output=True, text=True)
    if res.returncode:
        return None
    resident = size = 0
    for line in res.stdout.splitlines():
        if line.strip():
            r, s = line.split()
            resident, size = resident + int(r), size + int(s)
    return resident, size


def drop_pages(files: Sequence[Path]) -> None:
    """Evict ``files`` from the page cache (``posix_fadvise(DONTNEED)``), touching no other
    file's pages on a shared machine."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def evict(files: Sequence[Path], how: str = "fadvise") -> str:
    """Write dirty pages back (``sync``) and drop ``files`` from the page cache; returns the
    way used. ``fadvise``: those files only; ``drop_caches``: every file (root); ``auto``:
    drop_caches where allowed, else fadvise; ``none``: nothing."""
    if how == "none":
        return how
    os.sync()
    if how in ("auto", "drop_caches"):
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "drop_caches"
        except OSError:
            if how == "drop_caches":
                raise
    drop_pages(files)
    return "fadvise"


def read_floor(files: Sequence[Path]) -> tuple[float, int]:
    """(seconds, bytes) to read every byte of ``files`` once, one after another, in 16 MiB
    positioned reads into one buffer, from the page cache as it is now."""
    view = memoryview(bytearray(READ_BUFFER))
    total = 0
    start = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            offset = 0
            while n := os.preadv(fd, [view], offset):
                offset += n
            total += offset
        finally:
            os.close(fd)
    return time.perf_counter() - start, total


# ---------------------------------------------------------------------------------------------
# timers
# ---------------------------------------------------------------------------------------------

def sync(device: Any = None) -> None:
    """Wait for the CUDA device's queued work (nothing on a CPU or without a device)."""
    if device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timer(out: dict[str, float], key: str, device: Any = None) -> Iterator[None]:
    """Add the block's wall seconds to ``out[key]`` (synchronised on a CUDA ``device``)."""
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    out[key] = out.get(key, 0.0) + time.perf_counter() - start


def timed(fn: Callable[[], T], device: Any = None) -> tuple[float, T]:
    """(seconds, result) of one call of ``fn``."""
    t: dict[str, float] = {}
    with timer(t, "s", device):
        result = fn()
    return t["s"], result


@dataclass
class Timing:
    warmup: float
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def runs(self) -> int:
        return len(self.times)


def time_call(fn: Callable[[], object], repeat: int = 3, budget: float = float("inf"),
              device: Any = None) -> Timing:
    """One warm-up call, then up to ``repeat`` timed calls, fewer (at least one) when the
    warm-up says they would not fit in ``budget`` seconds."""
    warm, _ = timed(fn, device)
    runs = max(1, min(repeat, int(budget // max(warm, 1e-9)) if budget < float("inf")
                      else repeat))
    return Timing(warm, [timed(fn, device)[0] for _ in range(runs)])


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------

def status_mb(pid: int | str = "self") -> tuple[float, float]:
    """(VmRSS, RssAnon) of ``pid`` in MB from /proc; zeros once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0, 0.0
    found = dict(re.findall(r"^(VmRSS|RssAnon):\s+(\d+) kB", text, re.MULTILINE))
    return int(found.get("VmRSS", 0)) / 1024, int(found.get("RssAnon", 0)) / 1024


def rss_bytes() -> int:
    """This process's resident set size in bytes (/proc/self/statm, else psutil)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


@dataclass
class Watched:
    returncode: int
    wall: float  # from ``t0`` (taken before the process started) to its exit
    cpu: float  # user + sys of the process and its waited-for children
    max_rss_mb: float  # wait4's peak RSS (Linux starts it at the parent's RSS at fork)
    peak_rss_mb: float  # sampled VmRSS, summed over the tree with ``tree``
    peak_anon_mb: float  # sampled RssAnon, likewise


def watch(proc: subprocess.Popen, t0: float, interval: float = 0.02, tree: bool = False
          ) -> Watched:
    """Wait for ``proc`` with ``wait4`` while a thread samples its VmRSS and RssAnon every
    ``interval`` seconds (summed over its descendants too with ``tree``)."""
    peak = [0.0, 0.0]
    stop = threading.Event()

    def pids() -> list[int]:
        if not tree:
            return [proc.pid]
        import psutil

        try:
            return [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        except psutil.Error:
            return [proc.pid]

    def sample() -> None:
        while not stop.is_set():
            stats = [status_mb(p) for p in pids()]
            peak[0] = max(peak[0], sum(s[0] for s in stats))
            peak[1] = max(peak[1], sum(s[1] for s in stats))
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Watched(proc.returncode, wall, usage.ru_utime + usage.ru_stime,
                   usage.ru_maxrss / 1024, peak[0], peak[1])


def run_watched(cmd: Sequence[str], env: dict[str, str] | None = None,
                interval: float = 0.02, tree: bool = False) -> tuple[Watched, str, str]:
    """Run ``cmd`` to its end under ``watch``; (the measures, its stdout, its stderr)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err,
                                env=None if env is None else {**os.environ, **env})
        run = watch(proc, t0, interval, tree)
        out.seek(0)
        err.seek(0)
        return run, out.read(), err.read()


@dataclass
class PeakMemory:
    """Peak memory above the level at entry, in bytes (``extra``): the CUDA allocator's peak on
    a CUDA ``device``, else this process's RSS sampled every ``interval`` seconds."""

    device: Any = None
    interval: float = 0.001
    extra: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _cuda(self) -> bool:
        return self.device is not None and getattr(self.device, "type", "") == "cuda"

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self._cuda():
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self._cuda():
            import torch

            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.extra = max(self._peak, rss_bytes()) - self._base


# ---------------------------------------------------------------------------------------------
# interleaved rounds
# ---------------------------------------------------------------------------------------------

def round_order(variants: Sequence[T], r: int) -> list[T]:
    """The variants of round ``r`` (from 0), turned by ``r`` places: A B C, B C A, C A B, …;
    with two variants, A B then B A."""
    turn = r % len(variants) if variants else 0
    return [*variants[turn:], *variants[:turn]]


def interleave(variants: Sequence[str], rounds: int, run: Callable[[str, int], T]
               ) -> dict[str, list[T]]:
    """``run(variant, round)`` for every variant in every round, in ``round_order``; the
    results per variant, in round order."""
    out: dict[str, list[T]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in round_order(variants, r):
            out[v].append(run(v, r))
    return out


def median(xs: Sequence[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(xs) if len(xs) else float("nan")


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median over rounds of a[r] / b[r]: each ratio within one round, under one load."""
    return median([x / y for x, y in zip(a, b, strict=True)])


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, or ``?``."""
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"
