"""Prefetch on vs off for chosen parameters only, in one process (no imports, no other tensor).

Runs ``MergeStep`` on the named parameters of a recipe (by default the embedding and the head,
the parameters of the 500M synthetic model that span several 16MiB blocks), writing them into a
fresh preallocated shard, with prefetch on and off interleaved for ``--rounds`` rounds, and
prints the median times and their ratio. Inputs should be in the page cache (run it twice).

    python benchmarks/overlap_blocks.py RECIPE --rounds 7
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from specmerge.engine import MergeStep, plan_of
from specmerge.io.writer import OutTensor, ShardedWriter, parse_size
from specmerge.recipe import load_recipe
from specmerge.sources import CheckpointSource


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--params", nargs="+", default=["model.embed_tokens.weight",
                                                    "lm_head.weight"])
    ap.add_argument("--block-size", default="16MiB")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    rec = load_recipe(args.recipe)
    source = CheckpointSource.from_recipe(rec)
    plan = plan_of(rec, source)
    entries = [e for e in plan.entries if e.name in args.params]
    times: dict[bool, list[float]] = {True: [], False: []}
    root = Path(tempfile.mkdtemp())
    try:
        for r in range(args.rounds):
            for prefetch in (True, False) if r % 2 == 0 else (False, True):
                out = root / f"{r}-{prefetch}"
                out.mkdir()
                w = ShardedWriter(out, [OutTensor(e.name, e.out_shape, e.out_dtype)
                                        for e in entries], 10**12)
                step = MergeStep(plan.calibration, {}, "cpu", plan.compute_dtype, False,
                                 parse_size(args.block_size), prefetch,
                                 regions={e.name: w.region(e.name) for e in entries})
                t0 = time.perf_counter()
                for e in entries:
                    result = step(e, source)
                    if isinstance(result, torch.Tensor):
                        w.write(e.name, result)
                    else:
                        w.mark_written(e.name)
                times[prefetch].append(time.perf_counter() - t0)
                w.close()
                shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {p: statistics.median(ts) for p, ts in times.items()}
    for p in (True, False):
        print(f"prefetch {'on ' if p else 'off'}: median {med[p]:.2f} s (rounds: "
              + ", ".join(f"{t:.2f}" for t in times[p]) + ")")
    print(f"on / off: {med[True] / med[False]:.2f}; {len(entries)} parameters, "
          f"{sum(e.numel for e in entries) / 1e6:.0f}M entries, K = {source.num_experts}")


if __name__ == "__main__":
    main()
