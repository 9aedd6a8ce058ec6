"""examples/mergekit/: specmerge's rewrites of mergekit 0.1.5's six example recipes. Each
converts (``specmerge convert``) to a valid specmerge recipe, and the ones whose structure fits
a one-layer stand-in merge on tiny checkpoints written at their placeholder paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import specmerge
from specmerge.cli import app
from specmerge.mergekit import mergekit_methods
from specmerge.recipe import Recipe
from tests.conftest import make_state_dicts, write_hf_dir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "mergekit"
FILES = ("bio-merge.yml", "linear.yml", "ties.yml", "gradient-slerp.yml",
         "orcamini-platy-44layer.yml", "arcee_fusion.yml")


def test_the_six_examples_are_there() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.yml")) == sorted(FILES)


@pytest.mark.parametrize("name", FILES)
def test_convert_accepts_each_example(name: str) -> None:
    data = yaml.safe_load((EXAMPLES / name).read_text())
    if mergekit_methods().get(data["merge_method"]) is None:
        pytest.skip(f"mergekit's {data['merge_method']} is not a registered specmerge method")
    res = CliRunner().invoke(app, ["convert", str(EXAMPLES / name)])
    assert res.exit_code == 0, res.output
    rec = yaml.safe_load(res.output)
    Recipe.model_validate(rec)  # a valid specmerge recipe (paths are not read)
    if name == "linear.yml":  # no base_model: the first model stands as θ0
        assert rec["base_model"] == "models/chat_13b" and len(rec["models"]) == 2
    if name == "gradient-slerp.yml":
        assert rec["merge_method"] == "slerp" and rec["slices"][0]["sources"][0]["layer_range"] \
            == [0, 40] and len(rec["models"]) == 1
    if name == "orcamini-platy-44layer.yml":
        assert rec["merge_method"] == "passthrough" and len(rec["slices"]) == 2


@pytest.mark.parametrize("name", ["bio-merge.yml", "linear.yml", "ties.yml"])
def test_examples_merge_on_stand_in_models(name: str, tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / name, tmp_path / name)
    data = yaml.safe_load((EXAMPLES / name).read_text())
    paths = [data.get("base_model"), *(m["model"] for m in data["models"])]
    base, experts = make_state_dicts(k=len(paths))
    for path, sd in zip(dict.fromkeys(p for p in paths if p), [base, *experts], strict=False):
        write_hf_dir(tmp_path / path, sd)
    out = specmerge.merge(tmp_path / name, tmp_path / "out", progress=False).out_dir
    assert (out / "model.safetensors").is_file()
    assert (out / "specmerge_recipe.yaml").is_file()
