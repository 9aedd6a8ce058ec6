"""Time, peak memory and objective of the WUDI family on a ViT-B/32-shaped layer set.

For ``vit_b32_layer_set(8)`` (per block q, k, v, out 768×768, fc1 3072×768, fc2 768×3072; K = 8
synthetic task vectors each) it runs ``wudi``, ``wudi_closed_form``, ``swudi`` and ``swudi_a``,
each in its own subprocess, and reports:

- the total seconds over every layer;
- the peak memory above the process's footprint once the layer set is loaded: resident set size
  sampled every millisecond from /proc (CPU), or the CUDA allocator's peak (GPU);
- the WUDI objective L = Σ_i w_i ‖(τ − τ_i) τ_iᵀ‖² summed over layers, relative to ``wudi``
  (evaluated in float64 after the timing).

Full ``wudi`` (300 Adam steps per matrix) is ~78 TFLOP on 12 blocks. When it would take longer
than ``--max-wudi-seconds`` (``--wudi-mode auto``), the script times, on every layer, the build
of C and D and ``--timed-iterations`` Adam steps, scales the steps to 300, and says so; L is
then compared on the first ``--objective-blocks`` blocks, where ``wudi`` runs in full. It also times FusionBench's ``wudi_merging`` (the implementation users run today) in a
throw-away virtualenv it creates, a few steps per layer shape, extrapolated, and checks that it
computes what ``wudi`` computes.

    python benchmarks/wudi_family.py [--device cpu|cuda] [--blocks 12] [--iterations 300]
                                     [--dtype float32|float64] [--no-fusion-bench]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from toolkit import PeakMemory, load_average, timer

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see README, Performance

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("wudi", "wudi_closed_form", "swudi", "swudi_a")
FB_VENV_DEFAULT = Path(tempfile.gettempdir()) / "specmerge-fusionbench-venv"
FB_IMPORT = "from fusion_bench.method.wudi.wudi import wudi_merging"
FB_CHECK_ITERS = 5  # steps of the fusion-bench vs wudi cross-check on one 768×768 layer
MIB = 2**20


# ---------------------------------------------------------------------------------------------
# Layer set and measurement helpers (used inside the child processes)
# ---------------------------------------------------------------------------------------------

def load_layer_set(blocks: int, seed: int) -> dict[str, list[Tensor]]:
    """``vit_b32_layer_set(8)``, loaded from the source file so that it also works in the
    fusion-bench virtualenv, where specmerge (and its dependencies) are not installed."""
    spec = importlib.util.spec_from_file_location(
        "_synthetic", ROOT / "src" / "specmerge" / "synthetic.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.vit_b32_layer_set(8, blocks=blocks, seed=seed)


def checksum(layers: dict[str, list[Tensor]]) -> float:
    """A fingerprint of the first layer, to check both virtualenvs see the same tensors."""
    first = next(iter(layers.values()))
    return float(sum(t.double().abs().sum() for t in first))


def shapes_first(names: Sequence[str], layers: dict[str, list[Tensor]]) -> dict[tuple, str]:
    """One representative layer name per distinct shape."""
    rep: dict[tuple, str] = {}
    for name in names:
        rep.setdefault(tuple(layers[name][0].shape), name)
    return rep


# ---------------------------------------------------------------------------------------------
# Child: one specmerge method
# ---------------------------------------------------------------------------------------------

def child_specmerge(args: argparse.Namespace) -> dict[str, Any]:
    from specmerge.methods import interference as itf

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    layers = {k: [t.to(device, dtype) for t in v]
              for k, v in load_layer_set(args.blocks, args.seed).items()}
    names = list(layers)
    result: dict[str, Any] = {"checksum": checksum(layers), "notes": []}
    fns: dict[str, Callable[..., Tensor]] = {
        "wudi": itf.wudi, "wudi_closed_form": itf.wudi_closed_form,
        "swudi": itf.swudi, "swudi_a": itf.swudi_a,
    }
    fn = fns[args.child]
    kwargs: dict[str, Any] = {"iterations": args.iterations} if args.child == "wudi" else {}
    fn(layers[names[0]], **({"iterations": 1} if args.child == "wudi" else {}))  # warm-up
    extrapolate = False

    if args.child == "wudi":
        # seconds per Adam step, per layer shape, on the analytic gradient
        step_cost: dict[tuple, float] = {}
        for shape, name in shapes_first(names, layers).items():
            taus = itf.prepare(layers[name])
            c, d = itf.interference_stats(taus)
            tau = itf.initial_tau(taus, "sum")
            itf.adam_steps(tau, c, d, 1, 1e-5)
            t: dict[str, float] = {}
            with timer(t, "s", device):
                itf.adam_steps(tau, c, d, args.timed_iterations, 1e-5)
            step_cost[shape] = t["s"] / args.timed_iterations
        full_estimate = sum(args.iterations * step_cost[tuple(layers[n][0].shape)]
                            for n in names)
        result["step_cost"] = {f"{s[0]}x{s[1]}": v for s, v in step_cost.items()}
        extrapolate = args.wudi_mode == "extrapolate" or (
            args.wudi_mode == "auto" and full_estimate > args.max_wudi_seconds)
        if extrapolate:
            kwargs = {"iterations": args.timed_iterations}

    times: dict[str, float] = {}
    with PeakMemory(device) as peak:
        if extrapolate:
            seconds = time_wudi_extrapolated(layers, args, device, times)
        else:
            with timer(times, "total", device):
                for name in names:
                    out = fn(layers[name], **kwargs)
                    del out
            seconds = times["total"]
    if extrapolate:
        a = args.timed_iterations
        result["notes"].append(
            f"extrapolated: on every layer, build C, D and τ_0 (timed) and {a} Adam steps "
            f"(timed, then × {args.iterations}/{a}); measured {times['build']:.1f} s building "
            f"+ {times['steps']:.1f} s for {a} steps")
    result.update(seconds=seconds, peak_extra=peak.extra, extrapolated=extrapolate)

    # objective, in float64, on all layers (0) or on the first blocks. The wudi child uses
    # --objective-blocks only when it extrapolates; the other children use what it chose.
    blocks = args.objective_blocks if (args.child != "wudi" or extrapolate) else 0
    objective_names = names if blocks <= 0 else [
        n for n in names if int(n.split(".")[1]) < blocks]
    run_kwargs = {"iterations": args.iterations} if args.child == "wudi" else {}
    total = 0.0
    total_tau0 = 0.0
    for name in objective_names:
        merged = fn(layers[name], **run_kwargs)
        taus64 = [t.double() for t in layers[name]]
        total += float(itf.wudi_objective(taus64, merged.double()))
        if args.child == "wudi":
            total_tau0 += float(itf.wudi_objective(taus64, sum(taus64)))
    result.update(objective=total, objective_layers=len(objective_names),
                  objective_tau0=total_tau0, objective_blocks=blocks)
    if args.child == "wudi":
        check_name = next(n for n in names if tuple(layers[n][0].shape) == (768, 768))
        ours = itf.wudi(layers[check_name], iterations=FB_CHECK_ITERS).cpu()
        torch.save({"ours": ours, "tau0": sum(t.cpu() for t in layers[check_name])},
                   args.json_out + ".check.pt")
    return result


def time_wudi_extrapolated(layers: dict[str, list[Tensor]], args: argparse.Namespace,
                           device: torch.device, times: dict[str, float]) -> float:
    """Seconds of full ``wudi`` on every layer, from its pieces: the build of C, D, τ_0 is timed
    as is, and ``timed_iterations`` Adam steps are timed and scaled to ``iterations``. Both are
    measured in the same pass, layer by layer, so they see the same machine load. The pieces
    are checked to give exactly what ``wudi`` gives."""
    from specmerge.methods import interference as itf

    a = args.timed_iterations
    seconds = 0.0
    for index, taus_in in enumerate(layers.values()):
        t: dict[str, float] = {}
        with timer(t, "build", device):
            taus = itf.prepare(taus_in)
            c, d = itf.interference_stats(taus)
            tau = itf.initial_tau(taus, "sum")
        with timer(t, "steps", device):
            itf.adam_steps(tau, c, d, a, 1e-5)
        if index == 0 and not torch.equal(tau, itf.wudi(taus_in, iterations=a)):
            raise RuntimeError("the timed pieces of wudi do not reproduce wudi")
        seconds += t["build"] + t["steps"] * args.iterations / a
        for key, value in t.items():
            times[key] = times.get(key, 0.0) + value
    return seconds


# ---------------------------------------------------------------------------------------------
# Child: fusion-bench's wudi_merging, run inside its virtualenv
# ---------------------------------------------------------------------------------------------

def child_fusion_bench(args: argparse.Namespace) -> dict[str, Any]:
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        from fusion_bench.method.wudi.wudi import wudi_merging
    from importlib.metadata import version

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    layers = load_layer_set(args.blocks, args.seed)
    names = list(layers)
    result: dict[str, Any] = {"checksum": checksum(layers), "notes": [],
                              "version": version("fusion-bench")}

    def run(name: str, iters: int) -> tuple[float, int, Tensor]:
        tvs = [{name: t.to(device, dtype)} for t in layers[name]]
        t: dict[str, float] = {}
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
                PeakMemory(device) as peak, timer(t, "s", device):
            merged = wudi_merging(tvs, accelerator=device, iter_num=iters)
        return t["s"], peak.extra, merged[name].detach().cpu()

    a = args.fb_iterations
    run(names[0], 1)  # warm-up
    seconds, peak_extra = 0.0, 0
    costs = {}
    for shape, name in shapes_first(names, layers).items():
        # best of two runs each of a and 4a steps: a single short run is too noisy on the
        # small shapes (the difference of two one-off timings can come out negative)
        short = [run(name, a) for _ in range(2)]
        long = [run(name, 4 * a) for _ in range(2)]
        t1, t2 = min(x[0] for x in short), min(x[0] for x in long)
        per_step = max(t2 - t1, 0.0) / (3 * a)
        fixed = max(t1 - a * per_step, 0.0)
        count = sum(1 for n in names if tuple(layers[n][0].shape) == shape)
        seconds += count * (fixed + args.iterations * per_step)
        peak_extra = max([peak_extra] + [x[1] for x in short + long])
        costs[f"{shape[0]}x{shape[1]}"] = per_step
    result["notes"].append(
        f"extrapolated: best of two runs of {a} and of {4 * a} steps on one layer per shape; "
        f"per-step cost × {args.iterations} + fixed cost, × the number of layers of that shape")
    check_name = next(n for n in names if tuple(layers[n][0].shape) == (768, 768))
    _, _, check = run(check_name, FB_CHECK_ITERS)
    torch.save({"fusion_bench": check}, args.json_out + ".fbcheck.pt")
    result.update(seconds=seconds, peak_extra=peak_extra, step_cost=costs)
    return result


# ---------------------------------------------------------------------------------------------
# The fusion-bench virtualenv
# ---------------------------------------------------------------------------------------------

def _run(cmd: list[str], deadline: float) -> subprocess.CompletedProcess[str]:
    left = max(1.0, deadline - time.monotonic())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=left, check=False)


def ensure_fusion_bench(venv: Path, timeout_s: float) -> tuple[Path | None, str]:
    """Make (or reuse) a throw-away virtualenv with fusion-bench; return (python, message).

    torch is installed first, pinned to the running torch's version (a CPU build on a CPU
    machine), and stays pinned by a constraints file while fusion-bench resolves its
    dependencies, so pip never pulls CUDA wheels. Returns (None, reason) if anything fails or
    the whole set-up takes longer than ``timeout_s``.
    """
    py = venv / "bin" / "python"
    deadline = time.monotonic() + timeout_s
    try:
        if py.exists() and _run([str(py), "-c", FB_IMPORT], deadline).returncode == 0:
            return py, f"reusing the fusion-bench virtualenv at {venv}"
        if venv.exists():
            shutil.rmtree(venv)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(py), "-m", "pip", "install", "-q", f"torch=={torch.__version__}"],
        ]
        for cmd in steps:
            res = _run(cmd, deadline)
            if res.returncode != 0:
                return None, f"`{' '.join(cmd)}` failed: {res.stderr.strip()[-800:]}"
        constraints = venv / "constraints.txt"
        constraints.write_text(f"torch=={torch.__version__}\n")
        cmd = [str(py), "-m", "pip", "install", "-q", "fusion-bench", "-c", str(constraints)]
        res = _run(cmd, deadline)
        if res.returncode != 0:
            return None, f"`pip install fusion-bench` failed: {res.stderr.strip()[-800:]}"
        res = _run([str(py), "-c", FB_IMPORT], deadline)
        if res.returncode != 0:
            return None, f"fusion-bench installed but does not import: {res.stderr.strip()[-800:]}"
    except subprocess.TimeoutExpired:
        return None, f"setting up fusion-bench took longer than {timeout_s:.0f} s"
    except OSError as err:
        return None, f"could not create the virtualenv: {err}"
    return py, f"created a fusion-bench virtualenv at {venv}"


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------

def spawn(python: str, child: str, args: argparse.Namespace, tmp: Path,
          objective_blocks: int) -> dict[str, Any]:
    out = tmp / f"{child}.json"
    cmd = [python, str(Path(__file__).resolve()), "--child", child, "--json-out", str(out),
           "--device", args.device, "--blocks", str(args.blocks), "--dtype", args.dtype,
           "--iterations", str(args.iterations), "--timed-iterations",
           str(args.timed_iterations), "--wudi-mode", args.wudi_mode, "--max-wudi-seconds",
           str(args.max_wudi_seconds), "--objective-blocks", str(objective_blocks),
           "--fb-iterations", str(args.fb_iterations), "--seed", str(args.seed)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    print(f"[{time.strftime('%H:%M:%S')}] running {child} ...", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0 or not out.exists():
        raise RuntimeError(f"child {child} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--iterations", type=int, default=300, help="wudi steps (official: 300)")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wudi-mode", choices=("auto", "full", "extrapolate"), default="auto",
                    help="auto: extrapolate when full wudi would exceed --max-wudi-seconds")
    ap.add_argument("--max-wudi-seconds", type=float, default=120.0)
    ap.add_argument("--timed-iterations", type=int, default=10,
                    help="wudi steps actually run per layer when extrapolating")
    ap.add_argument("--objective-blocks", type=int, default=1,
                    help="blocks on which L is compared when wudi is extrapolated")
    ap.add_argument("--no-fusion-bench", action="store_true")
    ap.add_argument("--fusion-bench-venv", type=Path, default=FB_VENV_DEFAULT)
    ap.add_argument("--fusion-bench-timeout", type=float, default=900.0,
                    help="seconds allowed for creating the fusion-bench virtualenv")
    ap.add_argument("--fb-iterations", type=int, default=2,
                    help="fusion-bench steps timed per layer shape (and twice as many)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        fn = child_fusion_bench if args.child == "fusion_bench" else child_specmerge
        Path(args.json_out).write_text(json.dumps(fn(args)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")

    print(f"# WUDI family on vit_b32_layer_set(8), {args.blocks} blocks "
          f"({6 * args.blocks} matrices), K = 8, {args.dtype}, {args.device}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"load average at start: {load_average()}")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="wudi-bench-") as tmp_s:
        tmp = Path(tmp_s)
        # wudi first: it decides whether it is extrapolated, hence on which blocks L is compared
        results["wudi"] = spawn(sys.executable, "wudi", args, tmp, args.objective_blocks)
        objective_blocks = results["wudi"]["objective_blocks"]
        for name in METHODS[1:]:
            results[name] = spawn(sys.executable, name, args, tmp, objective_blocks)
        fb_message = "skipped (--no-fusion-bench)"
        fb_check = None
        if not args.no_fusion_bench:
            print(f"[{time.strftime('%H:%M:%S')}] setting up fusion-bench ...",
                  file=sys.stderr, flush=True)
            fb_python, fb_message = ensure_fusion_bench(args.fusion_bench_venv,
                                                        args.fusion_bench_timeout)
            if fb_python is not None:
                try:
                    results["fusion_bench"] = spawn(str(fb_python), "fusion_bench", args, tmp,
                                                    objective_blocks)
                    ours = torch.load(tmp / "wudi.json.check.pt")
                    theirs = torch.load(tmp / "fusion_bench.json.fbcheck.pt")
                    moved = ours["ours"] - ours["tau0"]
                    fb_check = float((theirs["fusion_bench"] - ours["ours"]).norm()
                                     / moved.norm())
                except RuntimeError as err:
                    fb_message += f"; but its run failed: {err}"
    print_report(args, results, objective_blocks, fb_message, fb_check)


def print_report(args: argparse.Namespace, results: dict[str, dict[str, Any]],
                 objective_blocks: int, fb_message: str, fb_check: float | None) -> None:
    wudi_res = results["wudi"]
    print()
    print("| method | time (s) | peak memory above the layer set (MiB) | L / L(wudi) | timed |")
    print("|---|---:|---:|---:|---|")
    labels = {
        "wudi": f"wudi (analytic gradient, Adam, {args.iterations} steps)",
        "wudi_closed_form": "wudi_closed_form",
        "swudi": "swudi (rank_ratio 0.65, exp_time 1300)",
        "swudi_a": "swudi_a (participation_sqrt)",
        "fusion_bench": f"fusion-bench wudi_merging ({args.iterations} steps)",
    }
    for name, res in results.items():
        timed = "extrapolated" if res.get("extrapolated") or name == "fusion_bench" else "full"
        rel = (f"{res['objective'] / wudi_res['objective']:.4f}" if "objective" in res
               else "n/a")
        print(f"| {labels[name]} | {res['seconds']:.1f} | {res['peak_extra'] / MIB:.0f} | "
              f"{rel} | {timed} |")
    print()
    ratio = wudi_res["seconds"] / results["swudi"]["seconds"]
    print(f"wudi / swudi time ratio: {ratio:.1f}x (target >= 30x on CPU)")
    if "fusion_bench" in results:
        fb_ratio = results["fusion_bench"]["seconds"] / results["swudi"]["seconds"]
        print(f"fusion-bench wudi_merging / swudi time ratio: {fb_ratio:.0f}x")
    print()
    for name, res in results.items():
        for note in res["notes"]:
            print(f"- {name}: {note}")
    if "step_cost" in wudi_res:
        costs = ", ".join(f"{k}: {v * 1e3:.1f} ms" for k, v in wudi_res["step_cost"].items())
        print(f"- wudi seconds per Adam step by shape (probe for --wudi-mode auto): {costs}")
    if objective_blocks:
        print(f"- L is compared on the first {objective_blocks} block(s) "
              f"({wudi_res['objective_layers']} matrices), where wudi ran all "
              f"{args.iterations} steps")
    else:
        print(f"- L is compared on all {wudi_res['objective_layers']} matrices")
    print(f"- L(τ_0 = Σ τ_i) / L(wudi) = "
          f"{wudi_res['objective_tau0'] / wudi_res['objective']:.4f} on the same matrices")
    print(f"- fusion-bench: {fb_message}")
    if "fusion_bench" in results:
        fb = results["fusion_bench"]
        costs = ", ".join(f"{k}: {v * 1e3:.0f} ms" for k, v in fb["step_cost"].items())
        same = abs(fb["checksum"] - wudi_res["checksum"]) < 1e-6 * wudi_res["checksum"]
        print(f"- fusion-bench {fb['version']} seconds per step by shape: {costs}; "
              f"same tensors as specmerge's run: {same}")
    if fb_check is not None:
        print(f"- fusion-bench wudi_merging vs specmerge wudi after {FB_CHECK_ITERS} steps on "
              f"one 768x768 layer: ‖difference‖ / ‖displacement from τ_0‖ = {fb_check:.1e}")
    print(f"- load average at end: {load_average()}")


if __name__ == "__main__":
    main()
