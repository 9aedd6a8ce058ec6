"""Prefetch on vs off (issue #13, item 2): wall time against the read floor, and the fsync's share.

Writes (once) a Llama-shaped base and K experts with ``specmerge example synthetic``, then for
``--rounds`` rounds, interleaved (the order of the variants alternates from round to round),
runs ``specmerge merge`` for each method and variant (``on``: the default, ``off``:
``--no-prefetch``, ``w2``: ``--workers 2``, ``omp1``: the default with OMP_NUM_THREADS=1,
``off-omp1``), each from a warm page cache (every input read just before, and its residency
checked with ``fincore`` where it exists) and, with ``--cold``, from a cold one (the inputs
evicted first). Per run it records the process's wall time, its CPU time (user + sys, from
``wait4``), its peak private memory (``RssAnon`` sampled every 20 ms), the merge's own time and
the time of the final fsync (from the log of ``-v``).

The read floor is the time to read every input byte once, with positioned reads of 16 MiB into
one buffer (what a reader must do at least); warm after a full read, cold after eviction.
Eviction: ``--evict fadvise`` (default) drops the inputs' pages with
``posix_fadvise(DONTNEED)``, touching no other file on a shared machine; ``--evict
drop_caches`` writes 1 to /proc/sys/vm/drop_caches (root), all files.

    python benchmarks/overlap.py --params 500M --experts 4 --rounds 3 --cold
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from procwatch import drop_pages, watch

BUFFER = 16 << 20
VARIANTS = {"on": ([], {}), "off": (["--no-prefetch"], {}), "w2": (["--workers", "2"], {}),
            "omp1": ([], {"OMP_NUM_THREADS": "1"}),
            "off-omp1": (["--no-prefetch"], {"OMP_NUM_THREADS": "1"})}


@dataclass
class Run:
    wall: float  # the process, imports included
    cpu: float  # user + sys of the process
    anon_mb: float  # peak sampled RssAnon
    merge_s: float  # the merge's own time, as the CLI reports it
    fsync_s: float  # the final fsync of the output shards
    resident: float  # share of the input bytes in the page cache when the run started


def resident_share(files: list[Path]) -> float:
    """The share of the files' bytes in the page cache (``fincore``), or NaN without it."""
    if shutil.which("fincore") is None:
        return float("nan")
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE",
                          *map(str, files)], capture_output=True, text=True, check=True).stdout
    res = size = 0
    for line in out.split("\n"):
        if line.strip():
            r, s = line.split()
            res, size = res + int(r), size + int(s)
    return res / size if size else float("nan")


def read_all(files: list[Path]) -> float:
    """Seconds to read every byte of ``files`` once (positioned reads into one buffer)."""
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            offset = 0
            while n := os.preadv(fd, [view], offset):
                offset += n
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def evict(files: list[Path], how: str) -> None:
    if how == "drop_caches":
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return
    drop_pages(files)


def run_merge(cmd: list[str], env: dict[str, str], resident: float) -> Run:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **env})
        run = watch(proc, t0)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        sys.exit(f"command failed: {' '.join(cmd)}\n{stderr[-3000:]}")
    found = re.search(r"parameters, ([0-9.]+) s", stdout)
    merge_s = float(found.group(1)) if found else float("nan")
    fsyncs = [float(x) for x in re.findall(r"fsync of \d+ shard file\(s\), [0-9.]+ MB: "
                                           r"([0-9.]+) s", stderr)]
    return Run(run.wall, run.cpu, run.peak_anon_mb, merge_s, sum(fsyncs), resident)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="500M")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    ap.add_argument("--variants", nargs="+", default=["on", "off"], choices=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="Also run from a cold page cache.")
    ap.add_argument("--evict", choices=["fadvise", "drop_caches"], default="fadvise")
    ap.add_argument("--block-size", default="8MiB")  # specmerge's default
    ap.add_argument("--workdir", type=Path, default=Path("work/overlap"))
    ap.add_argument("--models", type=Path, default=None,
                    help="An existing base/ and expert_i/ set (default: written under workdir)")
    args = ap.parse_args()

    exe = [sys.executable, "-m", "specmerge.cli"]
    models = (args.models or args.workdir / f"synthetic_{args.params}_{args.experts}_"
                                            f"{args.dtype}").resolve()
    if not (models / "base").exists():
        print(f"writing synthetic models to {models} ...", flush=True)
        subprocess.run([*exe, "example", "synthetic", str(models), "--params", args.params,
                        "--experts", str(args.experts), "--dtype", args.dtype], check=True)
    inputs = sorted(models.rglob("*.safetensors"))
    size_gb = sum(f.stat().st_size for f in inputs) / 1e9
    recipes = {}
    for method in args.methods:
        recipes[method] = Path(tempfile.mkdtemp()) / "recipe.yaml"
        experts = [str(models / f"expert_{i + 1}") for i in range(args.experts)]
        recipes[method].write_text(f"base_model: {models / 'base'}\nmodels: {experts}\n"
                                   f"merge_method: {method}\n")
    out = args.workdir / "merged"
    caches = ["warm", "cold"] if args.cold else ["warm"]
    floors: dict[str, list[float]] = defaultdict(list)
    runs: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    loads = []
    for r in range(args.rounds):
        read_all(inputs)
        floors["warm"].append(read_all(inputs))
        if args.cold:
            evict(inputs, args.evict)
            floors["cold"].append(read_all(inputs))
        order = args.variants if r % 2 == 0 else args.variants[::-1]
        for cache in caches:
            for method in args.methods:
                for variant in order:
                    flags, env = VARIANTS[variant]
                    shutil.rmtree(out, ignore_errors=True)
                    if cache == "warm":
                        read_all(inputs)
                    else:
                        evict(inputs, args.evict)
                    resident = resident_share(inputs)
                    loads.append(os.getloadavg()[0])
                    run = run_merge([*exe, "-v", "merge", str(recipes[method]), str(out),
                                     "--quiet", "--block-size", args.block_size, *flags], env,
                                    resident)
                    runs[cache, method, variant].append(run)
                    print(f"round {r + 1} {cache} {method} {variant}: wall {run.wall:.1f} s, "
                          f"cpu {run.cpu:.1f} s, merge {run.merge_s:.1f} s, fsync "
                          f"{run.fsync_s:.2f} s, RssAnon {run.anon_mb:.0f} MB, inputs "
                          f"{run.resident:.0%} cached, load {loads[-1]:.1f}", flush=True)
    shutil.rmtree(out, ignore_errors=True)

    med = statistics.median
    print(f"\nsynthetic Llama-shaped model, {args.params} parameters, K={args.experts}, "
          f"{args.dtype}; inputs {size_gb:.1f} GB in {len(inputs)} files; block size "
          f"{args.block_size}; {args.rounds} interleaved rounds, medians; load average during "
          f"the runs {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")
    for cache in caches:
        print(f"read floor ({cache}, every input byte once, 16 MiB positioned reads): "
              f"{med(floors[cache]):.2f} s ({size_gb / med(floors[cache]):.1f} GB/s; rounds: "
              + ", ".join(f"{x:.2f}" for x in floors[cache]) + ")")
    print("\n| cache | method | variant | wall (s) | vs on | wall / read floor | CPU (s) | "
          "merge (s) | fsync (s) | fsync / wall | peak RssAnon (MB) | inputs cached |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cache in caches:
        for method in args.methods:
            base = med([x.wall for x in runs[cache, method, args.variants[0]]])
            for variant in args.variants:
                rs = runs[cache, method, variant]
                wall = med([x.wall for x in rs])
                fsync = med([x.fsync_s for x in rs])
                print(f"| {cache} | {method} | {variant} | {wall:.1f} "
                      f"({min(x.wall for x in rs):.1f}-{max(x.wall for x in rs):.1f}) | "
                      f"{wall / base:.2f} | {wall / med(floors[cache]):.1f} | "
                      f"{med([x.cpu for x in rs]):.1f} | {med([x.merge_s for x in rs]):.1f} | "
                      f"{fsync:.2f} | {fsync / wall:.0%} | "
                      f"{med([x.anon_mb for x in rs]):.0f} | "
                      f"{min(x.resident for x in rs):.0%} |")


if __name__ == "__main__":
    main()
