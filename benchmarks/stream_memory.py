"""Peak memory and wall time of a streaming merge of a large synthetic model.

Writes (once) a Llama-shaped base and K experts with ``specmerge example synthetic``, then:
- times reading every input once with ``cat`` to /dev/null (the I/O floor);
- runs ``specmerge merge`` under ``/usr/bin/time -v`` for each method, which reports the peak
  resident set size including mapped file pages;
and prints a table with peak RSS, the model size, wall time and the ratio to the read floor.

    python benchmarks/stream_memory.py --params 500M --experts 4 --methods task_arithmetic ties
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a command, via GNU time -v."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return wall, (int(m.group(1)) / 1024 if m else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="500M")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    ap.add_argument("--workdir", type=Path, default=Path("work/stream_memory"))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="Keep merged outputs.")
    args = ap.parse_args()

    exe = shutil.which("specmerge") or sys.exit("specmerge is not on PATH (pip install -e .)")
    models = (args.workdir / f"synthetic_{args.params}_{args.experts}_{args.dtype}").resolve()
    if not (models / "base").exists():
        print(f"writing synthetic models to {models} ...", flush=True)
        subprocess.run([exe, "example", "synthetic", str(models), "--params", args.params,
                        "--experts", str(args.experts), "--dtype", args.dtype], check=True)
    inputs = sorted(str(p) for p in models.rglob("*.safetensors"))
    size_gb = sum(Path(p).stat().st_size for p in inputs) / 1e9
    t0 = time.perf_counter()
    subprocess.run(["sh", "-c", "cat \"$@\" > /dev/null", "cat", *inputs], check=True)
    floor = time.perf_counter() - t0

    rows = []
    for method in args.methods:
        recipe = Path(tempfile.mkdtemp()) / "recipe.yaml"
        experts = [str(models / f"expert_{i + 1}") for i in range(args.experts)]
        recipe.write_text(f"base_model: {models / 'base'}\nmodels: {experts}\n"
                          f"merge_method: {method}\n")
        out = args.workdir / f"merged_{method}"
        wall, rss = run_timed([exe, "merge", str(recipe), str(out), "--force", "--quiet",
                               "--workers", str(args.workers)])
        rows.append((method, wall, rss))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    print(f"\nsynthetic Llama-shaped model, {args.params} parameters, K={args.experts}, "
          f"{args.dtype}; inputs {size_gb:.1f} GB; workers={args.workers}")
    print(f"read floor (cat all inputs once): {floor:.1f} s\n")
    print("| method | peak RSS (MB) | wall (s) | wall / read floor |")
    print("|---|---|---|---|")
    for method, wall, rss in rows:
        print(f"| {method} | {rss:.0f} | {wall:.1f} | {wall / floor:.2f} |")


if __name__ == "__main__":
    main()
