"""Wide against tall: SVC, TSV-M and Iso-C on 4096 × 11008 (Llama-7B's down_proj) and on its
transpose 11008 × 4096 (gate/up), dense, float32.

LAPACK is several times slower on the wide layout; ``specmerge.linalg.thin_svd`` therefore
decomposes a wide matrix as its transpose. This prints each method's time on both shapes and
their ratio (the wide shape should cost about what the tall one does), with the raw
``torch.linalg.svd`` on each layout as the reference. Rounds are interleaved (tall, wide, tall,
wide…); the median is reported.

    python benchmarks/wide_svd.py [--k 2] [--rounds 1] [--threads N] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see README, Performance

import torch
from torch import Tensor

from specmerge.methods.calibration import svc
from specmerge.methods.elementwise import task_arithmetic
from specmerge.methods.subspace import iso_c, tsv_m

METHODS: dict[str, Callable[[Sequence[Tensor]], object]] = {
    "torch.linalg.svd (reference)": lambda taus: torch.linalg.svd(taus[0], full_matrices=False),
    "task_arithmetic+svc": lambda taus: svc(task_arithmetic(taus, scaling=0.3), taus),
    "tsv_m": tsv_m,
    "iso_c": iso_c,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=2, help="task vectors per matrix")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="shrink both dimensions (e.g. 0.25 for a quick look)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    m, n = int(11008 * args.scale), int(4096 * args.scale)
    g = torch.Generator().manual_seed(0)
    tall = [torch.randn(m, n, generator=g) for _ in range(args.k)]
    wide = [t.mT.contiguous() for t in tall]
    print(f"# Wide vs tall SVD-based merges: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}, K = {args.k}\n")
    print(f"| method | {m}×{n} s | {n}×{m} s | wide / tall |")
    print("|---|---:|---:|---:|")
    for name, fn in METHODS.items():
        times: dict[str, list[float]] = {"tall": [], "wide": []}
        for _ in range(args.rounds):
            for label, taus in (("tall", tall), ("wide", wide)):
                start = time.perf_counter()
                fn(taus)
                times[label].append(time.perf_counter() - start)
        t, w = statistics.median(times["tall"]), statistics.median(times["wide"])
        note = " (LAPACK as is, no transposition)" if name.startswith("torch") else ""
        print(f"| {name}{note} | {t:.1f} | {w:.1f} | {w / t:.2f} |", flush=True)


if __name__ == "__main__":
    main()
