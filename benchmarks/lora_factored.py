"""LoRA experts: the factored path against the dense one, per matrix, and a whole 7B-shaped merge.

Part 1, per matrix: K random LoRA task vectors τ_i = s B_i A_i (r = 16, s = α/r = 2) on the
Llama-7B shapes 4096×4096 (q, k, v, o), 11008×4096 (gate, up) and 4096×11008 (down), K = 4 and
8. For SVC after task arithmetic (λ = 0.3), TSV-M, Iso-C, SWUDI and SWUDI-A it times the method
on the factored τ_i (``LowRank``, what the engine passes for adapters) and, where ``--dense``
asks, on the same τ_i densified, and prints the ratio and the max relative difference
‖factored − dense‖_F / ‖dense‖_F. Factored timings are the median of ``--rounds`` rounds; a
dense SVD of 11008×4096 takes minutes on a small CPU, so the dense path runs once per cell and
its rounds are interleaved with the factored ones.

Part 2, the whole model: a 7B-shaped base (Llama-2-7B's config; its safetensors file is sparse:
the header is real, the data area a hole, since a merge to a PEFT output reads no base weight)
and 8 adapters with r = 16 on q, k, v, o, gate, up and down of its 32 layers, merged with
SWUDI + SVC into a PEFT adapter through ``specmerge.merge`` (end to end: reading adapters,
planning, maths, writing). Prints the wall time and the peak RSS.

    python benchmarks/lora_factored.py [--rounds 5] [--dense 11008x4096:4] [--threads N]
                                       [--skip-model] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from gpu_timings import LLAMA7B_MODULES as MODULES
from gpu_timings import LLAMA7B_SHAPES
from toolkit import median, timed

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see README, Performance

import torch
from safetensors.torch import save_file

import specmerge
from specmerge.lowrank import LowRank, TaskVector, dense
from specmerge.methods.calibration import svc
from specmerge.methods.elementwise import task_arithmetic
from specmerge.methods.interference import swudi, swudi_a
from specmerge.methods.subspace import iso_c, tsv_m

RANK, ALPHA = 16, 32
SHAPES = {label.replace("×", "x"): shape for label, shape in LLAMA7B_SHAPES.items()}
METHODS: dict[str, Callable[[Sequence[TaskVector]], TaskVector]] = {
    "task_arithmetic+svc": lambda taus: svc(task_arithmetic(taus, scaling=0.3), taus),
    "tsv_m": tsv_m,
    "iso_c": iso_c,
    "swudi": swudi,
    "swudi_a": swudi_a,
}
LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def adapters(shape: tuple[int, int], k: int, seed: int) -> list[LowRank]:
    """K LoRA task vectors of PEFT's scale α/r, with B and A of LoRA-like magnitudes."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    return [LowRank(torch.randn(m, RANK, generator=g) * 0.01,
                    torch.randn(RANK, n, generator=g) / n**0.5, ALPHA / RANK) for _ in range(k)]


def per_matrix(rounds: int, dense_cells: set[tuple[str, int]]) -> list[dict]:
    rows = []
    for shape_name, shape in SHAPES.items():
        for k in (4, 8):
            taus = adapters(shape, k, seed=k)
            full = [t.dense() for t in taus] if (shape_name, k) in dense_cells else None
            for name, fn in METHODS.items():
                fn(taus)  # warm-up
                times, dense_s, diff = [], None, None
                for i in range(rounds):
                    t, out = timed(lambda: fn(taus))  # noqa: B023
                    times.append(t)
                    if full is not None and i == rounds // 2:  # interleaved: once, mid-way
                        dense_s, want = timed(lambda: fn(full))  # noqa: B023
                        got = dense(out).double()
                        diff = float((got - dense(want).double()).norm()
                                     / dense(want).double().norm())
                row = {"shape": shape_name, "K": k, "method": name,
                       "factored_s": median(times), "dense_s": dense_s,
                       "max_rel_diff": diff}
                rows.append(row)
                print(_row(row), flush=True)
    return rows


def _row(r: dict) -> str:
    ratio = f"{r['dense_s'] / r['factored_s']:,.0f}×" if r["dense_s"] else "–"
    dense_s = f"{r['dense_s']:.1f}" if r["dense_s"] else "–"
    diff = f"{r['max_rel_diff']:.1e}" if r["max_rel_diff"] is not None else "–"
    return (f"| {r['shape']} | {r['K']} | {r['method']} | {r['factored_s'] * 1e3:.1f} | "
            f"{dense_s} | {ratio} | {diff} |")


def sparse_base(root: Path) -> Path:
    """A Llama-2-7B-shaped base: config.json and a bf16 safetensors file whose data area is a
    hole (apparent size 13.5 GB, nothing on disk): only its header is ever read here."""
    d = root / "base"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA_7B))
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (32000, 4096))]
    for i in range(32):
        p = f"model.layers.{i}."
        tensors += [(p + m + ".weight", s) for m, s in MODULES.items()]
        tensors += [(p + "input_layernorm.weight", (4096,)),
                    (p + "post_attention_layernorm.weight", (4096,))]
    tensors += [("model.norm.weight", (4096,)), ("lm_head.weight", (32000, 4096))]
    header, offset = {}, 0
    for name, shape in tensors:
        size = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset,
                                                                                offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return d


def write_adapter(root: Path, index: int) -> Path:
    d = root / f"adapter{index}"
    d.mkdir()
    g = torch.Generator().manual_seed(100 + index)
    tensors = {}
    for i in range(32):
        for m, (rows, cols) in MODULES.items():
            key = f"base_model.model.model.layers.{i}.{m}"
            tensors[key + ".lora_A.weight"] = torch.randn(RANK, cols, generator=g) / cols**0.5
            tensors[key + ".lora_B.weight"] = torch.randn(rows, RANK, generator=g) * 0.01
    save_file(tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": [
            m.rsplit(".", 1)[1] for m in MODULES], "base_model_name_or_path": str(root / "base"),
        "use_rslora": False, "fan_in_fan_out": False}))
    return d


def whole_model(workdir: Path, k: int = 8) -> dict:
    root = Path(tempfile.mkdtemp(dir=workdir))
    base = sparse_base(root)
    ads = [write_adapter(root, i) for i in range(k)]
    recipe = {"base_model": str(base), "models": [str(a) for a in ads], "merge_method": "swudi",
              "calibrate": {"method": "svc"}, "output": {"format": "peft"}}
    seconds, res = timed(lambda: specmerge.merge(recipe, root / "merged", progress=False))
    size = (res.out_dir / "adapter_model.safetensors").stat().st_size
    return {"adapters": k, "weights": res.num_tensors, "seconds": seconds,
            "peak_rss_mb": res.peak_rss_mb, "output_mb": size / 2**20,
            "base_on_disk_mb": os.stat(base / "model.safetensors").st_blocks * 512 / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dense", default="11008x4096:4",
                    help="comma-separated SHAPE:K cells that also run the dense path "
                         "(e.g. 11008x4096:4,4096x4096:8), or 'none'")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-model", action="store_true", help="per-matrix part only")
    ap.add_argument("--skip-matrices", action="store_true", help="whole-model part only")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the 8 adapters (about 1.3 GB) are written (default: a temp dir)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cells = set()
    if args.dense != "none":
        for cell in args.dense.split(","):
            shape, k = cell.split(":")
            if shape not in SHAPES:
                ap.error(f"--dense: unknown shape {shape!r}; choose from {list(SHAPES)}")
            cells.add((shape, int(k)))
    print(f"# LoRA factored vs dense: torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {platform.processor() or platform.machine()}, r = {RANK}, float32\n")
    if not args.skip_matrices:
        print("| shape | K | method | factored ms (median) | dense s | speed-up | max rel diff |")
        print("|---|---:|---|---:|---:|---:|---:|")
        per_matrix(args.rounds, cells)
    if not args.skip_model:
        workdir = args.workdir or Path(tempfile.gettempdir())
        r = whole_model(workdir)
        print(f"\nWhole 7B-shaped model, {r['adapters']} adapters, SWUDI + SVC → PEFT output "
              f"({r['weights']} weights): {r['seconds']:.1f} s, peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, output {r['output_mb']:.0f} MB, base on disk "
              f"{r['base_on_disk_mb']:.1f} MB (sparse)")


if __name__ == "__main__":
    main()
