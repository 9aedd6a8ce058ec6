"""mergekit recipes load as they are and mean what they mean in mergekit 0.1.5: generalized task
arithmetic (``gta``), checked against its formulas on small cases worked out by hand."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from conftest import tree_hash
from safetensors.torch import load_file
from typer.testing import CliRunner

import specmerge
from specmerge.errors import RecipeError
from specmerge.mergekit import MergekitError, from_mergekit, is_mergekit
from specmerge.methods.elementwise import gta, sparsify

T = torch.tensor


def test_gta_ties_by_hand() -> None:
    # τ_1 = [3, -1, 2], τ_2 = [-4, 0.5, 1]; density 2/3 keeps k = 2 largest |τ| per task:
    # τ_1 → [3, 0, 2], τ_2 → [-4, 0, 1]; weights 1, 0.5 → δ = [3, 0, 2], [-2, 0, 0.5]
    # votes Σδ = [1, 0, 2.5] → signs +, + (0 counts as +), +; agreeing: δ_1 everywhere it is
    # nonzero and positive, δ_2 only at entry 3 → merged [3, 0, 2.5], divisor [1, 1, 1.5]
    taus = [T([3.0, -1.0, 2.0]), T([-4.0, 0.5, 1.0])]
    out = gta(taus, weights=[1.0, 0.5], densities=[2 / 3, 2 / 3], sparsification="magnitude",
              consensus="sum", normalize=True)
    torch.testing.assert_close(out, T([3.0, 0.0, 2.5 / 1.5]))


def test_gta_task_arithmetic_and_linear_identities() -> None:
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(5, 4, generator=g) for _ in range(3)]
    w = [0.5, 1.0, 2.0]
    ta = gta(taus, weights=w, scaling=0.7)
    torch.testing.assert_close(ta, 0.7 * sum(wi * t for wi, t in zip(w, taus, strict=True)))
    lin = gta(taus, weights=w, normalize=True)
    torch.testing.assert_close(lin, sum(wi * t for wi, t in zip(w, taus, strict=True)) / 3.5)


def test_sparsify_by_hand() -> None:
    t = T([0.1, -5.0, 3.0, -0.2, 4.0, 1.0, -2.0, 0.3, 0.05, 6.0])
    # magnitude, density 0.3: the 3 largest |t|: 6, -5, 4
    assert sparsify(t, 0.3, "magnitude").nonzero().flatten().tolist() == [1, 4, 9]
    # breadcrumbs, density 0.3, gamma 0.1: drop the largest (6), keep the next 3: -5, 4, 3
    kept = sparsify(t, 0.3, "magnitude_outliers", gamma=0.1)
    assert kept.nonzero().flatten().tolist() == [1, 2, 4]
    # rescale: the kept entries scaled back to the L1 norm of t
    r = sparsify(t, 0.3, "magnitude", rescale=True)
    assert float(r.abs().sum()) == pytest.approx(float(t.abs().sum()))
    # random: about a density share kept, reproducible from the generator
    big = torch.ones(10_000)
    a = sparsify(big, 0.4, "random", generator=torch.Generator().manual_seed(1))
    b = sparsify(big, 0.4, "random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and abs(float((a != 0).float().mean()) - 0.4) < 0.02
    assert torch.equal(sparsify(t, 1.0, "magnitude"), t)
    assert not sparsify(t, 0.0, "magnitude").any()


def _mk(toy_models, method: str, **extra) -> dict:
    base, experts = toy_models["base"], toy_models["experts"]
    return {"base_model": str(base), "merge_method": method, "dtype": "float32",
            "models": [{"model": str(base)}] + [
                {"model": str(e), "parameters": {"weight": w, "density": d}}
                for e, w, d in zip(experts, [1.0, 0.5, 0.25], [0.5, 0.7, 0.9], strict=True)],
            **extra}


@pytest.mark.parametrize("method, preset", [
    ("task_arithmetic", ("none", "none", False, False)),
    ("ties", ("magnitude", "sum", True, False)),
    ("dare_ties", ("random", "sum", False, True)),
    ("dare_linear", ("random", "none", False, True)),
    ("breadcrumbs", ("magnitude_outliers", "none", False, False)),
    ("breadcrumbs_ties", ("magnitude_outliers", "sum", False, False)),
])
def test_mergekit_methods_map_onto_gta(toy_models, method, preset) -> None:
    data = _mk(toy_models, method, parameters={"lambda": 0.8, "int8_mask": True})
    assert is_mergekit(data)
    rec = specmerge.load_recipe(data)
    assert rec.merge_method == "gta" and rec.out_dtype == "float32"
    p = rec.parameters
    assert (p["sparsification"], p["consensus"], p["normalize"], p["rescale"]) == preset
    assert p["scaling"] == 0.8
    # the base listed among the models is skipped, as mergekit skips it
    assert [m.weight for m in rec.models] == [1.0, 0.5, 0.25]
    assert [m.density for m in rec.models] == [0.5, 0.7, 0.9]


def test_mergekit_ties_merge_equals_the_formula(toy_models, tmp_path) -> None:
    out = specmerge.merge(_mk(toy_models, "ties"), tmp_path / "out", progress=False).out_dir
    got = load_file(str(out / "model.safetensors"))
    base, experts = toy_models["base_sd"], toy_models["expert_sds"]
    for name, theta0 in base.items():
        taus = [e[name] - theta0 for e in experts]
        ref = theta0 + gta(taus, weights=[1.0, 0.5, 0.25], densities=[0.5, 0.7, 0.9],
                           sparsification="magnitude", consensus="sum", normalize=True)
        torch.testing.assert_close(got[name], ref, rtol=1e-6, atol=1e-7)


def test_mergekit_linear_is_the_weighted_average_of_the_listed_models(toy_models,
                                                                       tmp_path) -> None:
    base, experts = toy_models["base"], toy_models["experts"]
    data = {"merge_method": "linear", "models": [
        {"model": str(base), "parameters": {"weight": 2.0}},
        {"model": str(experts[0]), "parameters": {"weight": 1.0}},
        {"model": str(experts[1]), "parameters": {"weight": 1.0}}]}
    out = specmerge.merge(data, tmp_path / "out", progress=False).out_dir
    got = load_file(str(out / "model.safetensors"))
    b, e = toy_models["base_sd"], toy_models["expert_sds"]
    for name in b:
        ref = (2.0 * b[name] + e[0][name] + e[1][name]) / 4.0
        torch.testing.assert_close(got[name], ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"slices": []}, "'slices' with merge_method 'ties'.*several merged slices are not yet"),
    ({"merge_method": "lrp"}, "mergekit's 'lrp' is not implemented"),
    ({"merge_method": "core_space"}, "mergekit's 'core_space' is not implemented"),
    ({"tokenizer_source": "EXPERT"}, "tokenizer.source '.*EXPERT' is neither the base_model"),
    ({"tokenizer": {"pad_to_multiple_of": 64}}, "pad_to_multiple_of is not supported yet"),
    ({"tokenizer": {"source": "base"}, "tokenizer_source": "base"}, "not both"),
    ({"parameters": {"gamma": [0.01, 0.02]}}, "parameters.gamma: gradients"),
    ({"parameters": {"gamma": [{"filter": "mlp", "value": 0.5}]}}, "filtered by tensor name"),
    ({"parameters": {"weight": {"mlp": 0.5}}}, "parameters.weight: a mapping is not supported"),
    ({"parameters": {"density": [{"filter": "mlp"}]}}, r"filter: NAME, value: V"),
    ({"parameters": {"epsilon": 0.1}}, r"parameters \['epsilon'\]"),
    ({"chat_template": "vicuna"}, "'vicuna': not a template name specmerge knows"),
    ({"chat_template": "{{ x }}"}, "is not a Jinja template"),
    ({"base_model": None}, "base_model is missing: mergekit's ties needs one"),
    ({"base_model": None, "merge_method": "model_stock"}, "mergekit's model_stock needs one"),
])
def test_unsupported_mergekit_features_are_named(toy_models, change, message) -> None:
    with pytest.raises(RecipeError, match=message):
        specmerge.load_recipe({**_mk(toy_models, "ties"), **change})


def test_convert_prints_the_specmerge_recipe(toy_models, tmp_path) -> None:
    from specmerge.cli import app

    p = tmp_path / "mk.yml"
    p.write_text(yaml.safe_dump(_mk(toy_models, "dare_ties", parameters={"rescale": False})))
    before = tree_hash(toy_models["root"] / "base")
    res = CliRunner().invoke(app, ["convert", str(p)])
    assert res.exit_code == 0, res.output
    rec = yaml.safe_load(res.output)
    assert rec == from_mergekit(yaml.safe_load(p.read_text()))
    assert rec["merge_method"] == "gta" and rec["parameters"]["rescale"] is False
    assert tree_hash(toy_models["root"] / "base") == before


def test_a_gta_recipe_and_its_resolved_record_re_run_to_the_same_bytes(toy_models,
                                                                        tmp_path) -> None:
    # gta shares parameter names (normalize, rescale) with mergekit: it is never read as mergekit
    first = specmerge.merge(_mk(toy_models, "ties"), tmp_path / "a", progress=False).out_dir
    again = specmerge.merge(first / "specmerge_recipe.yaml", tmp_path / "b",
                            progress=False).out_dir
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    rec = specmerge.load_recipe(_mk(toy_models, "ties"))
    assert specmerge.load_recipe(rec).parameters == rec.parameters  # a Recipe object as input


@pytest.mark.parametrize("change", [{"base_model": 7},
                                    {"models": [{"model": 3, "parameters": {"weight": 1}}]}])
def test_mergekit_paths_must_be_paths(toy_models, change) -> None:
    with pytest.raises(RecipeError, match="path"):
        specmerge.load_recipe({**_mk(toy_models, "ties"), **change})


@pytest.mark.parametrize(("models", "params", "where"), [
    ([{"model": "a", "parameters": {"weight": "x"}}, {"model": "b"}], {}, "models[0]"),
    ([{"model": "a"}, {"model": "b"}], {"weight": "heavy"}, "parameters.weight"),
])
def test_linear_names_a_weight_that_is_not_a_number(models, params, where) -> None:
    data = {"merge_method": "linear", "models": models, "parameters": params}
    with pytest.raises(MergekitError, match=re.escape(where) + ".*expected a number"):
        from_mergekit(data)
