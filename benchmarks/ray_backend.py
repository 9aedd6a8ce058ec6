"""Overhead of ``--backend ray`` against ``--backend local``, on one machine.

Writes (once) Llama-shaped synthetic models with ``specmerge example synthetic`` (base + K
experts), starts one local Ray instance in this process (``ray.init(address="local",
num_cpus=C)`` with C = the machine's CPUs, or with ``--cluster-nodes N`` a
``ray.cluster_utils.Cluster`` of N nodes sharing the CPUs), and merges each model with each
method in three ways, interleaved round by round (the order rotates each round):

- ``local-w1``: ``specmerge.merge(..., workers=1)``;
- ``local-w2``: ``specmerge.merge(..., workers=2)``;
- ``ray``: ``specmerge.merge(..., backend=RayBackend())`` with the defaults of ``--backend ray``
  (the driver's torch thread count in every task, and as many CPUs asked per task, at most the
  largest node's; results recorded before 2026-11-28 used 1 CPU per task); the subclass used
  here only counts the tasks and times the driver's file checks;
- ``ray-1`` (only with ``--variants``): the same with ``task_bytes=1``, one tensor per task.

Before the timed rounds: one untimed local merge (page cache, imports) and one untimed Ray
merge, whose wall is reported as the cold first-run cost (worker start-up, imports in the
workers), next to the time ``ray.init`` took. Every merge runs in this process; a thread samples
every 50 ms ``VmRSS`` and ``RssAnon`` of this process (the driver) and of every ``ray::``
process that descends from it (the Ray workers; other users' Ray processes are ignored). Each
output's safetensors (and index) are hashed with sha256, compared with the other variants' in
the same run (a mismatch stops the benchmark with exit status 1), then deleted.

A Ray run during which a worker busy with a task disappears (killed from outside: on a shared
machine, another user's ``tests/test_ray.py`` SIGKILLs any ``ray::run_group`` process it sees)
is timed again, up to 3 times; its bytes, after Ray's retry, are compared all the same.

Prints Markdown: median wall of the rounds, the ratio ray / local (median of the per-round
ratios), the driver's and the workers' memory peaks, the task count and the check time.

    python benchmarks/ray_backend.py --params 100M 500M --spectral-params 100M --rounds 5
    python benchmarks/ray_backend.py --params 100M --methods task_arithmetic --rounds 5 \\
        --cluster-nodes 2      # a 2-node Cluster on this machine instead of one node
    python benchmarks/ray_backend.py --params 100M --methods swudi+svc --variants ray ray-1
                               # the default grouping against one tensor per task
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit import median_ratio, round_order, status_mb

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see README, Performance
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # as tests/test_ray.py

import psutil
import torch

import specmerge
from specmerge.examples import llama_shape_for, parse_count
from specmerge.plan import PlanEntry
from specmerge.ray_backend import RayBackend

METHODS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"merge_method": "task_arithmetic"},
    "ties": {"merge_method": "ties"},
    "swudi+svc": {"merge_method": "swudi", "calibrate": {"method": "svc"}},
}
VARIANTS = ("local-w1", "local-w2", "ray", "ray-1")
SAMPLE_S = 0.05


@dataclass
class TimedRayBackend(RayBackend):
    """``--backend ray``'s RayBackend, counting its tasks and timing the driver's file checks."""

    tasks: int = 0
    check_s: float = 0.0

    def check_files(self, paths: Sequence[Path], what: str) -> None:
        start = time.perf_counter()
        super().check_files(paths, what)
        self.check_s += time.perf_counter() - start

    def groups(self, entries: Sequence[PlanEntry]) -> list[list[PlanEntry]]:
        out = super().groups(entries)
        self.tasks += len(out)
        return out


def proc_title(pid: int) -> str | None:
    """The command line (Ray's process title) of ``pid``; None once it is gone or a zombie
    (whose command line reads empty)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return None
    return title.decode(errors="replace") or None


def ray_workers() -> list[int]:
    """Pids of the ``ray::`` processes (Ray workers) that descend from this process."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if cmd and cmd[0].startswith("ray::"):
            pids.append(p.pid)
    return pids


def ray_system_mb() -> float:
    """VmRSS of this process's other descendants (raylet, GCS, Ray's agents), in MB."""
    workers = set(ray_workers())
    return sum(status_mb(p.pid)[0] for p in psutil.Process().children(recursive=True)
               if p.pid not in workers)


@dataclass
class Peaks:
    driver_rss: float = 0.0
    driver_anon: float = 0.0
    driver_start_rss: float = 0.0  # at the start of the run, after malloc_trim
    driver_start_anon: float = 0.0
    killed: int = 0  # ray::run_group workers that vanished mid-task (killed from outside)
    worker_rss: dict[int, float] = field(default_factory=dict)
    worker_anon: dict[int, float] = field(default_factory=dict)
    sum_rss: float = 0.0
    sum_anon: float = 0.0


class Sampler:
    """Samples driver and Ray-worker memory every ``SAMPLE_S`` s while in a ``with`` block."""

    def __init__(self) -> None:
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me, pids, n = os.getpid(), ray_workers(), 0
        p = self.peaks
        busy: set[int] = set()
        while not self._stop.is_set():
            rss, anon = status_mb(me)
            p.driver_rss, p.driver_anon = max(p.driver_rss, rss), max(p.driver_anon, anon)
            total_rss = total_anon = 0.0
            for pid in pids:
                rss, anon = status_mb(pid)
                title = proc_title(pid)
                if title is None:  # gone: killed if it was running a task (Ray reaps idle ones)
                    p.killed += pid in busy
                    busy.discard(pid)
                    continue
                if title.startswith("ray::run_group"):
                    busy.add(pid)
                else:
                    busy.discard(pid)
                p.worker_rss[pid] = max(p.worker_rss.get(pid, 0.0), rss)
                p.worker_anon[pid] = max(p.worker_anon.get(pid, 0.0), anon)
                total_rss, total_anon = total_rss + rss, total_anon + anon
            p.sum_rss, p.sum_anon = max(p.sum_rss, total_rss), max(p.sum_anon, total_anon)
            n += 1
            if n % 10 == 0:  # new workers (a retry, a restart) are picked up within 0.5 s
                pids = sorted(set(ray_workers()) | busy)
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> Sampler:
        self.peaks.driver_start_rss, self.peaks.driver_start_anon = status_mb(os.getpid())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Run:
    wall: float
    peaks: Peaks
    tasks: int = 0
    check_s: float = 0.0


def output_hashes(out: Path) -> dict[str, str]:
    """sha256 of every safetensors file (and the shard index) of a merged output."""
    hashes = {}
    for f in sorted(out.glob("*.safetensors")) + sorted(out.glob("*.safetensors.index.json")):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
        hashes[f.name] = h.hexdigest()
    return hashes


def merge_once(recipe: dict[str, Any], out: Path, variant: str) -> tuple[Run, dict[str, str]]:
    """One merge in this process, measured; returns the run and the output's hashes. Memory
    that earlier runs freed is handed back to the OS first (``malloc_trim``), so that a peak is
    this run's own."""
    shutil.rmtree(out, ignore_errors=True)
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    backend = (TimedRayBackend() if variant == "ray" else
               TimedRayBackend(task_bytes=1) if variant == "ray-1" else None)
    workers = {"local-w1": 1, "local-w2": 2}.get(variant, 1)
    with Sampler() as sampler:
        start = time.perf_counter()
        specmerge.merge(recipe, out, workers=workers, backend=backend, progress=False)
        wall = time.perf_counter() - start
    hashes = output_hashes(out)
    shutil.rmtree(out)
    run = Run(wall, sampler.peaks)
    if backend is not None:
        run.tasks, run.check_s = backend.tasks, backend.check_s
    return run, hashes


def model_bytes(params: str, experts: int, dtype: str) -> int:
    itemsize = 4 if dtype in ("float32", "fp32") else 2
    return llama_shape_for(parse_count(params)).num_params() * itemsize * (experts + 1)


def ensure_models(root: Path, params: str, experts: int, dtype: str) -> Path:
    models = root / f"synthetic_{params}_k{experts}_{dtype}"
    if not (models / "base").exists():
        print(f"writing {models} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "specmerge.cli", "example", "synthetic",
                        str(models), "--params", params, "--experts", str(experts),
                        "--dtype", dtype], check=True, stdout=subprocess.DEVNULL)
    return models


def recipe_for(models: Path, experts: int, method: str) -> dict[str, Any]:
    return {"base_model": str(models / "base"),
            "models": [str(models / f"expert_{i + 1}") for i in range(experts)],
            **METHODS[method]}


def start_ray(nodes: int, cpus: int) -> tuple[float, Any]:
    """Start this benchmark's own Ray instance; (seconds, the Cluster or None)."""
    import ray

    start = time.perf_counter()
    cluster = None
    if nodes:
        from ray.cluster_utils import Cluster

        cluster = Cluster()
        for _ in range(nodes):
            cluster.add_node(num_cpus=max(1, cpus // nodes))
        ray.init(address=cluster.address, logging_level=logging.WARNING,
                 include_dashboard=False, log_to_driver=False)
    else:  # "local": a new instance even if another user's `ray start` cluster is running
        ray.init(address="local", num_cpus=cpus, logging_level=logging.WARNING,
                 include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - start, cluster


def walls(*runs: Sequence[Run]) -> list[list[float]]:
    return [[x.wall for x in rs] for rs in runs]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", nargs="+", default=["100M", "500M"],
                    help="model sizes for the element-wise methods (default 100M 500M)")
    ap.add_argument("--spectral-params", nargs="*", default=["100M"],
                    help="model sizes for swudi+svc (default 100M; 500M takes ~10x longer)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--dtype", default="bf16", help="of the synthetic models (default bf16)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS[:3]), choices=VARIANTS,
                    help="ray-1: the Ray backend with task_bytes=1 (one tensor per task); "
                         "local-w1 and local-w2 are always run (the ratios' baselines)")
    ap.add_argument("--cluster-nodes", type=int, default=0,
                    help="0: one Ray node (ray.init); N: a Cluster of N nodes on this machine")
    ap.add_argument("--workdir", type=Path, default=Path("work/ray_backend"))
    ap.add_argument("--keep-models", action="store_true", help="keep the synthetic models")
    ap.add_argument("--json", type=Path, help="also write the raw runs here")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.experts < 1:
        ap.error("--rounds and --experts must be at least 1")
    variants = tuple(v for v in VARIANTS if v in {"local-w1", "local-w2", *args.variants})

    cases = [(p, m) for p in args.params for m in args.methods if m != "swudi+svc"]
    if "swudi+svc" in args.methods:
        cases += [(p, "swudi+svc") for p in args.spectral_params]
    sizes = sorted({p for p, _ in cases}, key=parse_count)
    root = args.workdir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    need = sum(model_bytes(p, args.experts, args.dtype) for p in sizes
               if not (root / f"synthetic_{p}_k{args.experts}_{args.dtype}" / "base").exists())
    need += 2 * model_bytes(sizes[-1], 0, args.dtype)  # an output being written and hashed
    free = shutil.disk_usage(root).free
    if free - need < 5 * 10**9:
        sys.exit(f"not enough disk under {root}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB "
                 f"needed plus a 5 GB margin")
    models = {p: ensure_models(root, p, args.experts, args.dtype) for p in sizes}
    out = root / "out"

    cpus = os.cpu_count() or 1
    threads = torch.get_num_threads()
    first = recipe_for(models[cases[0][0]], args.experts, cases[0][1])
    reference: dict[tuple[str, str], dict[str, str]] = {}
    _, reference[cases[0]] = merge_once(first, out, "local-w1")  # page cache, imports: untimed
    init_s, cluster = start_ray(args.cluster_nodes, cpus)
    system_mb = ray_system_mb()
    cold, hashes = merge_once(first, out, "ray")  # worker start-up and imports, apart
    if hashes != reference[cases[0]]:
        sys.exit(f"FAIL: the first Ray merge of {' '.join(cases[0])} wrote other bytes than "
                 f"the local one")

    runs: dict[tuple[str, str, str], list[Run]] = {}
    repeated = 0
    for r in range(args.rounds):
        for params, method in cases:
            for variant in round_order(variants, r):
                for attempt in range(1, 5):
                    run, hashes = merge_once(recipe_for(models[params], args.experts, method),
                                             out, variant)
                    want = reference.setdefault((params, method), hashes)
                    if hashes != want:
                        sys.exit(f"FAIL: {params} {method} {variant} (round {r + 1}) wrote other "
                                 f"bytes than the first run of this case:\n"
                                 f"{json.dumps(hashes)}\nvs\n{json.dumps(want)}")
                    print(f"round {r + 1}: {params} {method} {variant}: {run.wall:.2f} s"
                          + (f" ({run.peaks.killed} worker(s) killed mid-task from outside: "
                             "same bytes; timed again)" if run.peaks.killed else ""),
                          file=sys.stderr, flush=True)
                    if not run.peaks.killed or attempt == 4:
                        break
                    repeated += 1
                runs.setdefault((params, method, variant), []).append(run)
    load = os.getloadavg()

    import ray

    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    if not args.keep_models:
        for path in models.values():
            shutil.rmtree(path, ignore_errors=True)

    where = (f"a Cluster of {args.cluster_nodes} nodes × {max(1, cpus // args.cluster_nodes)} "
             f"CPU" if args.cluster_nodes else f"one node, ray.init(num_cpus={cpus})")
    print(f"{platform.processor() or platform.machine()}, {cpus} CPUs, torch {torch.__version__} "
          f"({threads} threads), ray {ray.__version__}, specmerge {specmerge.__version__}; "
          f"synthetic Llama models, K = {args.experts}, {args.dtype}; Ray: {where}; "
          f"median of {args.rounds} interleaved rounds; load average at the end "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}\n")
    print("| model | method | variant | wall s (median) | × local-w1 | × local-w2 | "
          "driver peak RSS / RssAnon MB (RssAnon at start) | worker peak RSS / RssAnon MB "
          "(max per worker) | "
          "workers' sum peak RSS / RssAnon MB | tasks | driver checks s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for params, method in cases:
        w1 = runs[(params, method, "local-w1")]
        w2 = runs[(params, method, "local-w2")]
        for variant in variants:
            rs = runs[(params, method, variant)]
            wall = statistics.median(x.wall for x in rs)
            start = statistics.median(x.peaks.driver_start_anon for x in rs)
            drss = max(x.peaks.driver_rss for x in rs)
            danon = max(x.peaks.driver_anon for x in rs)
            cells = [f"{wall:.2f}", f"{median_ratio(*walls(rs, w1)):.2f}",
                     f"{median_ratio(*walls(rs, w2)):.2f}",
                     f"{drss:.0f} / {danon:.0f} ({start:.0f})"]
            if variant.startswith("ray"):
                wrss = max(max(x.peaks.worker_rss.values(), default=0) for x in rs)
                wanon = max(max(x.peaks.worker_anon.values(), default=0) for x in rs)
                srss = max(x.peaks.sum_rss for x in rs)
                sanon = max(x.peaks.sum_anon for x in rs)
                cells += [f"{wrss:.0f} / {wanon:.0f}", f"{srss:.0f} / {sanon:.0f}",
                          f"{rs[0].tasks}", f"{statistics.median(x.check_s for x in rs):.2f}"]
            else:
                cells += ["", "", "", ""]
            print(f"| {params} | {method} | {variant} | " + " | ".join(cells) + " |")
    warm = statistics.median(x.wall for x in runs[(*cases[0], "ray")])
    print(f"\nCold start: ray.init {init_s:.1f} s; first Ray merge ({' '.join(cases[0])}) "
          f"{cold.wall:.2f} s against {warm:.2f} s warm (+{cold.wall - warm:.2f} s). Ray's own "
          f"processes (raylet, GCS, agents) held {system_mb:.0f} MB RSS after ray.init. All "
          f"outputs byte-identical across variants and rounds (sha256). Runs repeated because "
          f"a Ray worker was killed mid-task from outside: {repeated}.")
    if args.json:
        args.json.write_text(json.dumps({
            "init_s": init_s, "cold_s": cold.wall, "system_mb": system_mb, "repeated": repeated,
            "runs": {" ".join(k): [{"wall": x.wall, "tasks": x.tasks, "check_s": x.check_s,
                                     "driver_rss": x.peaks.driver_rss,
                                     "driver_start_anon": x.peaks.driver_start_anon,
                                     "killed": x.peaks.killed,
                                     "driver_anon": x.peaks.driver_anon,
                                     "worker_rss": max(x.peaks.worker_rss.values(), default=0),
                                     "worker_anon": max(x.peaks.worker_anon.values(), default=0),
                                     "sum_rss": x.peaks.sum_rss, "sum_anon": x.peaks.sum_anon}
                                    for x in v] for k, v in runs.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
