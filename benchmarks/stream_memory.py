"""Peak memory and wall time of a streaming merge of a large synthetic model.

Writes (once) a Llama-shaped base and K experts with ``specmerge example synthetic``, then:
- times reading every input byte once from a warm cache (``toolkit.read_floor``: 16 MiB
  positioned reads into one buffer, the I/O floor);
- runs ``specmerge merge`` for each method, sampling the private memory of the process
  (``RssAnon`` in /proc/PID/status, every 20 ms) and taking its peak resident set size from
  ``wait4`` (which includes file-backed pages, e.g. the page cache of mapped files);
and prints a table with both peaks, the model size, wall time and the ratio to the read floor.

    python benchmarks/stream_memory.py --params 500M --experts 4 --methods task_arithmetic ties
    # issue #13's acceptance model: a 128k vocabulary, 2 layers, bf16, K = 4
    python benchmarks/stream_memory.py --params 1.46B --vocab 128256 --hidden 4096 \
        --dtype bf16 --methods task_arithmetic ties dare
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from toolkit import read_floor, run_watched


def run_measured(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MB from wait4, peak sampled RssAnon in MB) of a command."""
    run, _, err = run_watched(cmd)
    if run.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{err[-3000:]}")
    return run.wall, run.max_rss_mb, run.peak_anon_mb


def write_lean_models(root: Path, params: str, experts: int, dtype: str,
                      vocab: int | None, hidden: int | None) -> None:
    """The Llama shape of ``specmerge example synthetic``, written in row chunks of 16 MB so
    that writing needs little memory: θ0 ~ N(0, 0.02²) (norms 1), θ_i = θ0 + 1e-3 · N(0, 1).
    (``example synthetic`` holds K + 3 float32 copies of the largest tensor: 15 GB for a 128k
    vocabulary at hidden 4096; its task vectors also have low-rank structure, which these
    lack and which no element-wise method's cost depends on.)"""
    import json

    import torch

    from specmerge.examples import llama_shape_for
    from specmerge.io.writer import OutTensor, ShardedWriter, atomic_output_dir, parse_size
    from specmerge.linalg import parse_dtype

    shape = llama_shape_for(parse_size(params.replace("B", "GB").replace("M", "MB")),
                            vocab=vocab, hidden=hidden)
    dt = parse_dtype(dtype)
    specs = [OutTensor(n, s, dt) for n, s in shape.tensors()]
    for i in range(experts + 1):
        name = "base" if i == 0 else f"expert_{i}"
        with atomic_output_dir(root / name) as tmp:
            w = ShardedWriter(tmp, specs, 2 * 10**9)
            for t in specs:
                region = w.region(t.name)
                step = max(1, (1 << 22) // max(1, math.prod(t.shape[1:])))
                for lo in range(0, t.shape[0], step):
                    rows = (min(step, t.shape[0] - lo), *t.shape[1:])
                    gen = torch.Generator().manual_seed(zlib.crc32(f"{t.name}:{lo}".encode()))
                    base = (0.02 * torch.randn(rows, generator=gen) if len(t.shape) == 2
                            else torch.ones(rows))
                    if i:
                        base += 1e-3 * torch.randn(rows, generator=torch.Generator()
                                                   .manual_seed(i * 7919 + lo))
                    region.write_rows(lo, base.to(dt))
                w.mark_written(t.name)
            w.write_index(w.finish())
            (tmp / "config.json").write_text(json.dumps(shape.config(dt), indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="500M")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--block-size", default="8MiB")  # specmerge's default
    ap.add_argument("--lean-inputs", action="store_true",
                    help="Write the inputs in row chunks (little memory), without the low-rank "
                         "structure of example synthetic's task vectors")
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    ap.add_argument("--workdir", type=Path, default=Path("work/stream_memory"))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="Keep merged outputs.")
    ap.add_argument("--prefetch", nargs="+", choices=["on", "off"], default=["on"],
                    help="Run each method with prefetch on (the default), off (--no-prefetch), "
                         "or both")
    args = ap.parse_args()

    exe = [sys.executable, "-m", "specmerge.cli"]
    shape = "".join(f"_{k}{v}" for k, v in (("v", args.vocab), ("h", args.hidden)) if v)
    models = (args.workdir / f"synthetic_{args.params}_{args.experts}_{args.dtype}{shape}"
              ).resolve()
    if not (models / "base").exists() and args.lean_inputs:
        print(f"writing synthetic models (lean) to {models} ...", flush=True)
        models.mkdir(parents=True, exist_ok=True)
        write_lean_models(models, args.params, args.experts, args.dtype, args.vocab,
                          args.hidden)
    if not (models / "base").exists():
        print(f"writing synthetic models to {models} ...", flush=True)
        extra = [a for k, v in (("--vocab", args.vocab), ("--hidden", args.hidden)) if v
                 for a in (k, str(v))]
        subprocess.run([*exe, "example", "synthetic", str(models), "--params", args.params,
                        "--experts", str(args.experts), "--dtype", args.dtype, *extra],
                       check=True)
    inputs = sorted(models.rglob("*.safetensors"))
    size_gb = sum(p.stat().st_size for p in inputs) / 1e9
    read_floor(inputs)  # warm the cache
    floor = read_floor(inputs)[0]

    rows = []
    for method in args.methods:
        recipe = Path(tempfile.mkdtemp()) / "recipe.yaml"
        experts = [str(models / f"expert_{i + 1}") for i in range(args.experts)]
        recipe.write_text(f"base_model: {models / 'base'}\nmodels: {experts}\n"
                          f"merge_method: {method}\n")
        for prefetch in args.prefetch:
            out = args.workdir / f"merged_{method}"
            shutil.rmtree(out, ignore_errors=True)
            wall, rss, anon = run_measured([*exe, "merge", str(recipe), str(out), "--force",
                                            "--quiet", "--workers", str(args.workers),
                                            "--block-size", args.block_size,
                                            *(["--no-prefetch"] if prefetch == "off" else [])])
            rows.append((f"{method} (prefetch {prefetch})", wall, rss, anon))
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)

    print(f"\nsynthetic Llama-shaped model, {args.params} parameters{shape}, K={args.experts}, "
          f"{args.dtype}; inputs {size_gb:.1f} GB; workers={args.workers}, block size "
          f"{args.block_size}")
    print(f"read floor (every input byte once, 16 MiB positioned reads, warm cache): "
          f"{floor:.2f} s\n")
    print("| method | peak private memory, RssAnon (MB) | peak RSS (MB) | wall (s) | "
          "wall / read floor |")
    print("|---|---|---|---|---|")
    for method, wall, rss, anon in rows:
        print(f"| {method} | {anon:.0f} | {rss:.0f} | {wall:.1f} | {wall / floor:.2f} |")


if __name__ == "__main__":
    main()
