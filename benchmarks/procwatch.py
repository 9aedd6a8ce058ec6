"""A child process's wall time, CPU time and memory, as the benchmarks measure them, and
``drop_pages``, which evicts input files from the page cache before a cold run.

``watch`` waits for a started process with ``wait4`` (exit status, CPU time, peak RSS as the
kernel counts it) while a thread samples ``/proc/PID/status`` every ``interval`` seconds: the
peak of ``RssAnon`` (private memory: what a merge itself allocates, not the page cache of the
files it maps) and of ``VmRSS``, of the process alone or summed over its process tree.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def status_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, RssAnon) of ``pid`` in MB; zeros once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0, 0.0
    found = dict(re.findall(r"^(VmRSS|RssAnon):\s+(\d+) kB", text, re.MULTILINE))
    return int(found.get("VmRSS", 0)) / 1024, int(found.get("RssAnon", 0)) / 1024


def rss_anon_mb(pid: int) -> float:
    """The private resident memory of ``pid`` (RssAnon) in MB; 0 once it is gone."""
    return status_mb(pid)[1]


def drop_pages(files: list[Path]) -> None:
    """Evict ``files`` from the page cache (``posix_fadvise(DONTNEED)``), touching no other
    file's pages on a shared machine."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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
    """Wait for ``proc``, sampling its memory (and its descendants' with ``tree``)."""
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
