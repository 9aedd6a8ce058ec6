"""A cost model for SWUDI + SVC on a 70B model across N nodes, fitted from per-matrix timings.

1. Measure (or reload with ``--from-json``): SWUDI, then SVC on SWUDI's result, called directly
   on K dense float32 task vectors (``specmerge.synthetic.structured_task_vectors``) at a ladder
   of Llama-70B aspect ratios scaled to a hidden size h: q/o (h × h), k/v (h/8 × h), gate/up
   (3.5h × h) and down (h × 3.5h; measured up to ``--down-max``); K = 8 at every h and K = 4 at
   one h (so that the K-dependence is fitted too). Median of up to 3 timed calls after a
   warm-up (fewer for a slow cell, within ``--budget`` seconds).
2. Fit, per method, t = a·G + b·E by least squares on relative errors over the cells with
   h ≥ ``--fit-min-h``, where G counts the GEMM flops of the code and E its decomposition
   (SWUDI: eigh of the n × n C, E = n³; SVC: the thin SVD, E = M·r²); see ``swudi_features``
   and ``svc_features``. Print the fit's errors and the log-log exponent of t in h.
3. Predict SWUDI + SVC with K experts on Llama-70B (shapes from its config.json: hidden 8192,
   intermediate 28672, 80 layers, 64 heads with 8 KV heads of 128 dims, vocabulary 128256):
   each matrix from the fit, grouped into Ray tasks by ``RayBackend.groups`` itself; a task's
   time = its compute + its bytes read ((K + 1) inputs) and written (1 output) at
   ``--node-gbs`` GB/s + a per-task overhead; tasks handed in order to the first free of N
   slots (one task per node at a time); plus a fixed overhead. CPU nodes run at the speed fitted
   here. GPU nodes run at that speed times a ratio R, an ASSUMPTION: the smaller of the ratios
   between our predicted CPU time of SWUDI alone on the SWUDI paper's two anchors and the
   paper's GPU times (Llama-3.2-3B in 70.9 s, Qwen2-VL-7B in 487.8 s by the official code,
   arXiv 2606.07289; K = ``--k-anchor`` assumed, the GPU not known). With ``--gpu-json``
   (``gpu_timings.py matrices --json``; ``GPU_CHECK_WORK=DIR bash benchmarks/gpu_check.sh``
   keeps ``DIR/matrices.json``) the GPU coefficients are fitted from measured GPU timings.

    python benchmarks/ray_cost_model.py --ladder 512 1024 2048 4096 --json work/cost_cpu.json
    python benchmarks/ray_cost_model.py --from-json docs/results/ray_cost_model_cpu.json
    python benchmarks/ray_cost_model.py --from-json docs/results/ray_cost_model_cpu.json \\
        --gpu-json DIR/matrices.json          # once a GPU has run benchmarks/gpu_check.sh
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from toolkit import time_call

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see README, Performance

import torch

from specmerge.examples import llama_shape_for
from specmerge.methods.calibration import svc
from specmerge.methods.interference import swudi, swudi_rank
from specmerge.plan import PlanEntry
from specmerge.ray_backend import RayBackend
from specmerge.synthetic import structured_task_vectors

ASPECTS: dict[str, Callable[[int], tuple[int, int]]] = {
    "q/o": lambda h: (h, h),
    "k/v": lambda h: (h // 8, h),
    "gate/up": lambda h: (h * 7 // 2, h),
    "down": lambda h: (h, h * 7 // 2),
}

# Llama-2-70B / Llama-3-70B config.json: hidden_size 8192, intermediate_size 28672,
# num_hidden_layers 80, num_attention_heads 64, num_key_value_heads 8 (head_dim 128);
# Llama-3's vocab_size 128256, untied embeddings.
HIDDEN, INTER, LAYERS, KV, VOCAB = 8192, 28672, 80, 1024, 128256
LAYER_70B: list[tuple[str, tuple[int, int]]] = [
    ("self_attn.q_proj", (HIDDEN, HIDDEN)), ("self_attn.k_proj", (KV, HIDDEN)),
    ("self_attn.v_proj", (KV, HIDDEN)), ("self_attn.o_proj", (HIDDEN, HIDDEN)),
    ("mlp.gate_proj", (INTER, HIDDEN)), ("mlp.up_proj", (INTER, HIDDEN)),
    ("mlp.down_proj", (HIDDEN, INTER))]

# The anchor (arXiv 2606.07289, as quoted in issue #13): the official SWUDI code merges
# Llama-3.2-3B in 70.9 s and Qwen2-VL-7B in 487.8 s on a GPU. K and the GPU are not given there:
# K_ANCHOR is our assumption. Llama-3.2-3B: hidden 3072, intermediate 8192, 28 layers, 8 KV heads
# of 128; Qwen2-VL-7B's language model: hidden 3584, intermediate 18944, 28 layers, 4 KV heads.
ANCHORS = {"Llama-3.2-3B": (70.9, 3072, 8192, 28, 1024),
           "Qwen2-VL-7B (language model)": (487.8, 3584, 18944, 28, 512)}
K_ANCHOR = 3


def swudi_features(m: int, n: int, k: int) -> tuple[float, float]:
    """(GEMM flops, n³) of ``swudi`` on K m × n task vectors: C and D one task at a time
    (m ≥ n: τᵀτ and τ·G; m < n: τᵀτ, ττᵀ and (ττᵀ)τ), then D − τ₀C and the product with the
    kept eigenvectors Q_k (k = swudi_rank(n, 0.65)) on both sides; eigh of the n × n C."""
    kept = swudi_rank(n, 0.65)
    per_task = 4 * m * n * n if m >= n else 2 * m * n * n + 4 * m * m * n
    return float(k * per_task + 2 * m * n * n + 4 * m * n * kept), float(n) ** 3


def svc_features(m: int, n: int, k: int) -> tuple[float, float]:
    """(GEMM flops, M·r²) of ``svc`` (r = min, M = max): the K responses Uᵀτ_i and the
    product back, 2(K + 1)·M·r² flops; the thin SVD of the M × r layout, ∝ M·r²."""
    r, big = min(m, n), max(m, n)
    return float(2 * (k + 1) * big * r * r), float(big) * r * r


FEATURES = {"swudi": swudi_features, "svc": svc_features}


@dataclass(frozen=True)
class Fit:
    a: float  # seconds per GEMM flop
    b: float  # seconds per decomposition unit (n³ or M·r²)

    def __call__(self, feats: tuple[float, float]) -> float:
        return self.a * feats[0] + self.b * feats[1]


def fit(rows: Sequence[dict[str, Any]], method: str, min_h: int = 0) -> Fit:
    """Least squares on relative errors over the rows with h ≥ ``min_h``, coefficients ≥ 0
    (one is dropped if it goes < 0)."""
    pts = [(FEATURES[method](r["m"], r["n"], r["k"]), r[method]) for r in rows
           if r.get("h", min_h) >= min_h]
    xs = [(g / t, e / t) for (g, e), t in pts]
    sgg = sum(x * x for x, _ in xs)
    see = sum(y * y for _, y in xs)
    sge = sum(x * y for x, y in xs)
    sg, se = sum(x for x, _ in xs), sum(y for _, y in xs)
    det = sgg * see - sge * sge
    if det > 0:
        a, b = (sg * see - se * sge) / det, (se * sgg - sg * sge) / det
        if a >= 0 and b >= 0:
            return Fit(a, b)
    only_a, only_b = Fit(sg / sgg, 0.0), Fit(0.0, se / see)

    def err(f: Fit) -> float:
        return sum((f(p) / t - 1) ** 2 for p, t in pts)

    return min(only_a, only_b, key=err)


def measure(ladder: Sequence[int], k_extra: int, h_extra: int, budget: float,
            down_max: int) -> list[dict[str, Any]]:
    cells = [(h, name, 8) for h in ladder for name in ASPECTS
             if name != "down" or h <= down_max]
    cells += [(h_extra, name, k_extra) for name in ASPECTS]
    rows = []
    for h, name, k in cells:
        m, n = ASPECTS[name](h)
        taus = structured_task_vectors((m, n), k, generator=torch.Generator().manual_seed(h))
        merged = swudi(taus)
        a = time_call(lambda taus=taus: swudi(taus), budget=budget)
        b = time_call(lambda merged=merged, taus=taus: svc(merged, taus), budget=budget)
        t_swudi, runs_a, t_svc, runs_b = a.median, a.runs, b.median, b.runs
        rows.append({"h": h, "aspect": name, "m": m, "n": n, "k": k, "swudi": t_swudi,
                     "svc": t_svc, "runs": [runs_a, runs_b]})
        print(f"h={h} {name} {m}×{n} K={k}: swudi {t_swudi:.3f} s ({runs_a} runs), "
              f"svc {t_svc:.3f} s ({runs_b})", flush=True)
        del taus, merged
    return rows


def exponent(rows: Sequence[dict[str, Any]], method: str, aspect: str) -> float | None:
    """Slope of log t against log h over the K = 8 rows of one aspect ratio."""
    pts = [(math.log(r["h"]), math.log(r[method])) for r in rows
           if r["aspect"] == aspect and r["k"] == 8]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    return (sum((x - mx) * (y - my) for x, y in pts)
            / sum((x - mx) ** 2 for x, _ in pts))


@dataclass(frozen=True)
class Entry:
    """What ``RayBackend.groups`` reads of a plan entry."""

    name: str
    numel: int
    shape: tuple[int, int] | None  # a matrix merged by SWUDI + SVC, else None (fallback)


def llama70b_entries() -> list[Entry]:
    out = [Entry("model.embed_tokens.weight", VOCAB * HIDDEN, None)]
    for layer in range(LAYERS):
        for name, (m, n) in LAYER_70B:
            out.append(Entry(f"model.layers.{layer}.{name}.weight", m * n, (m, n)))
        out += [Entry(f"model.layers.{layer}.{x}.weight", HIDDEN, None)
                for x in ("input_layernorm", "post_attention_layernorm")]
    out += [Entry("model.norm.weight", HIDDEN, None),
            Entry("lm_head.weight", VOCAB * HIDDEN, None)]
    return out


@dataclass
class PlannedBackend(RayBackend):
    """``RayBackend.groups`` for a cluster of ``n_slots`` task slots, without a cluster."""

    n_slots: int = 1

    def slots(self) -> int:
        return self.n_slots


def makespan(task_seconds: Sequence[float], slots: int) -> float:
    """Tasks handed in order to the first free of ``slots`` (Ray's FIFO as slots free up)."""
    free = [0.0] * slots
    for t in task_seconds:
        heapq.heappush(free, heapq.heappop(free) + t)
    return max(free)


def predict(per_matrix: Callable[[tuple[int, int]], float], nodes: int, k: int,
            node_gbs: float, itemsize: int, task_s: float, fixed_s: float
            ) -> tuple[float, float, float]:
    """(wall, compute summed over tasks, I/O summed over tasks) of SWUDI + SVC on 70B."""
    entries = llama70b_entries()
    groups = PlannedBackend(n_slots=nodes).groups(cast(list[PlanEntry], entries))
    times, compute, io = [], 0.0, 0.0
    for group in groups:
        c = sum(per_matrix(e.shape) for e in cast(list[Entry], group) if e.shape)
        b = sum(e.numel for e in group) * itemsize * (k + 2) / (node_gbs * 1e9)
        compute, io = compute + c, io + b
        times.append(c + b + task_s)
    return fixed_s + makespan(times, nodes), compute, io


def anchor_ratio(cpu: dict[str, Fit], k: int) -> dict[str, float]:
    """Predicted CPU seconds of SWUDI alone on each anchor model / the anchor's GPU seconds."""
    out = {}
    for name, (gpu_s, h, inter, layers, kv) in ANCHORS.items():
        shapes = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
        cpu_s = layers * sum(cpu["swudi"](swudi_features(m, n, k)) for m, n in shapes)
        out[name] = cpu_s / gpu_s
    return out


def gpu_fits(path: Path, cpu: dict[str, Fit], k: int) -> dict[str, Fit]:
    """GPU coefficients from ``gpu_timings.py matrices --json`` (swudi, task_arithmetic + svc
    rows at Llama-7B shapes). SVC's two features are proportional at fixed K, so its GPU fit
    keeps the CPU's split and fits one scale."""
    data = json.loads(path.read_text())
    rows: dict[tuple[int, int, int], dict[str, Any]] = {}
    for r in data["rows"]:
        key = (r["m"], r["n"], data["tasks"])
        method = {"swudi": "swudi", "task_arithmetic + svc": "svc"}.get(r["method"])
        if method:
            rows.setdefault(key, {"m": r["m"], "n": r["n"], "k": data["tasks"]})[method] = (
                r["median_s"])
    both = [r for r in rows.values() if "swudi" in r and "svc" in r]
    sw = fit(both, "swudi")
    scale = statistics.median(r["svc"] / cpu["svc"](svc_features(r["m"], r["n"], k))
                              for r in both)
    return {"swudi": sw, "svc": Fit(cpu["svc"].a * scale, cpu["svc"].b * scale)}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ladder", type=int, nargs="+", default=[512, 1024, 2048],
                    help="hidden sizes h of the measured shapes (default 512 1024 2048)")
    ap.add_argument("--k-extra", type=int, default=4, help="a second K, measured at --h-extra")
    ap.add_argument("--h-extra", type=int, default=1024)
    ap.add_argument("--down-max", type=int, default=2048,
                    help="largest h whose down shape (h × 3.5h: eigh of 3.5h) is measured")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds of timed runs per cell after its warm-up (default 60)")
    ap.add_argument("--fit-min-h", type=int, default=1024,
                    help="fit on the rows with h >= this (default 1024: at h = 512 fixed "
                         "per-call costs weigh, and the 70B matrices are far larger)")
    ap.add_argument("--json", type=Path, help="write the measured rows here")
    ap.add_argument("--from-json", type=Path, help="refit from rows measured before")
    ap.add_argument("--gpu-json", type=Path, help="gpu_timings.py matrices --json output")
    ap.add_argument("--experts", type=int, default=8, help="K of the 70B merge (default 8)")
    ap.add_argument("--node-gbs", type=float, default=1.0,
                    help="GB/s each node reads and writes the shared FS at (default 1.0)")
    ap.add_argument("--itemsize", type=int, default=2, help="bytes per stored parameter (bf16)")
    ap.add_argument("--task-overhead-s", type=float, default=0.02,
                    help="Ray's cost per task: 13 ms measured, docs/results/ray_backend.md")
    ap.add_argument("--fixed-overhead-s", type=float, default=10.0,
                    help="connect, probes, worker start-up: 2.8 s of worker start-up and "
                         "0.02 s of probes measured on one node, rounded up for a cluster")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--k-anchor", type=int, default=K_ANCHOR,
                    help=f"K assumed for the paper's GPU anchors (default {K_ANCHOR})")
    ap.add_argument("--eigh-b", type=float,
                    help="override SWUDI's eigh coefficient b (s per 10⁹ n³), e.g. from a "
                         "separate timing of torch.linalg.eigh")
    args = ap.parse_args(argv)

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        rows, machine = saved["rows"], saved["machine"]
    else:
        machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
        rows = measure(args.ladder, args.k_extra, args.h_extra, args.budget, args.down_max)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    cpu = {m: fit(rows, m, args.fit_min_h) for m in FEATURES}
    if args.eigh_b is not None:  # a sensitivity check: eigh's cost measured some other way
        cpu["swudi"] = Fit(cpu["swudi"].a, args.eigh_b * 1e-9)

    print(f"Per-matrix timings on {machine}, float32, dense task vectors "
          f"(median of up to 3 after a warm-up), and the fit's prediction:\n")
    print("| h | aspect | m × n | K | swudi s | fit | svc s | fit |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    errors = []
    for r in rows:
        fs = cpu["swudi"](swudi_features(r["m"], r["n"], r["k"]))
        fc = cpu["svc"](svc_features(r["m"], r["n"], r["k"]))
        if r["h"] >= args.fit_min_h:
            errors += [(abs(f / t - 1), t) for f, t in ((fs, r["swudi"]), (fc, r["svc"]))]
        print(f"| {r['h']} | {r['aspect']} | {r['m']}×{r['n']} | {r['k']} | {r['swudi']:.3f} | "
              f"{fs:.3f} | {r['svc']:.3f} | {fc:.3f} |")
    print(f"\nRelative error of the fit over the cells with h ≥ {args.fit_min_h}: median "
          f"{statistics.median(e for e, _ in errors):.0%}, largest among cells of 1 s or more "
          f"{max(e for e, t in errors if t >= 1):.0%}. Exponent of t in h "
          "(K = 8, every h measured):")
    for method in FEATURES:
        exps = {a: exponent(rows, method, a) for a in ASPECTS}
        print(f"- {method}: " + ", ".join(f"{a} {e:.2f}" for a, e in exps.items() if e))
    print("\nFitted coefficients (t = a·G + b·E)"
          + (f"; swudi's b set to {args.eigh_b} by --eigh-b" if args.eigh_b is not None else "")
          + ":\n")
    print("| method | G (GEMM flops) | E | a: s per GFLOP (GFLOP/s) | b: s per 10⁹ E |")
    print("|---|---|---|---:|---:|")
    print(f"| swudi | K·(4mn² if m ≥ n else 2mn² + 4m²n) + 2mn² + 4mnk | n³ (eigh) | "
          f"{cpu['swudi'].a * 1e9:.4f} ({1 / max(cpu['swudi'].a, 1e-30) / 1e9:.1f}) | "
          f"{cpu['swudi'].b * 1e9:.4f} |")
    print(f"| svc | 2(K + 1)·M·r² | M·r² (thin SVD) | {cpu['svc'].a * 1e9:.4f} "
          f"({1 / max(cpu['svc'].a, 1e-30) / 1e9:.1f}) | {cpu['svc'].b * 1e9:.4f} |")

    shape = llama_shape_for(100_000_000)
    h, i = shape.hidden, shape.intermediate
    check = shape.layers * sum(
        cpu["swudi"](swudi_features(m, n, 4)) + cpu["svc"](svc_features(m, n, 4))
        for m, n in [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)])
    print(f"\nCheck: the 100M synthetic model of benchmarks/ray_backend.py ({shape.layers} layers "
          f"of 4 × {h}² + 2 × {i}×{h} + {h}×{i}, K = 4): {check:.1f} s of SWUDI + SVC predicted "
          "(compare the measured local-w1 wall there, which adds I/O and the fallbacks).")

    k = args.experts
    ratios = anchor_ratio(cpu, args.k_anchor)
    if args.gpu_json:
        gpu = gpu_fits(args.gpu_json, cpu, k)
        gpu_note = f"GPU: fitted from {args.gpu_json}"
        predicted = {n: r * ANCHORS[n][0] for n, r in anchor_ratio(gpu, args.k_anchor).items()}
        print(f"\nGPU coefficients: swudi a = {gpu['swudi'].a * 1e9:.5f} s per GFLOP, b = "
              f"{gpu['swudi'].b * 1e9:.5f} s per 10⁹ n³; svc a = {gpu['svc'].a * 1e9:.5f}, b = "
              f"{gpu['svc'].b * 1e9:.5f}. Their SWUDI alone (K = {args.k_anchor}) on the anchors: "
              + ", ".join(f"{n} {v:.0f} s (paper {ANCHORS[n][0]} s)"
                          for n, v in predicted.items()))
    else:
        r_gpu = min(ratios.values())
        gpu = {m: Fit(f.a / r_gpu, f.b / r_gpu) for m, f in cpu.items()}
        gpu_note = (f"GPU: ASSUMED R = {r_gpu:.0f}× this CPU (the smaller anchor ratio above), "
                    "not measured")

    def per_matrix(fits: dict[str, Fit]) -> Callable[[tuple[int, int]], float]:
        return lambda s: fits["swudi"](swudi_features(*s, k)) + fits["svc"](
            svc_features(*s, k))

    print(f"\nAnchor ratios (predicted CPU seconds of SWUDI alone, K = {args.k_anchor} assumed, "
          "over the paper's GPU seconds): "
          + ", ".join(f"{n} {v:.0f}×" for n, v in ratios.items()))
    print(f"\nLlama-70B, one layer at K = {k} (this CPU; {gpu_note}):\n")
    print("| matrix | m × n | swudi s | svc s | GPU s |")
    print("|---|---|---:|---:|---:|")
    sums = [0.0, 0.0, 0.0]
    for name, (m, n) in LAYER_70B:
        s_sw, s_svc = cpu["swudi"](swudi_features(m, n, k)), cpu["svc"](svc_features(m, n, k))
        g = per_matrix(gpu)((m, n))
        sums = [sums[0] + s_sw, sums[1] + s_svc, sums[2] + g]
        print(f"| {name} | {m}×{n} | {s_sw:.0f} | {s_svc:.0f} | {g:.1f} |")
    print(f"| one layer | | {sums[0]:.0f} | {sums[1]:.0f} | {sums[2]:.1f} |")
    print(f"| {LAYERS} layers | | {LAYERS * sums[0] / 3600:.1f} h | {LAYERS * sums[1] / 3600:.1f} h "
          f"| {LAYERS * sums[2] / 60:.1f} min |")

    print(f"\nPredicted wall of SWUDI + SVC, Llama-70B, K = {k}, inputs and output on a shared "
          f"FS at {args.node_gbs:g} GB/s per node ({args.itemsize}-byte parameters: "
          f"(K + 1) reads + 1 write), {args.task_overhead_s:g} s per task, "
          f"{args.fixed_overhead_s:g} s fixed:\n")
    print("| nodes | tasks | GPU nodes: wall | compute | I/O | CPU nodes (this machine): wall |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.nodes:
        tasks = len(PlannedBackend(n_slots=n).groups(
            cast(list[PlanEntry], llama70b_entries())))
        g_wall, g_c, g_io = predict(per_matrix(gpu), n, k, args.node_gbs, args.itemsize,
                                    args.task_overhead_s, args.fixed_overhead_s)
        c_wall, _, _ = predict(per_matrix(cpu), n, k, args.node_gbs, args.itemsize,
                               args.task_overhead_s, args.fixed_overhead_s)
        print(f"| {n} | {tasks} | {g_wall / 3600:.2f} h | {g_c / 3600:.2f} h (sum) | "
              f"{g_io / 3600:.2f} h (sum) | {c_wall / 86400:.1f} days |")


if __name__ == "__main__":
    main()
