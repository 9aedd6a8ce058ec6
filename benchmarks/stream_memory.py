"""Peak memory and wall time of a streaming merge of a large synthetic model.

Writes (once) a Llama-shaped base and K experts with ``specmerge example synthetic``, then:
- times reading every input byte once from a warm cache (``toolkit.read_floor``: 16 MiB
  positioned reads into one buffer, the I/O floor);
- runs ``specmerge merge`` for each method, sampling the private memory of the process
  (``RssAnon`` in /proc/PID/status, every 20 ms) and taking its peak resident set size from
  ``wait4`` (which includes file-backed pages, e.g. the page cache of mapped files);
and prints a table with both peaks, the model size, wall time and the ratio to the read floor.

    python benchmarks/stream_memory.py --params 500M --experts 4 --methods task_arithmetic ties
    # LoRA experts of the same base, merged to a PEFT adapter and to a full model, with each
    # streaming option: where the PEFT output has no use for one, the row shows the refusal
    python benchmarks/stream_memory.py --params 500M --experts 4 --lora-rank 16 \
        --methods ties --output peft hf --variants default workers2 block1MiB noprefetch
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


def write_lora_adapters(models: Path, experts: int, rank: int, dtype: str) -> None:
    """K PEFT LoRA adapters of ``models / "base"``, rank ``rank`` on every linear projection:
    B ~ 1e-2 · N(0, 1), A ~ N(0, 1/in), α = r (scale 1)."""
    import json

    import torch
    from safetensors.torch import save_file

    from specmerge.io.checkpoint import Checkpoint
    from specmerge.linalg import parse_dtype

    base = Checkpoint(models / "base")
    dt = parse_dtype(dtype)
    targets = [n for n, i in base.infos.items() if n.endswith("proj.weight") and len(i.shape) == 2]
    for k in range(experts):
        out = models / f"lora_{k + 1}"
        if out.exists():
            continue
        gen = torch.Generator().manual_seed(1000 + k)
        tensors = {}
        for n in targets:
            rows, cols = base.infos[n].shape
            module = n.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = (
                torch.randn(rank, cols, generator=gen) / math.sqrt(cols)).to(dt)
            tensors[f"base_model.model.{module}.lora_B.weight"] = (
                1e-2 * torch.randn(rows, rank, generator=gen)).to(dt)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": rank,
            "target_modules": sorted({n.split(".")[-2] for n in targets}),
            "base_model_name_or_path": str(models / "base")}))
        tmp.rename(out)


VARIANTS = {"default": [], "workers2": ["--workers", "2"], "block1MiB": ["--block-size", "1MiB"],
            "noprefetch": ["--no-prefetch"]}


def run_variant(exe: list[str], recipe: Path, out: Path, extra: list[str]
                ) -> tuple[float, float, float] | str:
    """(wall, peak RSS, peak RssAnon) of one merge, or the one-line refusal it printed."""
    run, _, err = run_watched([*exe, "merge", str(recipe), str(out), "--force", "--quiet",
                               *extra])
    if run.returncode != 0:
        return err.strip().splitlines()[-1] if err.strip() else f"rc {run.returncode}"
    return run.wall, run.max_rss_mb, run.peak_anon_mb


def main_lora(args: argparse.Namespace, exe: list[str], models: Path) -> None:
    """LoRA experts merged into each ``--output`` format with each ``--variants`` option set,
    interleaved over ``--rounds`` rounds (medians)."""
    from toolkit import median, round_order

    write_lora_adapters(models, args.experts, args.lora_rank, args.dtype)
    adapters = [str(models / f"lora_{i + 1}") for i in range(args.experts)]
    cells = [(m, o, v) for m in args.methods for o in args.output for v in args.variants]
    results: dict[tuple[str, str, str], list[tuple[float, float, float] | str]] = {
        c: [] for c in cells}
    for r in range(args.rounds):
        for method, output, variant in round_order(cells, r):
            recipe = Path(tempfile.mkdtemp()) / "recipe.yaml"
            recipe.write_text(f"base_model: {models / 'base'}\nmodels: {adapters}\n"
                              f"merge_method: {method}\noutput: {{format: {output}}}\n")
            out = args.workdir / f"merged_{method}_{output}_{variant}"
            results[(method, output, variant)].append(
                run_variant(exe, recipe, out, VARIANTS[variant]))
            shutil.rmtree(out, ignore_errors=True)
    print(f"\nsynthetic Llama-shaped base, {args.params} parameters, K={args.experts} LoRA "
          f"adapters of rank {args.lora_rank} on every projection, {args.dtype}; "
          f"{args.rounds} rounds, medians\n")
    print("| method | output | option | peak private memory, RssAnon (MB) | peak RSS (MB) | "
          "wall (s) |")
    print("|---|---|---|---|---|---|")
    for cell in cells:
        runs = results[cell]
        refused = [x for x in runs if isinstance(x, str)]
        if refused:
            print(f"| {cell[0]} | {cell[1]} | {cell[2]} | refused: {refused[0]} | | |")
            continue
        walls, rss, anon = zip(*runs, strict=True)  # type: ignore[misc]
        print(f"| {cell[0]} | {cell[1]} | {cell[2]} | {median(anon):.0f} | {median(rss):.0f} | "
              f"{median(walls):.1f} |")


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
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="Merge LoRA adapters of this rank (written once) instead of full "
                         "experts, into each --output format with each of --variants")
    ap.add_argument("--output", nargs="+", choices=["peft", "hf"], default=["peft", "hf"])
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
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
    if args.lora_rank:
        main_lora(args, exe, models)
        return
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
