"""Named presets (specmerge.methods.presets): the official settings resolve to the numbers of the
official code, parameters beside a preset win, errors name the field and the choices, and the
resolved recipe records values that re-run alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import recipe_for
from safetensors.torch import load_file
from typer.testing import CliRunner

from specmerge.cli import app
from specmerge.errors import RecipeError
from specmerge.methods.presets import Context, all_presets, get_preset, presets_of
from specmerge.methods.registry import get_method
from specmerge.recipe import load_recipe

# Reference values, read from the official code (WalkerWorldPeace/MLLMerging@5f8a458, and
# lyymuwu/SVC@6ad2b31 for SVC); K = 5 experts, as in the official MLLM runs.
REFERENCE = {
    ("swudi", "clip"): {"rank_ratio": 0.65, "exp_time": 1300.0, "scaling": 1.0},
    ("swudi", "clip-b16"): {"rank_ratio": 0.65, "exp_time": 1800.0, "scaling": 1.0},
    ("swudi", "llama-full"): {"rank_ratio": 0.85, "exp_time": 300.0, "scaling": 1.0},
    ("swudi", "qwen2vl-lora"): {"rank_ratio": 0.01, "exp_time": 1300.0, "scaling": 0.2},
    ("swudi", "internvl-full"): {"rank_ratio": 0.65, "exp_time": 300.0, "scaling": 0.1},
    ("swudi_a", "clip"): {"rank_rule": "participation_sqrt", "filter": "none", "scaling": 1.0},
    ("swudi_a", "flan-t5-lora"): {"rank_rule": "participation_sqrt", "filter": "none",
                                  "scaling": 1.0},
    ("swudi_a", "llama-full"): {"rank_rule": "gavish_donoho", "filter": "none", "scaling": 1.0},
    ("swudi_a", "qwen2vl-lora"): {"rank_rule": "participation_sqrt", "filter": "none",
                                  "scaling": 0.2},
    ("swudi_a", "internvl-full"): {"rank_rule": "participation_sqrt", "filter": "none",
                                   "scaling": 0.1},
    ("wudi", "clip"): {"iterations": 300, "lr": 1e-5, "scaling": 1.0},
    ("wudi", "qwen2vl-lora"): {"iterations": 300, "lr": 1e-5, "scaling": 0.3},
    ("wudi", "internvl-full"): {"iterations": 300, "lr": 1e-5, "scaling": 0.3},
    ("svc", "clip"): {"alpha": 0.2},  # after a base method other than TSV-M: 1/K
}


def _recipe(method: str, k: int = 5, **extra) -> dict:
    return {"base_model": "/nonexistent/base", "models": [f"/nonexistent/e{i}" for i in range(k)],
            "merge_method": method, **extra}


@pytest.mark.parametrize(("method", "name"), sorted(REFERENCE))
def test_presets_resolve_to_the_official_numbers(method: str, name: str) -> None:
    got = get_preset(method, name, "x").resolve(Context(5, "ties"))
    assert {k: got[k] for k in REFERENCE[method, name]} == REFERENCE[method, name]


def test_every_preset_is_listed_in_the_reference_and_validates() -> None:
    assert {(p.method, p.name) for p in all_presets()} == set(REFERENCE)
    for p in all_presets():
        get_method(p.method).validate(p.resolve(Context(3, "ties")))
        assert p.repo.split("@")[0] in ("WalkerWorldPeace/MLLMerging", "lyymuwu/SVC")
        assert ":" in p.source  # file:lines


def test_the_defaults_are_the_clip_presets() -> None:
    for p in all_presets():
        if p.defaults:
            assert p.resolve(Context(5)) == {k: get_method(p.method).param(k).default
                                             for k in p.values}
    assert {p.method for p in all_presets() if p.defaults} == {"swudi", "swudi_a", "wudi"}


@pytest.mark.parametrize("k", [2, 5, 8])
def test_one_over_n_is_resolved_per_recipe(k: int) -> None:
    for method in ("swudi", "swudi_a"):
        rec = load_recipe(_recipe(method, k, parameters={"preset": "qwen2vl-lora"}))
        assert rec.parameters["scaling"] == pytest.approx(1 / k)
        assert "preset" not in rec.parameters


def test_svc_alpha_is_one_after_tsv_m_and_one_over_k_elsewhere() -> None:
    cal = {"method": "svc", "preset": "clip"}
    assert load_recipe(_recipe("tsv_m", 8, calibrate=cal)).calibrate["alpha"] == 1.0
    for base in ("task_arithmetic", "ties", "iso_c", "swudi"):
        assert load_recipe(_recipe(base, 8, calibrate=cal)).calibrate["alpha"] == 0.125


def test_parameters_beside_a_preset_win() -> None:
    rec = load_recipe(_recipe("swudi", parameters={"preset": "qwen2vl-lora", "scaling": 0.5,
                                                   "exp_time": 100}))
    assert rec.parameters == {"rank_ratio": 0.01, "exp_time": 100.0, "init": "sum",
                              "scaling": 0.5}
    rec = load_recipe(_recipe("tsv_m", calibrate={"method": "svc", "preset": "clip",
                                                  "alpha": 0.3}))
    assert rec.calibrate["alpha"] == 0.3


def test_a_recipe_without_a_preset_is_unchanged() -> None:
    rec = load_recipe(_recipe("swudi", parameters={"scaling": 0.5}))
    assert rec.parameters == {**get_method("swudi").defaults(), "scaling": 0.5}


@pytest.mark.parametrize(("method", "params", "match"), [
    ("swudi", {"preset": "nope"}, r"parameters\.preset 'nope' is not a known preset; presets "
                                  r"of 'swudi': \['clip', 'clip-b16', 'llama-full', "
                                  r"'qwen2vl-lora', 'internvl-full'\]"),
    ("swudi", {"preset": "flan-t5-lora"}, r"parameters\.preset 'flan-t5-lora' is a preset of "
                                          r"\['swudi_a'\], not of 'swudi'; presets of 'swudi'"),
    ("ties", {"preset": "clip"}, r"parameters\.preset 'clip' is a preset of .*not of 'ties'; "
                                 r"method 'ties' has no presets"),
    ("swudi_a", {"preset": 3}, r"parameters\.preset must be a preset name \(a string\), got 3; "
                               r"presets of 'swudi_a'"),
    ("swudi", {"preset": "clip", "bogus": 1}, r"unknown parameter\(s\) \['bogus'\]"),
])
def test_a_bad_preset_is_a_clear_error(method: str, params: dict, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        load_recipe(_recipe(method, parameters=params))


def test_a_bad_calibration_preset_names_its_field() -> None:
    with pytest.raises(RecipeError, match=r"calibrate\.preset 'qwen2vl-lora' is a preset of "
                                          r"\['swudi', 'swudi_a', 'wudi'\], not of 'svc'; "
                                          r"presets of 'svc': \['clip'\]"):
        load_recipe(_recipe("ties", calibrate={"method": "svc", "preset": "qwen2vl-lora"}))


def test_methods_lists_the_presets() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    assert "qwen2vl-lora: rank_ratio 0.01, exp_time 1300.0, init sum, scaling 1/K" in res.output
    assert "clip [the defaults]: rank_ratio 0.65, exp_time 1300.0" in res.output
    assert "calibrate: {method: svc, preset: NAME}" in res.output
    assert "lyymuwu/SVC@6ad2b31: run.sh:1,11-16" in res.output
    data = {m["name"]: m for m in json.loads(runner.invoke(app, ["methods", "--json"]).output)}
    assert data["swudi"]["presets"]["qwen2vl-lora"]["values"]["scaling"] == "1/K"
    assert data["swudi_a"]["presets"]["internvl-full"]["values"]["scaling"] == 0.1
    assert data["ties"]["presets"] == {}
    assert [p.name for p in presets_of("swudi_a")] == list(data["swudi_a"]["presets"])


def test_the_resolved_recipe_records_the_values_and_reruns_alone(toy_models, tmp_path: Path
                                                                 ) -> None:
    runner = CliRunner()
    recipe = recipe_for(toy_models, "swudi", parameters={"preset": "qwen2vl-lora"},
                        calibrate={"method": "svc", "preset": "clip"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    record = yaml.safe_load((tmp_path / "out" / "specmerge_recipe.yaml").read_text())
    assert record["parameters"] == {"rank_ratio": 0.01, "exp_time": 1300.0, "init": "sum",
                                    "scaling": 1 / 3}
    assert record["calibrate"]["alpha"] == 1 / 3 and "preset" not in record["calibrate"]
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(record))
    res = runner.invoke(app, ["merge", str(tmp_path / "again.yaml"), str(tmp_path / "out2")])
    assert res.exit_code == 0, res.output
    first, second = (load_file(tmp_path / d / "model.safetensors") for d in ("out", "out2"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
