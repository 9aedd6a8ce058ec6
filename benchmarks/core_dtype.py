"""Cost of the WUDI family's float64 core against a float32 one, in the same run.

SWUDI, SWUDI-A and the closed form form C and D, decompose C and apply the update in float64
(``specmerge.methods.interference.CORE_DTYPE``) whatever the compute dtype; the official code
stays in float32. This times SWUDI and the closed form on float32 task vectors with the core in
float64 and in float32 (the constant patched), median of ``--rounds`` interleaved rounds, and
prints the ratio (``toolkit.interleave``: float32 first in even rounds, float64 first in odd
ones); it also prints how far the float32 core lands from the float64 one.

    python benchmarks/core_dtype.py [--shapes 1024x1024,4096x4096] [--experts 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os

from toolkit import interleave, median, timed

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see README, Performance

import torch

from specmerge.methods import interference as wudi
from specmerge.synthetic import structured_task_vectors

METHODS = {"swudi": wudi.swudi, "wudi_closed_form": wudi.wudi_closed_form}


CORES = {"float32": torch.float32, "float64": torch.float64}


def run(fn, taus: list[torch.Tensor], core: str) -> tuple[float, torch.Tensor]:
    wudi.CORE_DTYPE = CORES[core]
    return timed(lambda: fn(taus))


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
            runs = interleave(list(CORES), args.rounds,
                              lambda core, _r, fn=fn, taus=taus: run(fn, taus, core))
            f32, f64 = (median([t for t, _ in runs[c]]) for c in CORES)
            out32, out64 = runs["float32"][-1][1], runs["float64"][-1][1]
            diff = float((out32 - out64).norm() / out64.norm())
            print(f"| {name} | {m}×{n} | {f32:.2f} | {f64:.2f} | {f64 / f32:.2f}× | {diff:.1e} |")
    wudi.CORE_DTYPE = torch.float64


if __name__ == "__main__":
    main()
