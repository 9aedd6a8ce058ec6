"""Cost of the WUDI family's float64 core against a float32 one, in the same run.

SWUDI, SWUDI-A and the closed form form C and D, decompose C and apply the update in float64
(``specmerge.methods.interference.CORE_DTYPE``) whatever the compute dtype; the official code
stays in float32. This times SWUDI and the closed form on float32 task vectors with the core in
float64 and in float32 (the constant patched), interleaved rounds, median of ``--rounds``, and
prints the ratio; it also prints how far the float32 core lands from the float64 one.

    python benchmarks/core_dtype.py [--shapes 1024x1024,4096x4096] [--experts 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see README, Performance

import torch

from specmerge.methods import interference as wudi
from specmerge.synthetic import structured_task_vectors

METHODS = {"swudi": wudi.swudi, "wudi_closed_form": wudi.wudi_closed_form}


def run(fn, taus: list[torch.Tensor], dtype: torch.dtype) -> tuple[float, torch.Tensor]:
    wudi.CORE_DTYPE = dtype
    start = time.perf_counter()
    out = fn(taus)
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1024x1024,4096x4096")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, K = {args.experts}\n")
    print("| method | shape | float32 core s | float64 core s | ratio | rel. difference |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        m, n = (int(x) for x in shape.split("x"))
        gen = torch.Generator().manual_seed(m * n)
        taus = structured_task_vectors((m, n), args.experts, generator=gen)
        for name, fn in METHODS.items():
            times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.float64: []}
            outs = {}
            for _ in range(args.rounds):
                for dtype in times:
                    t, outs[dtype] = run(fn, taus, dtype)
                    times[dtype].append(t)
            f32, f64 = (statistics.median(times[d]) for d in (torch.float32, torch.float64))
            diff = float((outs[torch.float32] - outs[torch.float64]).norm()
                         / outs[torch.float64].norm())
            print(f"| {name} | {m}×{n} | {f32:.2f} | {f64:.2f} | {f64 / f32:.2f}× | {diff:.1e} |")
    wudi.CORE_DTYPE = torch.float64


if __name__ == "__main__":
    main()
