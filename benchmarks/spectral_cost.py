"""Cost of the spectral methods on a ViT-B/32-shaped layer set, relative to task arithmetic.

Times TSV-M, Iso-C, Iso-CTS, STAR and SVC on top of task arithmetic (λ = 0.3) over the matrix
parameters of ``vit_b32_layer_set(8)``: per block q, k, v, out (768×768), fc1 (3072×768) and
fc2 (768×3072), K = 8 synthetic task vectors each. Prints a Markdown table of seconds per
method (best of ``--repeat`` full passes) and the ratio to task arithmetic in the same run.

    python benchmarks/spectral_cost.py [--device cpu|cuda] [--blocks 12] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable, Sequence

from toolkit import timed

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see README, Performance

import torch
from torch import Tensor

from specmerge.methods.calibration import svc
from specmerge.methods.elementwise import task_arithmetic
from specmerge.methods.subspace import iso_c, iso_cts, star, tsv_m
from specmerge.synthetic import vit_b32_layer_set

Method = Callable[[Sequence[Tensor]], Tensor]

METHODS: dict[str, Method] = {
    "task_arithmetic": lambda taus: task_arithmetic(taus, scaling=0.3),
    "tsv_m": tsv_m,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
    "star": star,
    "task_arithmetic + svc": lambda taus: svc(task_arithmetic(taus, scaling=0.3), taus),
}


def time_method(fn: Method, layers: list[list[Tensor]], device: torch.device,
                repeat: int) -> float:
    """Best wall-clock seconds of ``repeat`` full passes over ``layers`` (after one warm-up)."""
    timed(lambda: fn(layers[0]), device)  # warm-up: CUDA context, solver handles, allocator
    return min(timed(lambda: [fn(taus) for taus in layers], device)[0] for _ in range(repeat))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--blocks", type=int, default=12, help="transformer blocks (default 12)")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--repeat", type=int, default=1, help="full passes per method; best kept")
    ap.add_argument("--tasks", type=int, default=8, help="K, the number of experts (default 8)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda given, but torch sees no CUDA device")
    if args.blocks < 1 or args.repeat < 1 or args.tasks < 1:
        ap.error("--blocks, --repeat and --tasks must be at least 1")

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    layer_set = vit_b32_layer_set(args.tasks, blocks=args.blocks, seed=0)
    layers = [[t.to(device=device, dtype=dtype) for t in taus] for taus in layer_set.values()]
    del layer_set

    times = {name: time_method(fn, layers, device, args.repeat) for name, fn in METHODS.items()}
    base = times["task_arithmetic"]
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"{len(layers)} matrices ({args.blocks} blocks), K = {args.tasks}, {args.dtype}, "
          f"{args.device} ({hw or platform.machine()}, {torch.get_num_threads()} CPU threads), "
          f"torch {torch.__version__}, best of {args.repeat}\n")
    print("| method | seconds | × task arithmetic |")
    print("| --- | ---: | ---: |")
    for name, sec in times.items():
        print(f"| {name} | {sec:.3f} | {sec / base:.1f} |")


if __name__ == "__main__":
    main()
