"""Bad input gets a clear error naming the culprit, and loses nothing."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from conftest import make_state_dicts, recipe_for, tree_hash, write_hf_dir
from safetensors.torch import load_file

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
    # --force replaces only a previous specmerge output (README, Safety)
    with pytest.raises(OutputError, match="not a specmerge output .it holds keep.txt"):
        specmerge.merge(recipe_for(toy_models), out, force=True, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    specmerge.merge(recipe_for(toy_models), out, force=True, progress=False)
    specmerge.merge(recipe_for(toy_models, "ties"), out, force=True, progress=False)
    assert (out / "model.safetensors").exists() and "ties" in (out / "README.md").read_text()
    assert no_partial_dirs(tmp_path)


def test_output_inside_input_refused(toy_models, tmp_path) -> None:
    with pytest.raises(OutputError, match="lies inside the input"):
        specmerge.merge(recipe_for(toy_models), toy_models["base"] / "merged", progress=False)
    with pytest.raises(OutputError, match="lies inside the output"):
        specmerge.merge(recipe_for(toy_models), tmp_path, force=True, progress=False)


def test_interrupted_merge_leaves_nothing_and_inputs_untouched(toy_models, tmp_path,
                                                               monkeypatch) -> None:
    before = tree_hash(toy_models["root"])
    import specmerge.engine.update as engine

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


# ---------------------------------------------------------------------------------------------
# Reliability round 3: symlinked OUT, --force policy, FIFOs, misread mergekit values
# ---------------------------------------------------------------------------------------------


def _cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from specmerge.cli import app

    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.output


def _recipe_file(models: dict, path: Path, method: str = "task_arithmetic") -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe_for(models, method)))
    return path


@pytest.mark.parametrize("force", [False, True])
def test_out_a_symlink_is_refused_and_its_target_untouched(toy_models, tmp_path, force) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    (tmp_path / "out").symlink_to(precious)
    recipe = _recipe_file(toy_models, tmp_path / "r.yaml")
    rc, out = _cli("merge", str(recipe), str(tmp_path / "out"), "-q",
                   *(["--force"] if force else []))
    assert rc == 1 and "symbolic link" in out and str(tmp_path / "out") in out
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in precious.iterdir()) == ["thesis.tex"]
    assert (tmp_path / "out").is_symlink()


def test_force_replaces_only_a_previous_specmerge_output(toy_models, tmp_path) -> None:
    recipe = _recipe_file(toy_models, tmp_path / "r.yaml")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    rc, out = _cli("merge", str(recipe), str(notes), "-q", "--force")
    assert rc == 1 and "not a specmerge output" in out and "todo.txt" in out
    assert (notes / "todo.txt").read_text() == "keep me"
    # a previous output, and an empty directory, are replaced
    out_dir = tmp_path / "out"
    assert _cli("merge", str(recipe), str(out_dir), "-q")[0] == 0
    assert _cli("merge", str(recipe), str(out_dir), "-q", "--force")[0] == 0
    (tmp_path / "empty").mkdir()
    assert _cli("merge", str(recipe), str(tmp_path / "empty"), "-q", "--force")[0] == 0
    assert (tmp_path / "empty" / "specmerge_recipe.yaml").is_file()


def test_force_never_deletes_the_recipe_in_out(toy_models, tmp_path) -> None:
    out_dir = tmp_path / "out"
    assert _cli("merge", str(_recipe_file(toy_models, tmp_path / "r.yaml")), str(out_dir),
                "-q")[0] == 0
    recipe = _recipe_file(toy_models, out_dir / "my_recipe.yaml")  # the recipe kept in OUT
    rc, out = _cli("merge", str(recipe), str(out_dir), "-q", "--force")
    assert rc == 1 and "my_recipe.yaml" in out and "inside the output" in out
    assert recipe.is_file()


def test_a_fifo_where_a_weight_file_is_expected_is_refused_not_waited_on(toy_models,
                                                                           tmp_path) -> None:
    import subprocess
    import sys

    base = tmp_path / "fifo_base"
    write_hf_dir(base, toy_models["base_sd"])
    (base / "model.safetensors").unlink()
    os.mkfifo(base / "weights.safetensors")
    models = {**toy_models, "base": base}
    recipe = _recipe_file(models, tmp_path / "r.yaml")
    for args in (["merge", str(recipe), str(tmp_path / "out")], ["plan", str(recipe)],
                 ["inspect", str(base)]):
        res = subprocess.run([sys.executable, "-m", "specmerge.cli", *args], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 1, (args, res.stderr)
        assert "FIFO" in res.stderr and "weights.safetensors" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("key", "value", "expect"), [
    ("normalize", [False, False], "gradients"),
    ("rescale", [True], "gradients"),
    ("normalize", "yes", "expected true or false"),
    ("lambda", "abc", "parameters.lambda: expected a number"),
    ("lambda", [0.5, "x"], "parameters.lambda: a gradient is a list of numbers"),
])
def test_mergekit_flags_of_the_wrong_type_are_refused_by_name(toy_models, tmp_path, key, value,
                                                              expect) -> None:
    data = {"base_model": str(toy_models["base"]), "merge_method": "ties",
            "models": [{"model": str(e), "parameters": {"density": 0.5, "weight": 1.0}}
                       for e in toy_models["experts"]],
            "parameters": {key: value}}
    with pytest.raises(RecipeError, match=expect) as e:
        specmerge.load_recipe(data)
    assert key in str(e.value)


def test_float16_output_beyond_its_range_is_refused_not_written_as_inf(tmp_path) -> None:
    base, experts = make_state_dicts(k=2)
    name = "model.layers.0.mlp.up_proj.bias"
    base[name][3] = 7e4  # finite in float32, beyond float16's 65504
    for e in experts:
        e[name][3] = 7e4
    models = {"base": write_hf_dir(tmp_path / "b", base),
              "experts": [write_hf_dir(tmp_path / f"e{i}", e) for i, e in enumerate(experts)]}
    recipe = {**recipe_for(models), "out_dtype": "float16"}
    with pytest.raises(NonFiniteError, match=f"{name}.*exceed the range of float16"):
        specmerge.merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    specmerge.merge(recipe, tmp_path / "out", progress=False, allow_nonfinite=True)  # on request


@pytest.mark.parametrize(("yaml_text", "args", "expect"), [
    ("merge_method: [ties]", [], "merge_method: Input should be a valid string"),
    ("models: {models}", [], "models: Input should be a valid list"),
    ("deep", [], "nests too deeply"),
    ("", ["--block-size", "0"], "block_size (--block-size): size must be positive"),
    ("", ["--shard-size", "0"], "shard_size (--shard-size): size must be positive"),
    ("parameters: {scaling: abc}", [], "'scaling'"),
    ("", ["OUT_UNDER_A_FILE"], "afile is a file, not a directory"),
    ("", ["LONG_OUT"], "File name too long"),
])
def test_no_error_reaches_the_user_as_a_traceback(toy_models, tmp_path, yaml_text, args,
                                                  expect) -> None:
    """Through the real entry point (``specmerge.cli.main``): one line, exit status 1."""
    import subprocess
    import sys

    import yaml

    data = recipe_for(toy_models)
    if yaml_text == "deep":
        text = "a: " + "[" * 20000 + "]" * 20000 + "\n"
    else:
        extra = yaml.safe_load(yaml_text.replace("{models}", str(toy_models["experts"][0])))
        text = yaml.safe_dump({**data, **(extra or {})})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    out = str(tmp_path / "out")
    if args == ["OUT_UNDER_A_FILE"]:
        (tmp_path / "afile").write_text("")
        out, args = str(tmp_path / "afile" / "out"), []
    if args == ["LONG_OUT"]:
        out, args = str(tmp_path / ("x" * 5000)), []
    res = subprocess.run([sys.executable, "-m", "specmerge.cli", "merge", str(recipe), out, "-q",
                          *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.startswith("error: "), res.stderr
    assert expect in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    if yaml_text in ("deep", "merge_method: [ties]"):  # the boundary and a command's own
        debug = subprocess.run([sys.executable, "-m", "specmerge.cli", "--debug", "merge",
                                str(recipe), out, "-q", *args], capture_output=True, text=True,
                               timeout=120)
        assert debug.returncode == 1 and "Traceback" in debug.stderr


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``specmerge.cli.main``, the real entry point, in this process (so that a test can
    emulate what root cannot meet: a directory it may not write in)."""
    from specmerge.cli import main

    monkeypatch.setattr("sys.argv", ["specmerge", *args])
    with pytest.raises(SystemExit) as e:
        main()
    captured = capsys.readouterr()
    return e.value.code, captured.err


def _read_only(real):
    def statvfs(path):  # the file system of every path reads as mounted read-only
        r = real(path)
        return os.statvfs_result((*r[:8], r.f_flag | os.ST_RDONLY, r.f_namemax))
    return statvfs


@pytest.mark.parametrize(("case", "expect"), [
    ("parent a file", "{parent} is a file, not a directory"),
    ("above a file", "{parent} is a file, not a directory"),
    ("read-only mount", "{parent} is on a read-only file system"),
    ("not writable", "{parent} is not writable (permission denied)"),
    ("EROFS at mkdir", "cannot be created in {parent}: Read-only file system"),
    ("EACCES at mkdir", "cannot be created in {parent}: Permission denied"),
])
def test_an_out_that_cannot_be_created_is_one_line_naming_it(toy_models, tmp_path, monkeypatch,
                                                             capsys, case, expect) -> None:
    import specmerge.io.writer as writer

    recipe = _recipe_file(toy_models, tmp_path / "r.yaml")
    parent = tmp_path / "parent"
    out = parent / "out"
    if case == "parent a file":
        parent.write_text("")
    elif case == "above a file":
        parent.write_text("")
        out = parent / "sub" / "out"
    else:
        parent.mkdir()
    if case == "read-only mount":
        monkeypatch.setattr(os, "statvfs", _read_only(os.statvfs))
    if case == "not writable":
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
            False if Path(p) == parent and mode & os.W_OK else real_access(p, mode, **kw)))
    if case.endswith("at mkdir"):  # what the check cannot see coming (a remount, an ACL)
        code = errno.EROFS if case.startswith("EROFS") else errno.EACCES

        def mkdtemp(*args, dir=None, **kw):
            raise OSError(code, os.strerror(code), str(dir))
        monkeypatch.setattr(writer.tempfile, "mkdtemp", mkdtemp)
    rc, err = _main(monkeypatch, capsys, "merge", str(recipe), str(out), "-q")
    assert rc == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: output {out} cannot be created"), err
    assert expect.format(parent=parent) in err and len(err.splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


def _toy_adapter(path: Path, change: dict) -> Path:
    """A LoRA adapter of the toy base on q_proj (r 2), written by hand, with ``change`` laid
    over its config; ``factor`` and ``embedding`` change its tensors."""
    import json

    from safetensors.torch import save_file

    path.mkdir()
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{module}.lora_A.weight": torch.ones(change.pop("factor", (2, 8))),
               f"{module}.lora_B.weight": torch.ones(8, 2)}
    if change.pop("embedding", False):
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.ones(2, 16)
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.ones(8, 2)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **change}))
    return path


@pytest.mark.parametrize(("case", "expect"), [
    ("mergekit lambda gradient", "parameters.lambda: a gradient is a list of numbers"),
    ("mergekit normalize list", "gradients"),
    ("LoRA rank 0", "must be 2-D with rank >= 1"),
    ("LoRA 1-D factor", "must be 2-D with rank >= 1"),
    ("LoRA r 0", "r must be a positive number"),
    ("LoRA alpha string", "lora_alpha must be a positive number, got 'abc'"),
    ("LoRA alpha_pattern regex", "alpha_pattern key 'q_proj(' is not a regular"),
    ("LoRA on the embedding", "LoRA on an embedding layer"),
    ("out of memory before the merge", "not enough memory"),
])
def test_the_other_error_classes_are_one_line_through_the_cli(toy_models, tmp_path,
                                                              monkeypatch, capsys, case,
                                                              expect) -> None:
    """Issue 26's failures that no test above drives through the CLI, through
    ``specmerge.cli.main``: one line, exit status 1. With the two tests above and
    ``test_out_of_memory_in_a_method_is_one_line``, every case of the issue is covered (the
    Ray driver's SIGTERM: ``test_ray``)."""
    import yaml

    import specmerge.memory as memory

    data = recipe_for(toy_models)
    if case.startswith("mergekit"):
        key, value = ("lambda", [0.5, "x"]) if "lambda" in case else ("normalize", [False])
        data = {"base_model": data["base_model"], "merge_method": "ties",
                "models": [{"model": e, "parameters": {"density": 0.5, "weight": 1.0}}
                           for e in data["models"]], "parameters": {key: value}}
    elif case.startswith("LoRA"):
        change = {"LoRA rank 0": {"factor": (0, 8)}, "LoRA 1-D factor": {"factor": (8,)},
                  "LoRA r 0": {"r": 0}, "LoRA alpha string": {"lora_alpha": "abc"},
                  "LoRA alpha_pattern regex": {"alpha_pattern": {"q_proj(": 2}},
                  "LoRA on the embedding": {"embedding": True,
                                            "target_modules": ["q_proj", "embed_tokens"]}}[case]
        data["models"] = [str(_toy_adapter(tmp_path / "ad", change))]
    else:  # 400 experts' worth of memory, emulated: a machine with 1 MiB available
        monkeypatch.setattr(memory, "available_memory", lambda: 2**20)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    rc, err = _main(monkeypatch, capsys, "merge", str(recipe), str(tmp_path / "out"), "-q")
    assert rc == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert expect in err
    assert not (tmp_path / "out").exists()


def test_a_side_file_linking_outside_the_base_is_not_copied(toy_models, tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (toy_models["base"] / "notes.txt").symlink_to(secret)
    inside = toy_models["base"] / "real_vocab.txt"
    inside.write_text("a b c")
    (toy_models["base"] / "vocab.txt").symlink_to(inside)  # a link inside the base is fine
    specmerge.merge(recipe_for(toy_models), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "notes.txt").exists()
    assert (tmp_path / "out" / "vocab.txt").read_text() == "a b c"


@pytest.mark.parametrize("method", ["ties", "dare", "task_arithmetic", "tsv_m", "swudi"])
def test_a_zero_size_tensor_merges(tmp_path, method) -> None:
    shapes = {"model.layers.0.mlp.up_proj.weight": (12, 8), "model.empty.weight": (0, 8)}
    base, experts = make_state_dicts(k=2, shapes=shapes)
    models = {"base": write_hf_dir(tmp_path / "b", base),
              "experts": [write_hf_dir(tmp_path / f"e{i}", e) for i, e in enumerate(experts)]}
    for extra in ({}, *([{"parameters": {"trim_scope": "global"}}] if method == "ties" else [])):
        out = tmp_path / f"out{len(extra)}"
        specmerge.merge({**recipe_for(models, method), **extra}, out, progress=False)
        got = load_file(str(out / "model.safetensors"))
        assert got["model.empty.weight"].shape == (0, 8)


OOM = """
import sys, torch
def boom(*a, **k):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
import specmerge.methods.registry as reg
m = reg.get_method("tsv_m")
object.__setattr__(m, "fn", boom)
from specmerge.cli import main
sys.argv = ["specmerge", "merge", sys.argv[1], sys.argv[2], "-q"]
main()
"""


def test_out_of_memory_in_a_method_is_one_line(toy_models, tmp_path) -> None:
    import subprocess
    import sys

    recipe = _recipe_file(toy_models, tmp_path / "r.yaml", "tsv_m")
    res = subprocess.run([sys.executable, "-c", OOM, str(recipe), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("error: tsv_m failed on tensor 'model.layers.0.")
    assert "out of memory" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
