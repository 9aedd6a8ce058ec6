"""Bad input gets a clear error naming the culprit, and loses nothing."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from conftest import make_state_dicts, recipe_for, tree_hash, write_hf_dir

import specmerge
from specmerge.errors import (
    CheckpointError,
    IncompatibleCheckpointError,
    MergeError,
    NonFiniteError,
    OutputError,
    RecipeError,
)
from specmerge.io.checkpoint import Checkpoint


def expert_variant(tmp_path: Path, models: dict, change) -> dict:
    sd = {k: v.clone() for k, v in models["expert_sds"][1].items()}
    change(sd)
    bad = write_hf_dir(tmp_path / "bad", sd)
    return {**models, "experts": [models["experts"][0], bad, models["experts"][2]]}


def no_partial_dirs(root: Path) -> bool:
    return not [p for p in root.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_shape_mismatch_names_file_tensor_expected_found(toy_models, tmp_path) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    models = expert_variant(tmp_path, toy_models, lambda sd: sd.update({name: torch.zeros(12, 9)}))
    with pytest.raises(IncompatibleCheckpointError) as e:
        specmerge.merge(recipe_for(models), tmp_path / "out", progress=False)
    msg = str(e.value)
    assert name in msg and "bad/model.safetensors" in msg and "[12, 9]" in msg and "[12, 8]" in msg
    assert not (tmp_path / "out").exists()


def test_missing_and_extra_tensor(toy_models, tmp_path) -> None:
    name = "lm_head.weight"
    models = expert_variant(tmp_path, toy_models, lambda sd: sd.pop(name))
    with pytest.raises(IncompatibleCheckpointError, match="'lm_head.weight' is missing"):
        specmerge.merge(recipe_for(models), tmp_path / "out", progress=False)
    models = expert_variant(tmp_path / "x", toy_models, lambda sd: sd.update(extra=torch.ones(2)))
    with pytest.raises(IncompatibleCheckpointError, match="'extra' is not in the base"):
        specmerge.merge(recipe_for(models), tmp_path / "out", progress=False)


def test_nan_names_tensor_and_allow_nonfinite(toy_models, tmp_path) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"

    def poison(sd):
        sd[name][1, 2] = float("nan")

    models = expert_variant(tmp_path, toy_models, poison)
    with pytest.raises(NonFiniteError) as e:
        specmerge.merge(recipe_for(models), tmp_path / "out", progress=False)
    assert name in str(e.value) and "bad/model.safetensors" in str(e.value)
    assert no_partial_dirs(tmp_path) and not (tmp_path / "out").exists()
    res = specmerge.merge(recipe_for(models), tmp_path / "out", allow_nonfinite=True,
                          progress=False)
    assert res.out_dir.is_dir()


def test_truncated_safetensors(toy_models, tmp_path) -> None:
    src = toy_models["experts"][1] / "model.safetensors"
    bad = tmp_path / "trunc"
    bad.mkdir()
    data = src.read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 100])
    models = {**toy_models, "experts": [toy_models["experts"][0], bad]}
    with pytest.raises(CheckpointError, match=r"trunc/model.safetensors: truncated: tensor '.+'"):
        specmerge.merge(recipe_for(models), tmp_path / "out", progress=False)


def test_missing_unreadable_and_non_checkpoint_files(toy_models, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such file or directory"):
        Checkpoint(tmp_path / "nope")
    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.safetensors: not a safetensors file"):
        Checkpoint(junk)
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        Checkpoint(empty)
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    with pytest.raises(CheckpointError, match="unsupported file type"):
        Checkpoint(txt)
    pickle_junk = tmp_path / "bad.bin"
    pickle_junk.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CheckpointError, match="bad.bin: not a loadable PyTorch state dict"):
        Checkpoint(pickle_junk)
    if os.geteuid() != 0:  # root reads anything
        locked = toy_models["experts"][0] / "model.safetensors"
        locked.chmod(0)
        try:
            with pytest.raises(CheckpointError, match="cannot read"):
                Checkpoint(locked)
        finally:
            locked.chmod(0o644)


def test_existing_output_refused_without_force(toy_models, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        specmerge.merge(recipe_for(toy_models), out, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    specmerge.merge(recipe_for(toy_models), out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert no_partial_dirs(tmp_path)


def test_output_inside_input_refused(toy_models, tmp_path) -> None:
    with pytest.raises(OutputError, match="lies inside the input"):
        specmerge.merge(recipe_for(toy_models), toy_models["base"] / "merged", progress=False)
    with pytest.raises(OutputError, match="lies inside the output"):
        specmerge.merge(recipe_for(toy_models), tmp_path, force=True, progress=False)


def test_interrupted_merge_leaves_nothing_and_inputs_untouched(toy_models, tmp_path,
                                                               monkeypatch) -> None:
    before = tree_hash(toy_models["root"])
    import specmerge.engine as engine

    calls = {"n": 0}
    real = engine.merged_update

    def explode(entry, taus, calibration, statistics, *rest):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C mid-way
        return real(entry, taus, calibration, statistics, *rest)

    monkeypatch.setattr(engine, "merged_update", explode)
    out = tmp_path / "merged"
    for workers in (1, 2):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            specmerge.merge(recipe_for(toy_models), out, workers=workers, progress=False)
        assert not out.exists()
        assert no_partial_dirs(tmp_path)
    assert tree_hash(toy_models["root"]) == before


def test_method_failure_names_tensor(toy_models, tmp_path, monkeypatch) -> None:
    import specmerge.methods.elementwise as ew
    from specmerge.methods import registry

    def broken(task_vectors, *, weights=None, scaling=0.3):
        raise RuntimeError("boom")

    m = registry.get_method("task_arithmetic")
    monkeypatch.setitem(registry._REGISTRY, "task_arithmetic",
                        type(m)(**{**m.__dict__, "fn": broken}))
    with pytest.raises(MergeError, match="task_arithmetic failed on tensor '.+'.*boom"):
        specmerge.merge(recipe_for(toy_models), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    del ew


def test_full_disk_is_reported_and_cleaned(toy_models, tmp_path, monkeypatch) -> None:
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutputError, match="disk full"):
        specmerge.merge(recipe_for(toy_models), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and no_partial_dirs(tmp_path)


def test_recipe_errors_are_clear(toy_models, tmp_path) -> None:
    r = recipe_for(toy_models)
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['methd'\].*allowed keys"):
        specmerge.load_recipe({**r, "methd": 1})
    with pytest.raises(RecipeError, match="unknown method 'foo'"):
        specmerge.load_recipe({**r, "merge_method": "foo"})
    with pytest.raises(RecipeError, match="unknown parameter"):
        specmerge.load_recipe({**r, "parameters": {"lamda": 1}})
    with pytest.raises(RecipeError, match="scope.*allowed keys"):
        specmerge.load_recipe({**r, "scope": {"exclud": []}})
    with pytest.raises(RecipeError, match="does not use per-model weights"):
        specmerge.load_recipe({**r, "merge_method": "ties",
                               "models": [{"model": "a", "weight": 2.0}]})
    with pytest.raises(RecipeError, match="is a calibration"):
        specmerge.load_recipe({**r, "merge_method": "svc"})
    with pytest.raises(RecipeError, match="compute dtype.*out_dtype: bfloat16"):
        specmerge.load_recipe({**r, "dtype": "bfloat16"})
    with pytest.raises(RecipeError, match="at least one expert"):
        specmerge.load_recipe({**r, "models": []})
    with pytest.raises(RecipeError, match="energy_<f> with a number 0 < f <= 1"):
        specmerge.load_recipe({**r, "merge_method": "swudi_a",
                               "parameters": {"rank_rule": "energy_2"}})
    with pytest.raises(RecipeError, match="recipe file not found"):
        specmerge.load_recipe(tmp_path / "missing.yaml")


def test_yaml_paths_are_relative_to_the_recipe(toy_models, tmp_path) -> None:
    d = tmp_path / "recipes"
    d.mkdir()
    (d / "r.yaml").write_text("base_model: ../base\nmodels: [../e0, {model: ../e1}]\n"
                              "merge_method: weight_average\n")
    rec = specmerge.load_recipe(d / "r.yaml")
    assert rec.base_model == str(toy_models["base"].resolve())
    assert rec.models[1].model == str(toy_models["experts"][1].resolve())



def test_base_listed_among_experts_is_refused_in_a_specmerge_recipe(toy_models) -> None:
    """A specmerge recipe that lists the base among the experts would silently add a zero task
    vector and dilute every average (mergekit recipes, which do this, are read as mergekit)."""
    base, (e0, e1, _) = toy_models["base"], toy_models["experts"]
    r = {"base_model": str(base), "merge_method": "task_arithmetic"}
    with pytest.raises(RecipeError, match=r"models\[1\] is the base model itself"):
        specmerge.load_recipe({**r, "models": [str(e0), str(base) + "/", str(e1)]})


def test_dtype_mismatch_is_allowed_for_floats_only(tmp_path) -> None:
    base, experts = make_state_dicts(1, shapes={"w": (4, 4)})
    base["ids"] = torch.arange(4)
    experts[0]["ids"] = torch.arange(4).to(torch.int32)
    models = {"base": write_hf_dir(tmp_path / "b", base),
              "experts": [write_hf_dir(tmp_path / "e", experts[0])]}
    with pytest.raises(IncompatibleCheckpointError, match="'ids' has dtype torch.int32"):
        specmerge.merge(recipe_for(models), tmp_path / "out", progress=False)
