"""Shared fixtures: tiny checkpoints written in the test, never downloaded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (16, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (12, 8),
    "model.layers.0.mlp.down_proj.weight": (8, 12),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.0.mlp.up_proj.bias": (12,),
    "lm_head.weight": (16, 8),
}


def accepts_experts(method: str, k: int) -> bool:
    """Whether a recipe of ``method`` at its defaults takes ``k`` experts (slerp and nearswap
    take one; passthrough takes slices, not experts)."""
    from specmerge.recipe import Recipe

    try:  # a recipe of the method at its defaults, with k experts (paths are not read)
        Recipe.model_validate({"base_model": "/nonexistent/base", "merge_method": method,
                               "models": [f"/nonexistent/e{i}" for i in range(k)]})
    except ValueError:
        return False
    return True


def make_state_dicts(k: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32,
                     shapes: dict[str, tuple[int, ...]] | None = None
                     ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or SHAPES
    base = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    experts = [{n: (t + 0.1 * torch.randn(t.shape, generator=gen)) for n, t in base.items()}
               for _ in range(k)]
    base = {n: t.to(dtype) for n, t in base.items()}
    experts = [{n: t.to(dtype) for n, t in e.items()} for e in experts]
    return base, experts


def write_hf_dir(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
    (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.fixture
def toy_models(tmp_path: Path):
    """A base and 3 experts as HF directories, plus their state dicts."""
    base, experts = make_state_dicts()
    bdir = write_hf_dir(tmp_path / "base", base)
    edirs = [write_hf_dir(tmp_path / f"e{i}", e) for i, e in enumerate(experts)]
    return {"base": bdir, "experts": edirs, "base_sd": base, "expert_sds": experts,
            "root": tmp_path}


def recipe_for(models: dict, method: str = "task_arithmetic", **extra) -> dict:
    return {"base_model": str(models["base"]), "models": [str(e) for e in models["experts"]],
            "merge_method": method, **extra}


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()
