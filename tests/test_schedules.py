"""Gradients and filtered values (mergekit's per-tensor parameters): the resolution rules by
reference values, and merges whose every tensor equals a scalar merge at its resolved value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_state_dicts, write_hf_dir

import specmerge
from specmerge.schedules import NO_MATCH, layer_positions, resolve

SHAPES = {"model.embed_tokens.weight": (16, 8), "lm_head.weight": (16, 8),
          "model.norm.weight": (8,),
          **{f"model.layers.{i}.self_attn.q_proj.weight": (8, 8) for i in range(4)},
          **{f"model.layers.{i}.mlp.up_proj.weight": (12, 8) for i in range(4)}}


def test_gradients_interpolate_over_the_layers_as_mergekit_does() -> None:
    assert resolve(0.3, "x", 0.7) == 0.3
    assert resolve([0.0, 1.0], "x", 0.5) == 0.5
    assert resolve([1.0, 0.7, 0.1], "x", 0.25) == pytest.approx(0.85)  # between v0 and v1
    assert resolve([1.0, 0.7, 0.1], "x", 0.75) == pytest.approx(0.4)
    assert resolve([1.0, 0.7, 0.1], "x", 1.0) == 0.1
    assert resolve([2.0], "x", 0.4) == 2.0


def test_filters_take_the_first_entry_whose_filter_is_in_the_name() -> None:
    value = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.5},
             {"value": 0.1}]
    assert resolve(value, "model.layers.1.self_attn.q_proj.weight", 0.25) == 0.25
    assert resolve(value, "model.layers.1.mlp.up_proj.weight", 0.25) == 0.5
    assert resolve(value, "model.norm.weight", 1.0) == 0.1
    assert resolve([{"filter": "*", "value": 3.0}], "anything", 0.0) == 3.0
    assert resolve([{"filter": "mlp", "value": 1.0}], "model.norm.weight", 0.0) is NO_MATCH


def test_layer_positions() -> None:
    names = list(SHAPES)
    roles = {"model.embed_tokens.weight": "embedding", "lm_head.weight": "head"}
    t = layer_positions(names, roles)
    assert [t[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(4)] == [0, 1 / 3, 2 / 3, 1]
    # mergekit 0.1.5 plans pre- and post-weights alike at t = 0 (plan.py: plan_module)
    assert (t["model.embed_tokens.weight"], t["lm_head.weight"], t["model.norm.weight"]) == (
        0.0, 0.0, 0.0)
    assert layer_positions(["model.layers.0.x.weight"], {})["model.layers.0.x.weight"] == 1.0


@pytest.fixture
def layered(tmp_path: Path) -> dict:
    base, experts = make_state_dicts(k=2, shapes=SHAPES)
    return {"base": write_hf_dir(tmp_path / "base", base),
            "experts": [write_hf_dir(tmp_path / f"e{i}", e) for i, e in enumerate(experts)]}


def _merge(models: dict, out: Path, weights: list, density: object = None,
           scaling: object = 1.0) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    recipe = {"base_model": str(models["base"]), "merge_method": "gta",
              "models": [{"model": str(e), "weight": w,
                          **({"density": density} if density is not None else {})}
                         for e, w in zip(models["experts"], weights, strict=True)],
              "parameters": {"sparsification": "magnitude", "consensus": "sum",
                             "scaling": scaling}}
    specmerge.merge(recipe, out, progress=False)
    return load_file(str(out / "model.safetensors"))


def test_every_tensor_is_the_scalar_merge_at_its_resolved_value(layered, tmp_path) -> None:
    """A gradient weight, a filtered density and a gradient λ: each tensor of the merge equals
    the tensor of a merge with the scalars it resolves to."""
    density = [{"filter": "self_attn", "value": [0.2, 0.8]}, {"value": 0.5}]
    got = _merge(layered, tmp_path / "g", [[0.0, 1.0], 0.5], density, [1.0, 0.4])
    t = {"model.embed_tokens.weight": 0.0, "lm_head.weight": 0.0, "model.norm.weight": 0.0,
         **{f"model.layers.{i}.{m}.weight": i / 3 for i in range(4)
            for m in ("self_attn.q_proj", "mlp.up_proj")}}
    checked = 0
    for name, ti in t.items():
        d = 0.2 + 0.6 * ti if "self_attn" in name else 0.5
        ref = _merge(layered, tmp_path / f"s{checked}", [ti, 0.5], d, 1.0 - 0.6 * ti)
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=name)
        checked += 1
    assert checked == len(SHAPES)
    # and the merge is not the scalar merge at one setting (the schedule did something)
    flat = _merge(layered, tmp_path / "flat", [0.5, 0.5], 0.5, 0.7)
    assert not torch.equal(flat["model.layers.0.self_attn.q_proj.weight"],
                           got["model.layers.0.self_attn.q_proj.weight"])


def test_a_resolved_value_outside_the_constraint_names_the_tensor(layered, tmp_path) -> None:
    with pytest.raises(specmerge.SpecmergeError, match=r"density must be"):
        _merge(layered, tmp_path / "x", [1.0, 1.0], [0.2, 1.5])
    with pytest.raises(specmerge.SpecmergeError, match=r"gradient is a list of numbers"):
        _merge(layered, tmp_path / "x", [[0.1, "a"], 1.0])
    with pytest.raises(specmerge.SpecmergeError, match=r"filter: NAME, value"):
        _merge(layered, tmp_path / "x", [[{"filter": "mlp"}], 1.0])
    assert not (tmp_path / "x").exists()


def test_mergekits_own_ties_example_converts_and_merges(layered, tmp_path) -> None:
    """mergekit's examples/ties.yml (gradients of density and weight, a filtered weight) on
    tiny models: it converts, the schedules are kept, and the merge runs."""
    import yaml

    e0, e1 = (str(e) for e in layered["experts"])
    mk = {"models": [{"model": e0, "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                     {"model": e1, "parameters": {
                         "density": 0.33, "weight": [{"filter": "mlp", "value": 0.5},
                                                     {"value": 0}]}}],
          "merge_method": "ties", "base_model": str(layered["base"]),
          "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float16"}
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(mk))
    rec = specmerge.load_recipe(tmp_path / "mk.yaml")
    assert rec.models[0].density == [1, 0.7, 0.1]
    res = specmerge.merge(tmp_path / "mk.yaml", tmp_path / "out", progress=False)
    again = specmerge.merge(res.out_dir / "specmerge_recipe.yaml", tmp_path / "again",
                            progress=False)
    assert ((res.out_dir / "model.safetensors").read_bytes()
            == (again.out_dir / "model.safetensors").read_bytes())
