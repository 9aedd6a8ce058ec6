"""specmerge against mergekit 0.1.5 side by side: wall time, memory, the cold-cache read floor.

On synthetic Llama-shaped inputs written by ``specmerge example synthetic`` (a base and K = 4
experts: 20M, 200M and 500M in float32, and a 128k-vocabulary model with hidden 4096 and 2
layers in bf16), it runs ``mergekit-yaml`` (mergekit 0.1.5 in a throw-away virtualenv of its own, torch
pinned to the local CPU wheel, see ``mergekit_parity.ensure_mergekit``) and ``specmerge merge``
on the same merges, interleaved, for several rounds. Every timed run, and every read-floor
measurement, starts with the inputs evicted from the page cache (``sync``, then
``posix_fadvise(DONTNEED)`` per input file, or with ``--evict drop_caches`` the whole page
cache; ``fincore`` checks that nothing stayed resident).

Per run: wall time, CPU time, peak RSS and peak private memory (the sums of ``VmRSS`` and
``RssAnon`` over the child's process tree, sampled every 50 ms; ``wait4``'s maxrss is kept but
not reported, because Linux starts a forked child's maxrss at its parent's RSS, so it is never
below this harness's own), and the CPU that other processes used meanwhile (``/proc/stat``'s
busy time minus the child's). Per size: the read floor, the time to
read every input byte once, cold. Once per size, the outputs are compared: max ulp distance and
max relative difference over tensors.

The merges (mergekit's recipe → specmerge's own recipe; specmerge reads mergekit YAML too, but
as ``gta``, which holds whole tensors, so the benchmark gives it the recipe a specmerge user
would write):
- task_arithmetic (λ 0.3, weights 1) → task_arithmetic (scaling 0.3);
- ties (density 0.2, weights 1, normalize, λ 1) → ties (density 0.2, mean, scaling 1,
  trim_count exact), and ties_official: the same with the default trim_count, timed too and
  compared with mergekit's ties;
- dare_linear (density 0.5, weights 1, λ 0.3, mergekit's default L1 rescale) → dare (drop_rate
  0.5, scaling 0.3, survivors rescaled by 1/(1 − p)): random masks, compared only in size;
- linear (the 4 experts, weights 1) → weight_average;
- mergekit's other methods and recipe features, each one mergekit recipe that both tools read
  (specmerge maps it to its methods of the same names): slerp, nearswap, model_stock, della,
  della_linear, sce, karcher (no base), nuslerp, multislerp, arcee_fusion, ram, ramplus_tl and
  a passthrough of two slices (one more layer than the inputs). These run on the 20M size:
  ``--sizes 20M --methods slerp nearswap ...`` (``METHODS``).

    .venv/bin/python benchmarks/peers/run.py                      # everything, 3 rounds
    .venv/bin/python benchmarks/peers/run.py --sizes 200M --methods task_arithmetic --rounds 1

Results accumulate in ``WORKDIR/results.json`` (per size), and ``--out`` (default
docs/results/peers.md) is written from all of them; ``--report-only`` rewrites it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CHILD_ENV = dict(os.environ)  # the tools' environment: the caller's, nothing added
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # benchmarks/: toolkit
import psutil  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from compare import compare_dirs  # noqa: E402
from mergekit_parity import MERGEKIT, VENV_DEFAULT, ensure_mergekit, substitute  # noqa: E402
from toolkit import evict, median, read_floor, resident_bytes, round_order, watch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K = 4
SIZES: dict[str, list[str]] = {
    "200M": ["--params", "200M", "--dtype", "float32"],
    "500M": ["--params", "500M", "--dtype", "float32"],
    "128k": ["--params", "1.46B", "--vocab", "128256", "--hidden", "4096", "--dtype", "bf16"],
    "20M": ["--params", "20M", "--dtype", "float32"],
}
SIZE_LABELS = {"200M": "200M, float32", "500M": "500M, float32",
               "128k": "128k vocabulary (hidden 4096, 2 layers, 1.46B), bf16",
               "20M": "20M (hidden 512, 4 layers, vocab 8000), float32"}


def _mk_models(**params: Any) -> list[dict[str, Any]]:
    return [{"model": f"EXPERT_{i + 1}", "parameters": dict(params)} for i in range(K)]


# name → (mergekit recipe or None, specmerge recipe, the mergekit case its output is compared to)
CASES: dict[str, tuple[dict[str, Any] | None, dict[str, Any], str]] = {
    "task_arithmetic": (
        {"merge_method": "task_arithmetic", "base_model": "BASE",
         "models": _mk_models(weight=1.0), "parameters": {"lambda": 0.3}},
        {"merge_method": "task_arithmetic", "parameters": {"scaling": 0.3}}, "task_arithmetic"),
    "ties": (
        {"merge_method": "ties", "base_model": "BASE",
         "models": _mk_models(weight=1.0, density=0.2),
         "parameters": {"normalize": True, "lambda": 1.0}},
        {"merge_method": "ties", "parameters": {"density": 0.2, "aggregate": "mean",
                                                "scaling": 1.0, "trim_count": "exact"}}, "ties"),
    "ties_official": (
        None, {"merge_method": "ties", "parameters": {"density": 0.2, "aggregate": "mean",
                                                      "scaling": 1.0}}, "ties"),
    "dare": (
        {"merge_method": "dare_linear", "base_model": "BASE",
         "models": _mk_models(weight=1.0, density=0.5), "parameters": {"lambda": 0.3}},
        {"merge_method": "dare", "parameters": {"drop_rate": 0.5, "scaling": 0.3}}, "dare"),
    "linear": (
        {"merge_method": "linear", "models": _mk_models(weight=1.0)},
        {"merge_method": "weight_average"}, "linear"),
}
SAME = {"same": True}  # specmerge reads the mergekit recipe itself


def _tb(method: str, n: int = K, base: bool = True, **params: Any) -> dict[str, Any]:
    """mergekit's ``method`` on EXPERT_1..n (and BASE); ``params`` its global parameters."""
    models = [{"model": f"EXPERT_{i + 1}"} for i in range(n)]
    weights = params.pop("weights", None)
    for m, w in zip(models, weights or [], strict=False):
        m["parameters"] = {"weight": w} if not isinstance(w, dict) else w
    return {"merge_method": method, "models": models, **({"base_model": "BASE"} if base else {}),
            **({"parameters": params} if params else {})}


# mergekit's other methods and recipe features, each one recipe both tools read
CASES.update({c: (r, SAME, c) for c, r in {
    "slerp": {**_tb("slerp", 1, t=0.3), "models": [{"model": "BASE"}, {"model": "EXPERT_1"}]},
    "nearswap": {**_tb("nearswap", 1, t=0.001),
                 "models": [{"model": "BASE"}, {"model": "EXPERT_1"}]},
    "model_stock": _tb("model_stock"),
    "della": _tb("della", weights=[{"weight": 1.0, "density": 0.5}] * K, epsilon=0.1),
    "della_linear": _tb("della_linear", weights=[{"weight": 1.0, "density": 0.5}] * K,
                        epsilon=0.1),
    "sce": _tb("sce", select_topk=0.5),
    "karcher": _tb("karcher", base=False),
    "nuslerp": _tb("nuslerp", 2, weights=[0.4, 0.6]),
    "multislerp": _tb("multislerp", weights=[1.0] * K),
    "arcee_fusion": {**_tb("arcee_fusion", 1),
                     "models": [{"model": "BASE"}, {"model": "EXPERT_1"}]},
    "ram": _tb("ram"),
    "ramplus_tl": _tb("ramplus_tl"),
    "passthrough_slices": {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "EXPERT_1", "layer_range": [0, "LAYERS-1"]}]},
        {"sources": [{"model": "EXPERT_2", "layer_range": [1, "LAYERS"]}]}]},
}.items()})
RANDOM_CASES = {"dare": "random masks differ (by design)",
                "della": "random masks differ (by design)",
                "della_linear": "random masks differ (by design)",
                "arcee_fusion": "quartiles of tensors over 1M entries sampled by different "
                                "generators (the embedding and head here)"}
METHODS = {"task_arithmetic": ["task_arithmetic"], "ties": ["ties", "ties_official"],
           "dare": ["dare"], "linear": ["linear"],
           **{c: [c] for c in CASES if CASES[c][1] is SAME}}


def with_layers(obj: Any, layers: int) -> Any:
    """``obj`` with "LAYERS" and "LAYERS-1" replaced by the inputs' layer count (and one less)."""
    if isinstance(obj, dict):
        return {k: with_layers(v, layers) for k, v in obj.items()}
    if isinstance(obj, list):
        return [with_layers(v, layers) for v in obj]
    return {"LAYERS": layers, "LAYERS-1": layers - 1}.get(obj, obj) if isinstance(obj, str) \
        else obj


# ---------------------------------------------------------------------------------------------
# page cache, read floor, measured runs
# ---------------------------------------------------------------------------------------------

def evict_inputs(files: list[Path], how: str) -> tuple[str, int | None]:
    """Write back dirty pages, drop ``files`` from the page cache; (way used, bytes left)."""
    used = evict(files, how)
    left = resident_bytes(files) if used != "none" else None
    return used, left[0] if left else None


def cold_read_floor(files: list[Path], how: str) -> dict[str, Any]:
    """Seconds to read every byte of ``files`` once, one after another, after eviction."""
    used, left = evict_inputs(files, how)
    disk0 = disk_bytes()
    seconds, total = read_floor(files)
    disk1 = disk_bytes()
    return {"seconds": seconds, "bytes": total, "evict": used, "resident_after_evict": left,
            "disk_read": disk1[0] - disk0[0], "disk_written": disk1[1] - disk0[1]}


def disk_bytes() -> tuple[int, int]:
    """(bytes read, bytes written) by every whole disk since boot (/proc/diskstats)."""
    rd = wr = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if re.fullmatch(r"(sd|vd|xvd)[a-z]+|nvme\d+n\d+", f[2]):
            rd, wr = rd + int(f[5]) * 512, wr + int(f[9]) * 512
    return rd, wr


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (every core), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_measured(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd``: wall, CPU, peak RSS (wait4), peak sampled RssAnon and RSS of the process
    tree (every 50 ms), the other processes' CPU meanwhile, and the exit status."""
    busy0, load, disk0 = _busy_seconds(), os.getloadavg()[0], disk_bytes()
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=CHILD_ENV)
        run = watch(proc, t0, interval=0.05, tree=True)
    rc = run.returncode
    disk1 = disk_bytes()
    tail = log.read_text(errors="replace").strip().splitlines()[-3:] if rc else []
    return {"wall": run.wall, "cpu": run.cpu, "wait4_max_rss_mb": run.max_rss_mb,
            "tree_rss_mb": run.peak_rss_mb, "rss_anon_mb": run.peak_anon_mb,
            "others_cpu": max(0.0, _busy_seconds() - busy0 - run.cpu), "load1": load, "rc": rc,
            "disk_read": disk1[0] - disk0[0], "disk_written": disk1[1] - disk0[1],
            "error": " | ".join(tail)[-300:]}


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------

def make_inputs(models: Path, size: str) -> None:
    if (models / "base").exists():
        return
    print(f"[{size}] writing inputs to {models} ...", flush=True)
    models.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "specmerge.cli", "example", "synthetic", str(models),
                    *SIZES[size], "--experts", str(K)], check=True, env=CHILD_ENV)


def commands(mergekit_yaml: Path) -> dict[str, list[str]]:
    return {"mergekit": [str(mergekit_yaml), "{recipe}", "{out}", "--no-copy-tokenizer",
                         "--random-seed", "0", "--quiet"],
            "specmerge": [sys.executable, "-m", "specmerge.cli", "merge", "{recipe}", "{out}",
                          "--quiet"]}


def bench_size(size: str, cases: list[str], rounds: int, work: Path, mergekit_yaml: Path,
               how: str) -> dict[str, Any]:
    models = work / f"inputs_{size}"
    make_inputs(models, size)
    inputs = sorted(models.rglob("*.safetensors"))
    paths = {"BASE": str(models / "base"),
             **{f"EXPERT_{i + 1}": str(models / f"expert_{i + 1}") for i in range(K)}}
    recipes: dict[tuple[str, str], Path] = {}
    layers = json.loads((models / "base" / "config.json").read_text())["num_hidden_layers"]
    for case in cases:
        mk, sm, _ = CASES[case]
        if mk is not None:
            recipes[("mergekit", case)] = work / f"{case}.mergekit.yml"
            recipes[("mergekit", case)].write_text(
                yaml.safe_dump(with_layers(substitute(mk, paths), layers), sort_keys=False))
        if sm is SAME:
            recipes[("specmerge", case)] = recipes[("mergekit", case)]
            continue
        recipes[("specmerge", case)] = work / f"{case}.specmerge.yml"
        recipes[("specmerge", case)].write_text(yaml.safe_dump(
            {"base_model": paths["BASE"], "models": [paths[f"EXPERT_{i + 1}"] for i in range(K)],
             **sm}, sort_keys=False))
    cmds = commands(mergekit_yaml)
    result: dict[str, Any] = {
        "size": size, "label": SIZE_LABELS[size], "input_bytes": sum(f.stat().st_size
                                                                     for f in inputs),
        "rounds": rounds, "floors": [], "runs": [], "agreement": {},
        "recipes": {f"{t}:{c}": p.read_text() for (t, c), p in recipes.items()},
        "commands": {t: " ".join(c) for t, c in cmds.items()},
        "example_synthetic": " ".join(["specmerge", "example", "synthetic", "DIR", *SIZES[size],
                                       "--experts", str(K)])}
    failed: set[tuple[str, str]] = set()
    for r in range(rounds):
        floor = cold_read_floor(inputs, how)
        result["floors"].append(floor)
        print(f"[{size}] round {r + 1}: read floor {floor['seconds']:.2f} s "
              f"({floor['bytes'] / 1e9:.1f} GB, {floor['evict']}, resident after eviction "
              f"{floor['resident_after_evict']}; the disk read {floor['disk_read'] / 1e9:.1f} GB"
              f" and wrote {floor['disk_written'] / 1e9:.1f} GB meanwhile)", flush=True)
        for i, case in enumerate(cases):
            tools = [t for t in ("mergekit", "specmerge") if (t, case) in recipes]
            for tool in round_order(tools, r):
                if (tool, case) in failed:
                    continue
                out = work / f"out_{tool}_{case}"
                shutil.rmtree(out, ignore_errors=True)
                used, left = evict_inputs(inputs, how)
                cmd = [a.replace("{recipe}", str(recipes[(tool, case)]))
                       .replace("{out}", str(out)) for a in cmds[tool]]
                run = run_measured(cmd, work / f"log_{tool}_{case}.txt")
                run.update({"tool": tool, "case": case, "round": r + 1, "evict": used,
                            "resident_after_evict": left})
                result["runs"].append(run)
                print(f"[{size}] round {r + 1} {case:<16} {tool:<9} {run['wall']:7.2f} s  "
                      f"RssAnon {run['rss_anon_mb']:6.0f} MB  max RSS {run['tree_rss_mb']:6.0f}"
                      f" MB  others' CPU {run['others_cpu']:.1f} s  disk r/w "
                      f"{run['disk_read'] / 1e9:.1f}/{run['disk_written'] / 1e9:.1f} GB"
                      + (f"  FAILED rc={run['rc']}: {run['error']}" if run["rc"] else ""),
                      flush=True)
                if run["rc"]:
                    failed.add((tool, case))
            against = CASES[case][2]
            ours, theirs = work / f"out_specmerge_{case}", work / f"out_mergekit_{against}"
            if r == 0 and ours.exists() and theirs.exists():
                result["agreement"][case] = compare_dirs(ours, theirs)
                print(f"[{size}] {case} vs mergekit {against}: {result['agreement'][case]}",
                      flush=True)
            shutil.rmtree(ours, ignore_errors=True)
            if not any(CASES[c][2] == against and c != against for c in cases[i + 1:]):
                shutil.rmtree(theirs, ignore_errors=True)  # no later case compares with it
    return result


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------

def summarise(res: dict[str, Any], tool: str, case: str) -> dict[str, Any] | None:
    runs = [r for r in res["runs"] if r["tool"] == tool and r["case"] == case]
    ok = [r for r in runs if r["rc"] == 0]
    if not runs:
        return None
    return {"n": len(ok), "failed": len(runs) - len(ok), "wall": median([r["wall"] for r in ok]),
            "walls": [r["wall"] for r in ok], "cpu": median([r["cpu"] for r in ok]),
            "max_rss": max((r["tree_rss_mb"] for r in ok), default=float("nan")),
            "anon": max((r["rss_anon_mb"] for r in ok), default=float("nan")),
            "others": median([r["others_cpu"] / r["wall"] for r in ok]),
            "disk": f"{median([r.get('disk_read', 0) / 1e9 for r in ok]):.1f} / "
                    f"{median([r.get('disk_written', 0) / 1e9 for r in ok]):.1f}",
            "error": next((r["error"] for r in runs if r["rc"]), "")}


def _agreement(case: str, a: dict[str, Any] | None) -> str:
    if a is None:
        return "not compared"
    if a["missing"]:
        return f"tensor sets differ: {a['missing'][:3]}"
    share = a["differing"] / max(1, a["entries"])
    ulp = "dtypes differ" if a["max_ulp"] < 0 else f"max {a['max_ulp']} ulp"
    if case in RANDOM_CASES:
        return (f"{RANDOM_CASES[case]}: rel. diff {a['max_rel']:.2e}, "
                f"{share:.0%} of entries differ")
    if case.startswith("ties"):
        return (f"max rel. diff {a['max_rel']:.2e} ({a['max_rel_tensor']}); {ulp}; "
                f"{share:.2e} of entries differ")
    return (f"{ulp}, {a['over_1_ulp'] / max(1, a['entries']):.1e} of entries over 1 ulp; "
            f"max \\|diff\\| {a['scaled_ulp']:.2f} ulp of the tensor's largest entry; "
            f"max rel. diff {a['max_rel']:.1e}; {share:.1e} of entries differ")


def machine() -> dict[str, str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"cpu": f"{cpu}, {os.cpu_count()} cores",
            "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
            "kernel": platform.release(), "python": platform.python_version(),
            "torch": torch.__version__, "specmerge": commit + (" (modified)" if dirty else "")}


def report(results: dict[str, Any], out: Path) -> None:
    sizes = [s for s in SIZES if s in results]
    any_res = results[sizes[0]]
    m = any_res["machine"]
    lines = [
        "# Peers side by side: specmerge and mergekit 0.1.5", "",
        f"Produced by `benchmarks/peers/run.py` on {any_res['date']}: {m['cpu']}, "
        f"{m['memory']} RAM, no GPU; Linux {m['kernel']}, Python {m['python']}, torch "
        f"{m['torch']}; specmerge at commit {m['specmerge']}; {MERGEKIT} in its own "
        f"virtualenv (torch and CUDA: {any_res.get('mergekit_torch', '?')}).", "",
        "Inputs: `specmerge example synthetic` (a Llama-shaped base and K = 4 experts). Every "
        "timed run and every read-floor measurement starts cold: `sync`, then the inputs are "
        "evicted from the page cache "
        f"({', '.join(sorted({f['evict'] for s in sizes for f in results[s]['floors']}))}; "
        "`fincore` then finds "
        f"{max((f['resident_after_evict'] or 0) for s in sizes for f in results[s]['floors'])} "
        "bytes of the inputs resident). The tools alternate within a round (mergekit first in odd "
        "rounds, specmerge first in even ones). Walls are medians over the rounds; memory is the "
        "largest over them. The **read floor** is the time to read every input byte once, "
        "one file after another in 16 MiB reads, from a cold cache, measured at the start of "
        "each round of the same run.", "",
        "## Summary", "",
        "| model | merge | mergekit wall (s) | specmerge wall (s) | specmerge faster by | "
        "private memory, mergekit / specmerge (MB) | max RSS, mergekit / specmerge (MB) | "
        "outputs |",
        "|---|---|---:|---:|---:|---|---|---|"]
    for s in sizes:
        res = results[s]
        for case in [c for c in CASES if any(r["case"] == c for r in res["runs"])]:
            mk = summarise(res, "mergekit", CASES[case][2])
            sm = summarise(res, "specmerge", case)
            mk_case = CASES[case][0] is not None
            mk_wall = f"{mk['wall']:.1f}" if mk and mk["n"] else (
                f"failed: {mk['error'][:80]}" if mk else "–")
            sm_wall = f"{sm['wall']:.1f}" if sm and sm["n"] else "failed"
            speed = (f"{mk['wall'] / sm['wall']:.1f}×" if mk and sm and mk["n"] and sm["n"]
                     else "–")
            mem = (f"{mk['anon']:.0f} / {sm['anon']:.0f}" if mk and sm and mk_case
                   else f"– / {sm['anon']:.0f}" if sm else "–")
            rss = (f"{mk['max_rss']:.0f} / {sm['max_rss']:.0f}" if mk and sm and mk_case
                   else f"– / {sm['max_rss']:.0f}" if sm else "–")
            label = case if mk_case else f"{case} (vs mergekit's ties)"
            lines.append(f"| {s} | {label} | {mk_wall if mk_case else '(' + mk_wall + ')'} | "
                         f"{sm_wall} | {speed} | {mem} | {rss} | "
                         f"{_agreement(case, res['agreement'].get(case))} |")
    lines += ["", "## Read floor", "",
              "| model | inputs (GB) | read floor, median (s) | rounds (s) | GB/s | "
              "TA wall / read floor | TA rounds / their floors | other disk traffic during "
              "the floors, read + written (GB) |", "|---|---:|---:|---|---:|---:|---|---|"]
    for s in sizes:
        res = results[s]
        floors = [f["seconds"] for f in res["floors"]]
        ta = summarise(res, "specmerge", "task_arithmetic")
        per = ([r["wall"] / f["seconds"] for r, f in zip(
            [r for r in res["runs"] if r["tool"] == "specmerge" and r["case"] == "task_arithmetic"
             and r["rc"] == 0], res["floors"], strict=False)] if ta else [])
        lines.append(f"| {s} | {res['input_bytes'] / 1e9:.2f} | {median(floors):.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in floors)} | "
                     f"{res['input_bytes'] / 1e9 / median(floors):.2f} | "
                     + (f"{ta['wall'] / median(floors):.2f}× | "
                        f"{', '.join(f'{x:.2f}' for x in per)} | " if ta and ta["n"]
                        else "– | – | ")
                     + ", ".join(f"{(f.get('disk_read', f['bytes']) - f['bytes']) / 1e9:.1f} + "
                                 f"{f.get('disk_written', 0) / 1e9:.1f}" for f in res["floors"])
                     + " |")
    lines += ["", "## Every tool and merge", "",
              "| model | merge | tool | wall per round (s) | median wall (s) | CPU (s) | "
              "max RSS (MB) | private memory (MB) | other processes' CPU (cores) | "
              "disk read / written, median (GB) |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for s in sizes:
        res = results[s]
        for case in CASES:
            for tool in ("mergekit", "specmerge"):
                x = summarise(res, tool, case)
                if x is None:
                    continue
                walls = ", ".join(f"{w:.1f}" for w in x["walls"])
                if x["failed"]:
                    walls += f" ({x['failed']} failed: {x['error'][:100]})"
                lines.append(f"| {s} | {case} | {tool} | {walls} | {x['wall']:.1f} | "
                             f"{x['cpu']:.1f} | {x['max_rss']:.0f} | {x['anon']:.0f} | "
                             f"{x['others']:.2f} | {x['disk']} |")
    res = results[sizes[0]]
    lines += ["", "## How to reproduce", "", "```bash",
              ".venv/bin/python benchmarks/peers/run.py --rounds 3 "
              f"--sizes {' '.join(sizes)}   # --methods, --workdir, --venv, --evict", "```", "",
              "Inputs per model:", ""]
    lines += [f"- {s}: `{results[s]['example_synthetic']}`" for s in sizes]
    lines += ["", "Each timed command (`{recipe}` and `{out}` filled in; both tools at their "
              "defaults otherwise: specmerge with 1 worker and 16 MiB blocks, mergekit with "
              "torch's default threads):", "",
              f"- mergekit: `{res['commands']['mergekit']}`",
              f"- specmerge: `{res['commands']['specmerge']}`", "", "The recipes (paths shortened; where only mergekit's is shown, specmerge read that "
              "same file):", ""]
    for key, text in res["recipes"].items():
        if key.startswith("specmerge:") and text == res["recipes"].get(
                "mergekit:" + key.split(":", 1)[1]):
            continue  # the same file: specmerge reads mergekit's recipe
        short = re.sub(r"/\S*/inputs_[^/]+/", "", text)
        lines += [f"`{key}`:", "", "```yaml", short.rstrip(), "```", ""]
    old = out.read_text() if out.exists() else ""
    # the notes below the marker are written by hand: a rewrite keeps them
    notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else "\n## Notes\n\n(none yet)\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(keep_sizes(lines, old.split(NOTES_MARKER, 1)[0], sizes)) + "\n"
                   + NOTES_MARKER + notes)


def _size_of(line: str) -> str:
    """The size a row of a table ("| 200M | …") or of the inputs list ("- 200M: …") is of."""
    return line.split(" | ", 1)[0].removeprefix("| ").removeprefix("- ").split(":", 1)[0]


def keep_sizes(lines: list[str], old: str, sizes: list[str]) -> list[str]:
    """``lines`` with the rows of the earlier page ``old`` for the sizes this run has no results
    for (a run of some sizes leaves the others' measurements as they were): each table's kept
    rows come first, and the provenance of the earlier run stays with them."""
    kept: dict[str, list[str]] = {}
    provenance: list[str] = []
    section = ""
    for ln in old.splitlines():
        section = ln if ln.startswith("## ") else section
        if ln.startswith("Produced by "):
            provenance.append(ln)
        elif ln.startswith("Rows of ") and set(ln[8:].split(":", 1)[0].split(", ")).isdisjoint(
                sizes):
            provenance.append(ln)
        elif _size_of(ln) in SIZES and _size_of(ln) not in sizes:
            kept.setdefault(section, []).append(ln)
    if not kept:
        return lines
    others = sorted({_size_of(ln) for rows in kept.values() for ln in rows},
                    key=list(SIZES).index)
    out: list[str] = []
    section = ""
    for ln in lines:
        if ln.startswith("Produced by "):
            out += [f"Rows of {', '.join(sizes)}: p{ln[1:]}", ""]
            out += [p if p.startswith("Rows of ") else f"Rows of {', '.join(others)}, from an "
                    f"earlier run: p{p[1:]}" for p in provenance]
            continue
        section = ln if ln.startswith("## ") else section
        out.append(ln)
        if ln.startswith("|---") or (ln == "" and out[-2:-1] == ["Inputs per model:"]):
            out += kept.pop(section, [])
    return out


NOTES_MARKER = "<!-- notes: written by hand, kept when run.py rewrites the tables above -->\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/specmerge-peers"))
    ap.add_argument("--venv", type=Path, default=VENV_DEFAULT)
    ap.add_argument("--evict", choices=["fadvise", "drop_caches", "auto", "none"],
                    default="fadvise",
                    help="fadvise (default): posix_fadvise(DONTNEED) on the input files only, "
                         "which leaves the tools' libraries and other processes' caches alone; "
                         "drop_caches: the whole page cache (root); auto: drop_caches, else "
                         "fadvise")
    ap.add_argument("--keep-inputs", action="store_true",
                    help="Keep each size's synthetic inputs (default: delete after its runs)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "peers.md")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    store = work / "results.json"
    results: dict[str, Any] = json.loads(store.read_text()) if store.exists() else {}
    if not args.report_only:
        mergekit_yaml = ensure_mergekit(args.venv)
        mk_torch = subprocess.run([str(args.venv / "bin" / "python"), "-c",
                                   "import torch; print(torch.__version__, torch.version.cuda)"],
                                  capture_output=True, text=True).stdout.strip()
        cases = [c for m in args.methods for c in METHODS[m]]
        for size in args.sizes:
            res = bench_size(size, cases, args.rounds, work, mergekit_yaml, args.evict)
            res.update({"date": datetime.date.today().isoformat(), "machine": machine(),
                        "mergekit_torch": mk_torch})
            results[size] = res
            store.write_text(json.dumps(results, indent=1))
            report(results, args.out)
            if not args.keep_inputs:
                shutil.rmtree(work / f"inputs_{size}", ignore_errors=True)
    report(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
