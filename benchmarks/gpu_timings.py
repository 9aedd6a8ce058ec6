"""Llama-7B's matrix shapes, measured (GPU or CPU): per-matrix timings, wide vs tall, an end-to-end merge, a 7B projection.

The one script for the 7B shapes (``LLAMA7B_MODULES``; ``lora_factored.py`` takes them from
here). ``benchmarks/gpu_check.sh`` runs matrices, e2e and report in order and writes ``gpu.md``;
each can run alone.

    python benchmarks/gpu_timings.py matrices --device cuda --json m.json
        SVC after task arithmetic, SWUDI, SWUDI-A, TSV-M and Iso-C on K = 8 dense task vectors
        (float32, made on the device) at 4096×4096, 11008×4096 and 4096×11008: median of 3 runs
        after a warm-up, torch.cuda.synchronize around each. ``--budget`` seconds bound the
        whole table: a cell whose warm-up is slow gets fewer runs (its run count is reported).
        ``--scale 32`` divides every dimension by 32 (the CPU rehearsal).
    python benchmarks/gpu_timings.py e2e MODELS OUT --device cuda --json e.json
        specmerge.merge (what ``specmerge merge --device cuda`` runs) of the base and experts under
        MODELS: SWUDI + SVC, and task arithmetic of the same inputs, plus a read-only pass that
        moves θ0 and every τ_i of every tensor onto the device. Wall, GPU peak memory (MergeResult)
        and the share of the SWUDI + SVC wall that reading (the read pass) and reading + writing
        (the task arithmetic merge) take.
    python benchmarks/gpu_timings.py report --matrices m.json --e2e e.json [--tests t.txt]
        Markdown: the tables and the 7B projection, 32 layers × (4 × 4096² + 2 × 11008×4096 +
        4096×11008) matrices at the per-matrix medians.
    python benchmarks/gpu_timings.py wide [--k 2] [--rounds 3] [--threads N] [--scale 1.0]
        Wide against tall (docs/results/wide_svd.md): SVC after task arithmetic, TSV-M and
        Iso-C on 4096×11008 (down_proj) and on its transpose 11008×4096 (gate/up), with the raw
        ``torch.linalg.svd`` of each layout as the reference. ``specmerge.linalg.thin_svd``
        decomposes a wide matrix as its transpose, so a method's wide time should be about its
        tall one. K dense N(0, 1) task vectors, the wide ones the transposes of the tall ones;
        rounds interleaved (tall, wide, then wide, tall, …), medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from toolkit import interleave, median, sync, time_call, timed

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see README, Performance

import torch
from torch import Tensor

log = logging.getLogger("gpu_timings")

# Llama-7B (Llama-2-7B's config.json): per layer q, k, v, o (4096²), gate and up
# (11008 × 4096), down (4096 × 11008); 32 layers
LLAMA7B_MODULES: dict[str, tuple[int, int]] = {
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096), "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008)}
LLAMA7B_SHAPES: dict[str, tuple[int, int]] = {
    f"{m}×{n}": (m, n) for m, n in dict.fromkeys(LLAMA7B_MODULES.values())}
LLAMA7B_COUNTS = {label: sum(s == shape for s in LLAMA7B_MODULES.values())
                  for label, shape in LLAMA7B_SHAPES.items()}
LLAMA7B_LAYERS = 32

Method = Callable[[Sequence[Tensor]], Any]


def methods() -> dict[str, Method]:
    from specmerge.methods.calibration import svc
    from specmerge.methods.elementwise import task_arithmetic
    from specmerge.methods.interference import swudi, swudi_a
    from specmerge.methods.subspace import iso_c, tsv_m

    return {
        "task_arithmetic + svc": lambda taus: svc(task_arithmetic(taus, scaling=0.3), taus),
        "swudi": swudi,
        "swudi_a": swudi_a,
        "tsv_m": tsv_m,
        "iso_c": iso_c,
    }


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        mem = torch.cuda.get_device_properties(device).total_memory / 2**30
        return f"{name} ({mem:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
            f"threads, torch {torch.__version__}")


def task_vectors(shape: tuple[int, int], k: int, device: torch.device,
                 seed: int = 0) -> list[Tensor]:
    """K dense float32 task vectors made on ``device``: 1e-3 · (shared rank-8 + own rank-8 +
    0.1 · Gaussian noise), the structure of ``specmerge.synthetic.structured_task_vectors``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    m, n = shape

    def low_rank(r: int) -> Tensor:
        a = torch.randn(m, r, generator=gen, device=device) / r**0.5
        return a @ torch.randn(r, n, generator=gen, device=device)

    shared = low_rank(8)
    out = []
    for _ in range(k):
        tau = shared + low_rank(8)
        tau.add_(torch.randn(m, n, generator=gen, device=device), alpha=0.1)
        out.append(tau.mul_(1e-3))
    return out


def cmd_matrices(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    shapes = {label: (m // args.scale, n // args.scale)
              for label, (m, n) in LLAMA7B_SHAPES.items()}
    table = methods()
    allowance = args.budget / (len(shapes) * len(table))
    rows = []
    for label, shape in shapes.items():
        taus = task_vectors(shape, args.tasks, device)
        for name, fn in table.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timing = time_call(lambda fn=fn, taus=taus: fn(taus), args.repeat, allowance, device)
            warm, med, runs = timing.warmup, timing.median, timing.runs
            peak = (torch.cuda.max_memory_allocated(device) / 2**20
                    if device.type == "cuda" else None)
            rows.append({"method": name, "shape": label, "m": shape[0], "n": shape[1],
                         "warmup_s": warm, "median_s": med, "runs": runs,
                         "peak_gpu_mb": peak})
            log.info("%s %s: %.3f s (median of %d, warm-up %.3f s)", name, shape, med, runs,
                     warm)
        del taus
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"device": args.device, "hardware": hardware(device), "tasks": args.tasks,
            "scale": args.scale, "repeat": args.repeat, "budget_s": args.budget, "rows": rows}


def cmd_wide(args: argparse.Namespace) -> None:
    """Print Markdown: each method's median on the tall 7B shape and on its transpose, and the
    ratio."""
    table = methods()
    wide_methods: dict[str, Method] = {
        "torch.linalg.svd (reference)": lambda taus: torch.linalg.svd(taus[0],
                                                                      full_matrices=False),
        "task_arithmetic+svc": table["task_arithmetic + svc"], "tsv_m": table["tsv_m"],
        "iso_c": table["iso_c"]}
    if args.threads:
        torch.set_num_threads(args.threads)
    m, n = (int(x * args.scale) for x in LLAMA7B_MODULES["mlp.gate_proj"])
    g = torch.Generator().manual_seed(0)
    layouts = {"tall": [torch.randn(m, n, generator=g) for _ in range(args.k)]}
    layouts["wide"] = [t.mT.contiguous() for t in layouts["tall"]]
    print(f"# Wide vs tall SVD-based merges: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}, K = {args.k}\n\n"
          f"| method | {m}×{n} s | {n}×{m} s | wide / tall |\n|---|---:|---:|---:|")
    for name, fn in wide_methods.items():
        times = interleave(["tall", "wide"], args.rounds,
                           lambda layout, _r, fn=fn: timed(lambda: fn(layouts[layout]))[0])
        t, w = median(times["tall"]), median(times["wide"])
        note = " (LAPACK as is, no transposition)" if name.startswith("torch") else ""
        print(f"| {name}{note} | {t:.1f} | {w:.1f} | {w / t:.2f} |", flush=True)


def cmd_e2e(args: argparse.Namespace) -> dict[str, Any]:
    import specmerge
    from specmerge.engine import plan_of
    from specmerge.io.checkpoint import Checkpoint
    from specmerge.recipe import load_recipe
    from specmerge.sources import CheckpointSource

    models = Path(args.models).resolve()
    experts = sorted(p for p in models.iterdir() if p.name.startswith("expert_"))
    base = {"base_model": str(models / "base"), "models": [str(p) for p in experts]}
    recipes = {
        "task_arithmetic": {**base, "merge_method": "task_arithmetic"},
        "swudi + svc": {**base, "merge_method": "swudi", "calibrate": {"method": "svc"}},
    }
    device = torch.device(args.device)
    ckpt = Checkpoint(models / "base")
    dtypes = sorted({str(i.dtype).removeprefix("torch.") for i in ckpt.infos.values()})
    input_bytes = sum(f.stat().st_size for d in (models / "base", *experts)
                      for f in d.glob("*.safetensors"))

    # the read pass: θ0 and τ_i of every tensor, upcast, on the device; nothing computed
    rec = load_recipe(recipes["task_arithmetic"])
    source = CheckpointSource.from_recipe(rec)
    plan = plan_of(rec, source)
    sync(device)
    start = time.perf_counter()
    for entry in plan.entries:
        tv = source.task_vectors(entry.name, device, plan.compute_dtype)
        del tv
    sync(device)
    read_s = time.perf_counter() - start
    log.info("read pass: %.1f s", read_s)

    runs: dict[str, dict[str, Any]] = {}
    out = Path(args.out)
    for name, recipe in recipes.items():
        res = specmerge.merge(recipe, out / name.replace(" + ", "_"), device=args.device,
                              workers=args.workers, force=True, progress=False)
        runs[name] = {"seconds": res.seconds, "peak_gpu_mb": res.peak_gpu_mb,
                      "peak_rss_mb": res.peak_rss_mb, "tensors": res.num_tensors,
                      "counts": res.counts}
        log.info("%s: %.1f s, GPU peak %s MB", name, res.seconds, res.peak_gpu_mb)
    return {"device": args.device, "hardware": hardware(device), "models": str(models),
            "params": ckpt.num_params(), "experts": len(experts), "dtypes": dtypes,
            "input_gb": input_bytes / 1e9, "workers": args.workers, "read_s": read_s,
            "runs": runs, "generate_s": args.generate_s}


def projection(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Seconds for the matrices of Llama-7B: 32 × Σ count × median, per method."""
    out: dict[str, float] = {}
    for r in rows:
        out[r["method"]] = out.get(r["method"], 0.0) + (
            LLAMA7B_LAYERS * LLAMA7B_COUNTS[r["shape"]] * r["median_s"])
    return out


def cmd_report(args: argparse.Namespace) -> str:
    mat = json.loads(Path(args.matrices).read_text())
    e2e = json.loads(Path(args.e2e).read_text()) if args.e2e else None
    dry = args.dry_run
    lines = [f"# GPU check{' (DRY RUN on CPU: tiny sizes, not a measurement)' if dry else ''}",
             "", f"- device: {mat['hardware']}",
             f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
             "- script: `bash benchmarks/gpu_check.sh" + (" --dry-run`" if dry else "`"), ""]
    if args.tests:
        lines += ["## CUDA tests (`pytest -m cuda`)", "", "```",
                  *Path(args.tests).read_text().strip().splitlines()[-3:], "```", ""]
    scale = mat["scale"]
    lines += ["## Per matrix",
              "", f"K = {mat['tasks']} dense float32 task vectors on the device; seconds per "
              f"call, median of the runs after one warm-up, synchronised"
              + (f"; every dimension divided by {scale}" if scale != 1 else "") + ".", "",
              "| method | shape | median s | runs | warm-up s | GPU peak MB |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in mat["rows"]:
        peak = "–" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.0f}"
        shape = r["shape"] if scale == 1 else f"{r['m']}×{r['n']}"
        lines.append(f"| {r['method']} | {shape} | {r['median_s']:.3f} | {r['runs']} | "
                     f"{r['warmup_s']:.3f} | {peak} |")
    proj = projection(mat["rows"])
    lines += ["", "## Projection to Llama-7B", "",
              f"{LLAMA7B_LAYERS} layers × (4 × 4096² + 2 × 11008×4096 + 4096×11008) = "
              f"{LLAMA7B_LAYERS * 7} matrices at the medians above: the spectral compute only "
              "(embeddings, head and norms take the fallback; reading and writing come on top, "
              "see the end-to-end share below)"
              + (f". Dry run: measured at 1/{scale} of each dimension, so these are not 7B "
                 "numbers" if scale != 1 else "") + ".", "",
              "| method | matrices, 7B (s) | min |", "| --- | ---: | ---: |"]
    for name, sec in proj.items():
        lines.append(f"| {name} | {sec:.1f} | {sec / 60:.1f} |")
    if e2e is not None:
        runs = e2e["runs"]
        main = runs["swudi + svc"]["seconds"]
        lines += ["", "## End to end", "",
                  f"{e2e['params']:,}-parameter synthetic Llama ({', '.join(e2e['dtypes'])})"
                  f", {e2e['experts']} experts, {e2e['input_gb']:.1f} GB of inputs, "
                  f"`specmerge.merge(..., device={e2e['device']!r}, workers={e2e['workers']})` "
                  "(what `specmerge merge --device` runs). The inputs were just written, so "
                  "they are read from the page cache (warm), not from the disk."
                  + (f" Writing them took {e2e['generate_s']:.0f} s." if e2e["generate_s"]
                     else ""), "",
                  "| run | wall s | share of SWUDI + SVC | GPU peak MB | peak RSS MB |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name in ("swudi + svc", "task_arithmetic"):
            r = runs[name]
            peak = "–" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.0f}"
            lines.append(f"| {name} | {r['seconds']:.1f} | {r['seconds'] / main:.0%} | {peak} | "
                         f"{r['peak_rss_mb']:.0f} |")
        lines.append(f"| read pass (θ0 and τ_i onto the device) | {e2e['read_s']:.1f} | "
                     f"{e2e['read_s'] / main:.0%} | | |")
        lines += ["", "I/O share: the task arithmetic merge reads and writes the same bytes with "
                  "negligible compute, so its wall over SWUDI + SVC's is the share of reading, "
                  "upcasting and writing; the read pass alone is the reading share. The peak "
                  "RSS column is the process's high-water mark so far (the runs share a "
                  "process)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("matrices", help="per-matrix timings at Llama-7B shapes")
    m.add_argument("--device", default="cuda")
    m.add_argument("--tasks", type=int, default=8, help="K (default 8)")
    m.add_argument("--repeat", type=int, default=3, help="timed runs per cell (default 3)")
    m.add_argument("--budget", type=float, default=240.0,
                   help="seconds for the whole table; slow cells get fewer runs (default 240)")
    m.add_argument("--scale", type=int, default=1, help="divide every dimension by this")
    m.add_argument("--json", required=True)
    e = sub.add_parser("e2e", help="end-to-end SWUDI + SVC merge against task arithmetic")
    e.add_argument("models", help="a directory with base/ and expert_*/ (specmerge example)")
    e.add_argument("out", help="where the merged models go")
    e.add_argument("--device", default="cuda")
    e.add_argument("--workers", type=int, default=1)
    e.add_argument("--generate-s", type=float, default=0.0,
                   help="seconds writing the inputs took (reported)")
    e.add_argument("--json", required=True)
    w = sub.add_parser("wide", help="wide (4096×11008) against tall (11008×4096), CPU")
    w.add_argument("--k", type=int, default=2, help="task vectors per matrix (default 2)")
    w.add_argument("--rounds", type=int, default=1)
    w.add_argument("--threads", type=int, default=None)
    w.add_argument("--scale", type=float, default=1.0,
                   help="shrink both dimensions (e.g. 0.25 for a quick look)")
    r = sub.add_parser("report", help="Markdown from the JSON files")
    r.add_argument("--matrices", required=True)
    r.add_argument("--e2e")
    r.add_argument("--tests", help="pytest's output (its last lines are quoted)")
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--out", help="write the Markdown here too")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda given, but torch sees no CUDA device (torch "
                 f"{torch.__version__}, built for CUDA {torch.version.cuda})")
    if args.cmd == "wide":
        cmd_wide(args)
        return
    if args.cmd == "report":
        text = cmd_report(args)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
        print(text, end="")
        return
    if args.cmd == "matrices" and min(args.tasks, args.repeat, args.scale) < 1:
        ap.error("--tasks, --repeat and --scale must be at least 1")
    result = cmd_matrices(args) if args.cmd == "matrices" else cmd_e2e(args)
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
