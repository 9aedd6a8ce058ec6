"""Prefetch on vs off (issue #13, item 2): wall time against the read floor, and the fsync's share.

Writes (once) a Llama-shaped base and K experts with ``specmerge example synthetic``. Two modes:

``--mode merge`` (default): for ``--rounds`` rounds, interleaved (``toolkit.round_order``: the
variants turn by one place each round), runs ``specmerge merge`` for each method and variant
(``on``: the default, ``off``: ``--no-prefetch``, ``w2``: ``--workers 2``, ``omp1``: the
default with OMP_NUM_THREADS=1, ``off-omp1``), each from a warm page cache (every input read
just before, and its residency checked with ``fincore`` where it exists) and, with ``--cold``,
from a cold one (the inputs evicted first). Per run it records the process's wall time, its CPU
time (user + sys, from ``wait4``), its peak private memory (``RssAnon`` sampled every 20 ms),
the merge's own time and the time of the final fsync (from the log of ``-v``).

``--mode blocks``: only the parameters that span several blocks (``--block-params``; by default
the embedding and the head, of the 500M model several 16MiB blocks each), in this process, warm:
``specmerge.merge(..., prefetch=True/False)`` on a copy of the base and experts that holds just
those tensors, on and off interleaved for ``--rounds`` rounds; medians and their ratio. No
process start, no import, no other tensor.

The read floor is the time to read every input byte once, with positioned reads of 16 MiB into
one buffer (what a reader must do at least); warm after a full read, cold after eviction.
Eviction: ``--evict fadvise`` (default) drops the inputs' pages with
``posix_fadvise(DONTNEED)``, touching no other file on a shared machine; ``--evict
drop_caches`` writes to /proc/sys/vm/drop_caches (root), all files.

    python benchmarks/overlap.py --params 500M --experts 4 --rounds 3 --cold
    python benchmarks/overlap.py --mode blocks --params 500M --block-size 16MiB --rounds 7
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from toolkit import evict, interleave, median, read_floor, resident_bytes, round_order, run_watched

VARIANTS = {"on": ([], {}), "off": (["--no-prefetch"], {}), "w2": (["--workers", "2"], {}),
            "omp1": ([], {"OMP_NUM_THREADS": "1"}),
            "off-omp1": (["--no-prefetch"], {"OMP_NUM_THREADS": "1"})}
EXE = [sys.executable, "-m", "specmerge.cli"]


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
    found = resident_bytes(files)
    return found[0] / found[1] if found and found[1] else float("nan")


def run_merge(cmd: list[str], env: dict[str, str], resident: float) -> Run:
    run, stdout, stderr = run_watched(cmd, env)
    if run.returncode:
        sys.exit(f"command failed: {' '.join(cmd)}\n{stderr[-3000:]}")
    found = re.search(r"parameters, ([0-9.]+) s", stdout)
    merge_s = float(found.group(1)) if found else float("nan")
    fsyncs = [float(x) for x in re.findall(r"fsync of \d+ shard file\(s\), [0-9.]+ MB: "
                                           r"([0-9.]+) s", stderr)]
    return Run(run.wall, run.cpu, run.peak_anon_mb, merge_s, sum(fsyncs), resident)


def ensure_models(args: argparse.Namespace) -> Path:
    models = (args.models or args.workdir / f"synthetic_{args.params}_{args.experts}_"
                                            f"{args.dtype}").resolve()
    if not (models / "base").exists():
        print(f"writing synthetic models to {models} ...", flush=True)
        subprocess.run([*EXE, "example", "synthetic", str(models), "--params", args.params,
                        "--experts", str(args.experts), "--dtype", args.dtype], check=True)
    return models


def recipe_text(models: Path, experts: int, method: str) -> str:
    names = [str(models / f"expert_{i + 1}") for i in range(experts)]
    return f"base_model: {models / 'base'}\nmodels: {names}\nmerge_method: {method}\n"


def bench_merge(args: argparse.Namespace, models: Path) -> None:
    inputs = sorted(models.rglob("*.safetensors"))
    size_gb = sum(f.stat().st_size for f in inputs) / 1e9
    recipes = {}
    for method in args.methods:
        recipes[method] = Path(tempfile.mkdtemp()) / "recipe.yaml"
        recipes[method].write_text(recipe_text(models, args.experts, method))
    out = args.workdir / "merged"
    caches = ["warm", "cold"] if args.cold else ["warm"]
    floors: dict[str, list[float]] = defaultdict(list)
    runs: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    loads = []
    for r in range(args.rounds):
        read_floor(inputs)
        floors["warm"].append(read_floor(inputs)[0])
        if args.cold:
            evict(inputs, args.evict)
            floors["cold"].append(read_floor(inputs)[0])
        for cache in caches:
            for method in args.methods:
                for variant in round_order(args.variants, r):
                    flags, env = VARIANTS[variant]
                    shutil.rmtree(out, ignore_errors=True)
                    if cache == "warm":
                        read_floor(inputs)
                    else:
                        evict(inputs, args.evict)
                    resident = resident_share(inputs)
                    loads.append(os.getloadavg()[0])
                    run = run_merge([*EXE, "-v", "merge", str(recipes[method]), str(out),
                                     "--quiet", "--block-size", args.block_size, *flags], env,
                                    resident)
                    runs[cache, method, variant].append(run)
                    print(f"round {r + 1} {cache} {method} {variant}: wall {run.wall:.1f} s, "
                          f"cpu {run.cpu:.1f} s, merge {run.merge_s:.1f} s, fsync "
                          f"{run.fsync_s:.2f} s, RssAnon {run.anon_mb:.0f} MB, inputs "
                          f"{run.resident:.0%} cached, load {loads[-1]:.1f}", flush=True)
    shutil.rmtree(out, ignore_errors=True)

    print(f"\nsynthetic Llama-shaped model, {args.params} parameters, K={args.experts}, "
          f"{args.dtype}; inputs {size_gb:.1f} GB in {len(inputs)} files; block size "
          f"{args.block_size}; {args.rounds} interleaved rounds, medians; load average during "
          f"the runs {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")
    for cache in caches:
        print(f"read floor ({cache}, every input byte once, 16 MiB positioned reads): "
              f"{median(floors[cache]):.2f} s ({size_gb / median(floors[cache]):.1f} GB/s; "
              "rounds: " + ", ".join(f"{x:.2f}" for x in floors[cache]) + ")")
    print("\n| cache | method | variant | wall (s) | vs on | wall / read floor | CPU (s) | "
          "merge (s) | fsync (s) | fsync / wall | peak RssAnon (MB) | inputs cached |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cache in caches:
        for method in args.methods:
            base = median([x.wall for x in runs[cache, method, args.variants[0]]])
            for variant in args.variants:
                rs = runs[cache, method, variant]
                wall = median([x.wall for x in rs])
                fsync = median([x.fsync_s for x in rs])
                print(f"| {cache} | {method} | {variant} | {wall:.1f} "
                      f"({min(x.wall for x in rs):.1f}-{max(x.wall for x in rs):.1f}) | "
                      f"{wall / base:.2f} | {wall / median(floors[cache]):.1f} | "
                      f"{median([x.cpu for x in rs]):.1f} | "
                      f"{median([x.merge_s for x in rs]):.1f} | "
                      f"{fsync:.2f} | {fsync / wall:.0%} | "
                      f"{median([x.anon_mb for x in rs]):.0f} | "
                      f"{min(x.resident for x in rs):.0%} |")


def subset_models(models: Path, experts: int, names: list[str], root: Path) -> tuple[Path, int]:
    """A copy of base/ and expert_i/ holding only the tensors ``names`` (and config.json);
    (its root, the entries of one model's copy)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    numel = 0
    for d in ["base", *(f"expert_{i + 1}" for i in range(experts))]:
        tensors = {}
        for f in sorted((models / d).glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                tensors.update({n: fh.get_tensor(n) for n in fh.keys() if n in names})
        missing = sorted(set(names) - set(tensors))
        if missing:
            sys.exit(f"--block-params: {missing} not in {models / d}")
        (root / d).mkdir(parents=True)
        save_file(tensors, str(root / d / "model.safetensors"))
        shutil.copy(models / d / "config.json", root / d / "config.json")
        numel = sum(t.numel() for t in tensors.values())
    return root, numel


def bench_blocks(args: argparse.Namespace, models: Path) -> None:
    import specmerge

    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        subset, numel = subset_models(models, args.experts, args.block_params, work / "models")
        inputs = sorted(subset.rglob("*.safetensors"))
        recipe = {"base_model": str(subset / "base"), "merge_method": args.methods[0],
                  "models": [str(subset / f"expert_{i + 1}") for i in range(args.experts)]}
        read_floor(inputs)  # warm

        def run(variant: str, r: int) -> float:
            start = time.perf_counter()
            specmerge.merge(recipe, work / f"out-{r}-{variant}", prefetch=variant == "on",
                            block_size=args.block_size, progress=False)
            seconds = time.perf_counter() - start
            shutil.rmtree(work / f"out-{r}-{variant}")
            return seconds

        times = interleave(["on", "off"], args.rounds, run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {v: median(ts) for v, ts in times.items()}
    for v in ("on", "off"):
        print(f"prefetch {v:<3}: median {med[v]:.2f} s (rounds: "
              + ", ".join(f"{t:.2f}" for t in times[v]) + ")")
    print(f"on / off: {med['on'] / med['off']:.2f}; {args.methods[0]}, "
          f"{len(args.block_params)} parameters, {numel / 1e6:.0f}M entries, K = "
          f"{args.experts}, block size {args.block_size}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["merge", "blocks"], default="merge")
    ap.add_argument("--params", default="500M")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"],
                    help="with --mode blocks, the first is used")
    ap.add_argument("--variants", nargs="+", default=["on", "off"], choices=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="Also run from a cold page cache.")
    ap.add_argument("--evict", choices=["fadvise", "drop_caches"], default="fadvise")
    ap.add_argument("--block-size", default=None,
                    help="default: specmerge's (8MiB) in merge mode, 16MiB in blocks mode")
    ap.add_argument("--block-params", nargs="+",
                    default=["model.embed_tokens.weight", "lm_head.weight"],
                    help="--mode blocks: the parameters merged")
    ap.add_argument("--workdir", type=Path, default=Path("work/overlap"))
    ap.add_argument("--models", type=Path, default=None,
                    help="An existing base/ and expert_i/ set (default: written under workdir)")
    args = ap.parse_args()
    args.block_size = args.block_size or ("16MiB" if args.mode == "blocks" else "8MiB")
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = ensure_models(args)
    (bench_blocks if args.mode == "blocks" else bench_merge)(args, models)


if __name__ == "__main__":
    main()
