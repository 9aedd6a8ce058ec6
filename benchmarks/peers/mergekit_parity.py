"""specmerge against mergekit 0.1.5 on mergekit's own recipes: same output, or a clear refusal.

It installs mergekit 0.1.5 into a throw-away virtualenv of its own (never into specmerge's), with
the torch that specmerge runs so that pip pulls no CUDA wheels. It builds tiny float32 Llama
models with transformers (a base and 3 experts), then runs every case through both tools:
``mergekit-yaml`` and ``specmerge merge`` on the very same YAML file. Per case it reports the
largest relative difference over tensors, max_t ‖a_t − b_t‖ / ‖b_t‖, or specmerge's refusal.

Cases: the six task-vector methods specmerge reads (linear, task_arithmetic, ties, dare_ties,
dare_linear, breadcrumbs), with per-model weights and densities, and the recipes of mergekit's
``examples/`` directory that describe a base plus experts, rewritten onto the tiny models (their
structure kept: methods, per-model parameters, gradients, dtype).

    python benchmarks/peers/mergekit_parity.py [--venv DIR] [--out docs/results/mergekit_parity.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
MERGEKIT = "mergekit==0.1.5"
VENV_DEFAULT = Path(tempfile.gettempdir()) / "specmerge-mergekit-venv"
WD = [(1.0, 0.5), (0.5, 0.7), (0.3, 0.9)]  # (weight, density) of experts 1..3


def _experts(params: bool = True, keys: tuple[str, ...] = ("weight", "density")) -> list:
    out = []
    for i, (w, d) in enumerate(WD):
        p = {k: v for k, v in (("weight", w), ("density", d)) if k in keys}
        out.append({"model": f"EXPERT_{i + 1}", **({"parameters": p} if params else {})})
    return out


CASES: dict[str, dict[str, Any]] = {
    "linear": {"models": [{"model": "BASE", "parameters": {"weight": 0.4}},
                          *_experts(keys=("weight",))], "merge_method": "linear"},
    "task_arithmetic": {"models": _experts(keys=("weight",)), "merge_method": "task_arithmetic",
                        "base_model": "BASE", "parameters": {"lambda": 0.8}},
    "ties": {"models": [{"model": "BASE"}, *_experts()], "merge_method": "ties",
             "base_model": "BASE", "parameters": {"normalize": True, "int8_mask": True}},
    "dare_ties": {"models": _experts(), "merge_method": "dare_ties", "base_model": "BASE"},
    "dare_linear": {"models": _experts(), "merge_method": "dare_linear", "base_model": "BASE"},
    "breadcrumbs": {"models": _experts(), "merge_method": "breadcrumbs", "base_model": "BASE"},
    # mergekit's examples/, on the tiny models
    "examples/linear.yml (3 models, weights 1.0/0.3/0.5, float16)": {
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in
                   (("EXPERT_1", 1.0), ("EXPERT_2", 0.3), ("EXPERT_3", 0.5))],
        "merge_method": "linear", "dtype": "float16"},
    "examples/ties.yml (ranked_ties, density and weight gradients)": {
        "models": [{"model": "EXPERT_1", "parameters": {"density": [0.8, 0.3, 0.1],
                                                        "weight": [1.0, 0.8, 0.5]}}],
        "merge_method": "ranked_ties", "base_model": "BASE", "dtype": "bfloat16"},
    "examples/gradient-slerp.yml (slerp over slices)": {
        "slices": [{"sources": [{"model": "BASE", "layer_range": [0, 2]},
                                {"model": "EXPERT_1", "layer_range": [0, 2]}]}],
        "merge_method": "slerp", "base_model": "BASE",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]},
        "dtype": "float16"},
    "README's TIES example (per-model density/weight, normalize, int8_mask)": {
        "models": [{"model": "BASE"},
                   {"model": "EXPERT_1", "parameters": {"density": 0.5, "weight": 0.5}},
                   {"model": "EXPERT_2", "parameters": {"density": 0.5, "weight": 0.3}}],
        "merge_method": "ties", "base_model": "BASE",
        "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float16"},
}
CASES["README's TIES example, dtype float32"] = {
    **CASES["README's TIES example (per-model density/weight, normalize, int8_mask)"],
    "dtype": "float32"}
NOTES = {
    "dare_ties": "DARE's masks are random: mergekit draws them from torch's global RNG, specmerge "
                 "from per-parameter seeds, so outputs differ by design (same distribution).",
    "dare_linear": "as dare_ties: random masks from different generators.",
    "examples/linear.yml (3 models, weights 1.0/0.3/0.5, float16)":
        "mergekit computes in the recipe's dtype (float16); specmerge computes in float32 and "
        "casts the result: the difference is float16 rounding.",
    "README's TIES example (per-model density/weight, normalize, int8_mask)":
        "float16 compute in mergekit: rounding changes which entries TIES keeps and the elected "
        "signs; in float32 (next row) the two agree exactly.",
}


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ensure_mergekit(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if (venv / "bin" / "mergekit-yaml").exists():
        return venv / "bin" / "mergekit-yaml"
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(venv)], check=True)
    # the very torch specmerge runs, local label included (2.13.0+cpu: the CPU wheel, found
    # through pip's find-links), so that mergekit's requirements pull no CUDA wheels
    pin = f"torch=={torch.__version__}"
    run([str(py), "-m", "pip", "install", "-q", pin], check=True)
    (venv / "constraints.txt").write_text(pin + "\n")
    res = run([str(py), "-m", "pip", "install", "-q", MERGEKIT, "-c",
               str(venv / "constraints.txt")])
    if res.returncode:
        sys.exit(f"pip install {MERGEKIT} failed:\n{res.stderr[-2000:]}")
    return venv / "bin" / "mergekit-yaml"


def build_models(root: Path) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    base_sd = {n: p.clone() for n, p in model.state_dict().items()}
    paths = {}
    for i, name in enumerate(["BASE", "EXPERT_1", "EXPERT_2", "EXPERT_3"]):
        if i:
            with torch.no_grad():
                model.load_state_dict(base_sd)
                for p in model.parameters():
                    p.add_(0.02 * torch.randn_like(p))
        paths[name] = root / name.lower()
        model.save_pretrained(paths[name])
    return paths


def substitute(obj: Any, paths: dict[str, Any]) -> Any:
    if isinstance(obj, dict):
        return {k: substitute(v, paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, paths) for v in obj]
    return str(paths[obj]) if isinstance(obj, str) and obj in paths else obj


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    common = sorted(set(a) & set(b))
    worst, name = 0.0, ""
    for n in common:
        x, y = a[n].double(), b[n].double()
        err = float((x - y).norm() / y.norm().clamp_min(1e-30))
        if err > worst:
            worst, name = err, n
    missing = sorted(set(a) ^ set(b))
    return worst, name + (f" (key sets differ: {missing[:3]})" if missing else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=VENV_DEFAULT)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "mergekit_parity.md")
    args = ap.parse_args()
    mergekit_yaml = ensure_mergekit(args.venv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        paths = build_models(root / "models")
        for case, recipe in CASES.items():
            cfg = root / "recipe.yml"
            cfg.write_text(yaml.safe_dump(substitute(recipe, paths), sort_keys=False))
            mk_out, sm_out = root / "mk", root / "sm"
            shutil.rmtree(mk_out, ignore_errors=True)
            shutil.rmtree(sm_out, ignore_errors=True)
            mk = run([str(mergekit_yaml), str(cfg), str(mk_out), "--allow-crimes",
                      "--no-copy-tokenizer", "--random-seed", "0"])
            sm = run([sys.executable, "-m", "specmerge.cli", "merge", "--quiet", str(cfg),
                      str(sm_out)], cwd=ROOT)
            sm_err = next((ln for ln in sm.stderr.splitlines() if ln.startswith("error:")),
                          sm.stderr.strip()[-200:])
            if sm.returncode:
                rows.append((case, "ran" if mk.returncode == 0 else "failed", "refused",
                             "–", sm_err.removeprefix("error: ")))
                continue
            if mk.returncode:
                rows.append((case, "failed: " + mk.stderr.strip().splitlines()[-1][:120],
                             "ran", "–", ""))
                continue
            worst, where = compare(tensors(sm_out), tensors(mk_out))
            rows.append((case, "ran", "ran", f"{worst:.2e}",
                         NOTES.get(case, "") + (f" worst tensor: {where}" if worst > 1e-6
                                                else "")))
            print(f"{case}: {worst:.2e}", file=sys.stderr)
    lines = ["# specmerge vs mergekit 0.1.5: parity on mergekit recipes", "",
             f"Produced by `python benchmarks/peers/mergekit_parity.py` ({MERGEKIT} in its own "
             f"virtualenv, torch {torch.__version__}, CPU). Tiny float32 Llama models "
             "(hidden 32, 2 layers, vocab 96): a base and 3 experts, θ_i = θ0 + 0.02·N(0, 1). "
             "Both tools read the same YAML file. The difference is max over tensors of "
             "‖specmerge − mergekit‖ / ‖mergekit‖; the target is ≤ 1e-6.", "",
             "| case | mergekit | specmerge | max rel. difference | note |",
             "|---|---|---|---:|---|"]
    lines += [f"| {c} | {a} | {b} | {x} | {n} |" for c, a, b, x, n in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"written": str(args.out)}), file=sys.stderr)


if __name__ == "__main__":
    main()
