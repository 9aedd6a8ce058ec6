"""The streaming engine: bit-exact against in-memory maths, sharding, determinism, scope."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import accepts_experts, make_state_dicts, recipe_for, tree_hash, write_hf_dir
from safetensors.torch import load_file

import specmerge
from specmerge.backends import LocalBackend
from specmerge.engine import run_statistics
from specmerge.io.checkpoint import Checkpoint
from specmerge.methods.elementwise import trim_rank
from specmerge.methods.registry import all_methods
from specmerge.plan import build_plan, is_matrix_param
from specmerge.recipe import Scope


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# every merge method that takes the toy models' 3 experts (slerp and nearswap take one: their
# end-to-end tests are in test_mergekit_methods.py)
MERGE_METHODS = [m.name for m in all_methods()
                 if not m.is_calibration and accepts_experts(m.name, 3)]


def test_task_arithmetic_matches_hand_formula(toy_models, tmp_path) -> None:
    res = specmerge.merge(recipe_for(toy_models, parameters={"scaling": 0.5}), tmp_path / "out",
                          progress=False)
    out = load_dir(res.out_dir)
    base, experts = toy_models["base_sd"], toy_models["expert_sds"]
    for name, theta0 in base.items():
        ref = theta0 + 0.5 * sum(e[name] - theta0 for e in experts)
        torch.testing.assert_close(out[name], ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", MERGE_METHODS)
def test_engine_equals_in_memory_bit_for_bit(toy_models, tmp_path, method) -> None:
    params = {"iterations": 5} if method == "wudi" else {}
    recipe = recipe_for(toy_models, method, parameters=params)
    res = specmerge.merge(recipe, tmp_path / "out", progress=False)
    ref = specmerge.merge_state_dicts(recipe, toy_models["base_sd"], toy_models["expert_sds"])
    out = load_dir(res.out_dir)
    assert out.keys() == ref.keys()
    for name in ref:
        assert torch.equal(out[name], ref[name]), name


@pytest.mark.parametrize("method", MERGE_METHODS)
def test_workers_do_not_change_bytes(toy_models, tmp_path, method) -> None:
    params = {"iterations": 5} if method == "wudi" else {}
    recipe = recipe_for(toy_models, method, parameters=params, calibrate={"method": "svc"})
    a = specmerge.merge(recipe, tmp_path / "w1", workers=1, progress=False)
    b = specmerge.merge(recipe, tmp_path / "w2", workers=2, progress=False)
    c = specmerge.merge(recipe, tmp_path / "w1again", workers=1, progress=False)
    files = ("model.safetensors", "config.json", "README.md", "specmerge_recipe.yaml")
    for f in files:
        assert (a.out_dir / f).read_bytes() == (b.out_dir / f).read_bytes(), f
        assert (a.out_dir / f).read_bytes() == (c.out_dir / f).read_bytes(), f


@pytest.mark.parametrize("method", MERGE_METHODS)
def test_svc_after_every_method_changes_only_matrix_params(toy_models, tmp_path, method) -> None:
    params = {"iterations": 5} if method == "wudi" else {}
    plain = specmerge.merge(recipe_for(toy_models, method, parameters=params),
                            tmp_path / "plain", progress=False)
    cal = specmerge.merge(recipe_for(toy_models, method, parameters=params,
                                     calibrate={"method": "svc"}), tmp_path / "cal",
                          progress=False)
    p, c = load_dir(plain.out_dir), load_dir(cal.out_dir)
    changed = {n for n in p if not torch.equal(p[n], c[n])}
    matrices = {n for n, t in p.items() if is_matrix_param(n, t.shape, t.dtype, Scope())}
    assert matrices == {"model.layers.0.self_attn.q_proj.weight",
                        "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"}
    assert changed <= matrices
    assert changed, "SVC changed nothing"
    for n in p:
        assert torch.isfinite(c[n]).all()


def test_matrix_methods_use_scope_fallback(toy_models, tmp_path) -> None:
    base, experts = toy_models["base_sd"], toy_models["expert_sds"]
    for fallback, expect in [
        ("average", lambda n: base[n] + sum(e[n] - base[n] for e in experts) / 3),
        ("base", lambda n: base[n]),
        ("task_arithmetic", lambda n: base[n] + 0.3 * sum(e[n] - base[n] for e in experts)),
    ]:
        res = specmerge.merge(recipe_for(toy_models, "iso_c", scope={"fallback": fallback}),
                              tmp_path / f"out_{fallback}", progress=False)
        out = load_dir(res.out_dir)
        for n in ("model.embed_tokens.weight", "lm_head.weight",
                  "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.up_proj.bias"):
            torch.testing.assert_close(out[n], expect(n), rtol=1e-6, atol=1e-6)


def test_scope_patterns() -> None:
    s = Scope(exclude=["embed", "re:^mlp\\."])
    f32 = torch.float32
    assert is_matrix_param("layers.0.q.weight", (4, 4), f32, s)
    assert not is_matrix_param("embed_tokens.weight", (4, 4), f32, s)
    assert not is_matrix_param("mlp.up.weight", (4, 4), f32, s)
    assert is_matrix_param("x.mlp.up.weight", (4, 4), f32, s)
    # heads and embeddings are not matrix parameters by role, whatever the scope
    assert not is_matrix_param("x.lm_head.weight", (4, 4), f32, Scope(exclude=[]))
    assert not is_matrix_param("transformer.wte.weight", (4, 4), f32, Scope(exclude=[]))
    assert not is_matrix_param("layers.0.bias", (4,), f32, s)
    assert not is_matrix_param("conv.weight", (4, 4, 3, 3), f32, s)
    assert not is_matrix_param("idx", (4, 4), torch.int64, s)


def test_sharding_and_index(toy_models, tmp_path) -> None:
    res = specmerge.merge(recipe_for(toy_models), tmp_path / "out", shard_size=600,
                          progress=False)
    shards = sorted(res.out_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    assert not (res.out_dir / "model.safetensors").exists()
    index = json.loads((res.out_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(toy_models["base_sd"])
    for name, shard in index["weight_map"].items():
        assert name in load_file(str(res.out_dir / shard))
    total = sum(t.numel() * t.element_size() for t in toy_models["base_sd"].values())
    assert index["metadata"]["total_size"] == total
    # sharded output reads back identically, through our reader and through safetensors
    single = specmerge.merge(recipe_for(toy_models), tmp_path / "single", progress=False)
    ref = load_file(str(single.out_dir / "model.safetensors"))
    ck = Checkpoint(res.out_dir)
    for n, t in ref.items():
        assert torch.equal(ck.read(n), t)


def test_sharded_output_loads_with_transformers(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    paths = []
    for i in range(3):
        model = transformers.BertModel(cfg)
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(tmp_path / f"m{i}")
        paths.append(tmp_path / f"m{i}")
    recipe = {"base_model": str(paths[0]), "models": [str(p) for p in paths[1:]],
              "merge_method": "ties", "calibrate": {"method": "svc"}}
    res = specmerge.merge(recipe, tmp_path / "out", shard_size="20KB", progress=False)
    assert len(list(res.out_dir.glob("model-*.safetensors"))) > 1
    merged = transformers.BertModel.from_pretrained(res.out_dir)
    ref = specmerge.merge_state_dicts(recipe, load_dir(paths[0]),
                                      [load_dir(p) for p in paths[1:]])
    state = merged.state_dict()
    for name, t in ref.items():
        assert torch.equal(state[name], t), name
    assert json.loads((res.out_dir / "config.json").read_text())["model_type"] == "bert"


def test_side_files_recipe_and_card(toy_models, tmp_path) -> None:
    recipe = recipe_for(toy_models, calibrate={"method": "svc"}, out_dtype="bfloat16")
    res = specmerge.merge(recipe, tmp_path / "out", progress=False)
    files = {p.name for p in res.out_dir.iterdir()}
    assert files == {"model.safetensors", "config.json", "tokenizer_config.json",
                     "specmerge_recipe.yaml", "README.md"}
    cfg = json.loads((res.out_dir / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_dir(res.out_dir).values())
    resolved = yaml.safe_load((res.out_dir / "specmerge_recipe.yaml").read_text())
    assert resolved["parameters"] == {"scaling": 0.3}
    assert resolved["calibrate"] == {"method": "svc", "alpha": None, "space": "left",
                                     "target": None}
    card = (res.out_dir / "README.md").read_text()
    assert "task_arithmetic" in card and "svc" in card and "2212.04089" in card
    # the resolved recipe merges to the same bytes
    again = specmerge.merge(res.out_dir / "specmerge_recipe.yaml", tmp_path / "again",
                            progress=False)
    assert (again.out_dir / "model.safetensors").read_bytes() == \
        (res.out_dir / "model.safetensors").read_bytes()


def test_the_resolved_recipe_re_runs_to_the_same_files(toy_models, monkeypatch) -> None:
    """Every file of OUT, model card and resolved recipe included, is the same whether the
    recipe names its inputs relative to its own directory or absolutely, and whatever the
    current directory: re-running OUT/specmerge_recipe.yaml reproduces OUT byte for byte."""
    root = toy_models["root"]
    here = root / "recipes" / "deep"
    here.mkdir(parents=True)
    rel = {"base_model": "../../base", "models": [f"../../{e.name}" for e in toy_models["experts"]],
           "merge_method": "task_arithmetic"}
    (here / "r.yaml").write_text(yaml.safe_dump(rel))
    monkeypatch.chdir(here)
    first = specmerge.merge(here / "r.yaml", root / "a", progress=False).out_dir
    monkeypatch.chdir(root)  # another current directory, and the recipe in OUT
    again = specmerge.merge(first / "specmerge_recipe.yaml", root / "x" / "b",
                            progress=False).out_dir
    given = specmerge.merge(recipe_for(toy_models), root / "c", progress=False).out_dir
    files = sorted(p.name for p in first.iterdir())
    assert "README.md" in files and "specmerge_recipe.yaml" in files
    card = (first / "README.md").read_text()
    assert "- base: `base`" in card and "- expert 2: `e1`" in card and str(root) not in card
    for out in (again, given):
        assert sorted(p.name for p in out.iterdir()) == files
        for name in files:
            assert (out / name).read_bytes() == (first / name).read_bytes(), (out, name)


def test_bf16_inputs_keep_dtype_and_upcast(tmp_path) -> None:
    base, experts = make_state_dicts(2, dtype=torch.bfloat16)
    models = {"base": write_hf_dir(tmp_path / "b", base),
              "experts": [write_hf_dir(tmp_path / f"e{i}", e) for i, e in enumerate(experts)]}
    res = specmerge.merge(recipe_for(models, "tsv_m"), tmp_path / "out", progress=False)
    out = load_dir(res.out_dir)
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    ref = specmerge.merge_state_dicts(recipe_for(models, "tsv_m"), base, experts)
    assert all(torch.equal(out[n], ref[n]) for n in ref)


def test_float64_compute_dtype(toy_models, tmp_path) -> None:
    r32 = specmerge.merge(recipe_for(toy_models, "iso_c"), tmp_path / "a", progress=False)
    r64 = specmerge.merge(recipe_for(toy_models, "iso_c"), tmp_path / "b", dtype="float64",
                          progress=False)
    a, b = load_dir(r32.out_dir), load_dir(r64.out_dir)
    assert all(t.dtype == torch.float32 for t in b.values())
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-5)


def test_ties_global_thresholds_are_exact(toy_models, tmp_path) -> None:
    from specmerge.recipe import load_recipe
    from specmerge.sources import CheckpointSource

    rec = load_recipe(recipe_for(toy_models, "ties", parameters={"trim_scope": "global"}))
    source = CheckpointSource(toy_models["base"], toy_models["experts"])
    plan = build_plan(rec, source.index())
    got = run_statistics(plan, source, LocalBackend(1), "cpu", progress=False)["thresholds"]
    assert got == run_statistics(plan, source, LocalBackend(2), "cpu", False)["thresholds"]
    b = toy_models["base_sd"]
    for i, e in enumerate(toy_models["expert_sds"]):
        allabs = torch.cat([(e[n] - b[n]).reshape(-1).abs() for n in b])
        k = trim_rank(allabs.numel(), 0.2)
        assert got[i] == allabs.kthvalue(k).values.item()
    # and the merge with them differs from per-tensor trimming, deterministically
    g1 = specmerge.merge(rec, tmp_path / "g1", progress=False)
    g2 = specmerge.merge(rec, tmp_path / "g2", workers=2, progress=False)
    t = specmerge.merge(recipe_for(toy_models, "ties"), tmp_path / "t", progress=False)
    assert tree_hash(g1.out_dir / "model.safetensors") == \
        tree_hash(g2.out_dir / "model.safetensors")
    assert (g1.out_dir / "model.safetensors").read_bytes() != \
        (t.out_dir / "model.safetensors").read_bytes()


def test_dare_seed_changes_output_and_recipe_seed_is_recorded(toy_models, tmp_path) -> None:
    a = specmerge.merge(recipe_for(toy_models, "dare"), tmp_path / "a", progress=False)
    b = specmerge.merge(recipe_for(toy_models, "dare"), tmp_path / "b", seed=1, progress=False)
    assert (a.out_dir / "model.safetensors").read_bytes() != \
        (b.out_dir / "model.safetensors").read_bytes()
    assert yaml.safe_load((b.out_dir / "specmerge_recipe.yaml").read_text())["seed"] == 1


def test_bin_and_pt_inputs(tmp_path) -> None:
    base, experts = make_state_dicts(2)
    (tmp_path / "b").mkdir()
    torch.save(base, tmp_path / "b" / "pytorch_model.bin")
    torch.save({"state_dict": experts[0]}, tmp_path / "e0.pt")
    write_hf_dir(tmp_path / "e1", experts[1])
    recipe = {"base_model": str(tmp_path / "b"),
              "models": [str(tmp_path / "e0.pt"), str(tmp_path / "e1")],
              "merge_method": "task_arithmetic"}
    out = load_dir(specmerge.merge(recipe, tmp_path / "out", progress=False).out_dir)
    ref = specmerge.merge_state_dicts(recipe, base, experts)
    assert all(torch.equal(out[n], ref[n]) for n in ref)


def test_scope_matrix_patterns_override_roles() -> None:
    f32 = torch.float32
    s = Scope(matrix=["re:embed_tokens"])
    assert is_matrix_param("model.embed_tokens.weight", (16, 8), f32, s)
    assert not is_matrix_param("model.embed_tokens.weight", (16,), f32, s)  # 2-D only
    assert not is_matrix_param("model.embed_tokens.weight", (16, 8), f32, Scope())
