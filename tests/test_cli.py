"""The CLI is a thin layer: commands run, errors are one clean line with exit code 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from conftest import recipe_for
from safetensors.torch import load_file
from typer.testing import CliRunner

from specmerge.cli import app
from specmerge.examples import llama_shape_for, parse_count

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def test_help_on_every_command() -> None:
    for cmd in (["--help"], ["merge", "--help"], ["methods", "--help"], ["inspect", "--help"],
                ["example", "quickstart", "--help"], ["example", "synthetic", "--help"]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 0, (cmd, res.output)
        assert "Usage" in res.output


def test_methods_lists_every_method_with_defaults() -> None:
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    for name in ("weight_average", "task_arithmetic", "ties", "dare", "svc"):
        assert f"\n{name}  [" in res.output
    assert "scaling = 0.3" in res.output and "density = 0.2" in res.output
    assert "drop_rate = 0.5" in res.output and "2306.01708" in res.output
    data = json.loads(runner.invoke(app, ["methods", "--json"]).output)
    ties = next(m for m in data if m["name"] == "ties")
    assert ties["parameters"]["aggregate"]["default"] == "mean"


def test_methods_say_which_stream_in_row_blocks_and_list_mergekit_s() -> None:
    from specmerge.mergekit import MERGEKIT_METHODS, mergekit_methods
    from specmerge.methods import all_methods

    out = runner.invoke(app, ["methods"]).output
    for m in all_methods():
        line = next(x for x in out.splitlines() if x.startswith(f"{m.name}  ["))
        flag = "streams in row blocks" if m.rowwise else "whole tensors"
        assert line.endswith(f"; {flag}]"), line
    assert "\nties  [every floating param; LoRA: densified per tensor; streams in row blocks]" in out
    assert "\nslerp  [every floating param; LoRA: densified per tensor; whole tensors]" in out
    assert len(MERGEKIT_METHODS) == 20
    section = out.split("== mergekit 0.1.5's methods")[1].splitlines()[1:]
    assert [x.split()[0] for x in section] == list(MERGEKIT_METHODS)
    assert "  linear            gta" in section
    data = {m["name"]: m for m in json.loads(runner.invoke(app, ["methods", "--json"]).output)}
    assert data["ties"]["streams"] is True and data["slerp"]["streams"] is False
    assert set(data["gta"]["mergekit"]) == {"linear", "task_arithmetic", "ties", "dare_ties",
                                            "dare_linear", "breadcrumbs", "breadcrumbs_ties"}
    assert {k for k, v in mergekit_methods().items() if v is not None} <= \
        {k for m in data.values() for k in m["mergekit"]}


def test_quickstart_end_to_end(tmp_path: Path) -> None:
    res = runner.invoke(app, ["example", "quickstart", str(tmp_path / "work" / "quickstart")])
    assert res.exit_code == 0, res.output
    (tmp_path / "examples").mkdir()
    shutil.copy(REPO / "examples" / "quickstart.yaml", tmp_path / "examples")
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", str(tmp_path / "examples" / "quickstart.yaml"), str(out),
                              "--quiet"])
    assert res.exit_code == 0, res.output
    assert f"wrote merged model to {out}" in res.output
    card = (out / "README.md").read_text()
    assert "`task_arithmetic`" in card and "**Calibration:** `svc` after `task_arithmetic`" in card
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0 and "parameters: 127,296" in res.output
    # existing output: one clean error line, exit 1, nothing touched
    before = (out / "model.safetensors").read_bytes()
    res = runner.invoke(app, ["merge", str(tmp_path / "examples" / "quickstart.yaml"), str(out)])
    assert res.exit_code == 1 and "error: output" in res.output and "--force" in res.output
    assert (out / "model.safetensors").read_bytes() == before
    # the quickstart experts really load with transformers' Llama
    import pytest
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    sd = load_file(str(out / "model.safetensors"))
    assert torch.equal(model.state_dict()["model.norm.weight"], sd["model.norm.weight"])


def test_merge_cli_options_and_errors(toy_models, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(recipe_for(toy_models, "dare")))  # JSON is valid YAML
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "o"), "--seed", "3",
                              "--workers", "2", "--dtype", "float64", "--shard-size", "1KB",
                              "--quiet"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "o").glob("model-*.safetensors"))) > 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: x\nmodels: [y]\nmerge_method: ties\nparameters: {density: 2}\n")
    res = runner.invoke(app, ["merge", str(bad), str(tmp_path / "o2")])
    assert res.exit_code == 1
    assert "density" in res.output and "(0, 1]" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "no such file or directory" in res.output


def test_synthetic_sizes() -> None:
    assert parse_count("500M") == 500_000_000 and parse_count("1.5B") == 1_500_000_000
    shape = llama_shape_for(500_000_000)
    assert abs(shape.num_params() - 500e6) / 500e6 < 0.03
    assert abs(llama_shape_for(50_000_000).num_params() - 50e6) / 50e6 < 0.1


def test_example_synthetic_small(tmp_path: Path) -> None:
    res = runner.invoke(app, ["example", "synthetic", str(tmp_path / "s"), "--params", "2M",
                              "--experts", "2", "--dtype", "bf16"])
    assert res.exit_code == 0, res.output
    for d in ("base", "expert_1", "expert_2"):
        sd = load_file(str(tmp_path / "s" / d / "model.safetensors"))
        assert all(t.dtype == torch.bfloat16 for t in sd.values())
    res = runner.invoke(app, ["example", "synthetic", str(tmp_path / "s"), "--params", "2M"])
    assert res.exit_code == 1 and "already exists" in res.output


def test_synthetic_vocab_and_hidden_options(tmp_path) -> None:
    shape = llama_shape_for(parse_count("10M"), vocab=128_256, hidden=64)
    assert (shape.vocab, shape.hidden, shape.intermediate, shape.heads) == (128_256, 64, 176, 1)
    assert shape.layers == 1  # the embeddings alone (16.4M) exceed 10M: one layer
    res = runner.invoke(app, ["example", "synthetic", str(tmp_path / "s"), "--params", "2M",
                              "--vocab", "300", "--hidden", "32", "--experts", "1"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "s" / "base" / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["hidden_size"]) == (300, 32)
    res = runner.invoke(app, ["example", "synthetic", str(tmp_path / "t"), "--hidden", "30"])
    assert res.exit_code == 1 and "multiple of 16" in res.output


def test_the_cli_leaves_the_streaming_defaults_to_the_engine() -> None:
    """The CLI passes --block-size, --shard-size and --prefetch only when given (so that an
    output format can refuse what it has no use for), and its help names the engine's
    defaults."""
    import inspect

    from specmerge.cli import merge
    from specmerge.engine import DEFAULT_BLOCK_SIZE
    from specmerge.engine.api import DEFAULT_SHARD_SIZE

    params = inspect.signature(merge).parameters
    assert [params[p].default for p in ("block_size", "shard_size", "prefetch")] == [None] * 3
    text = CliRunner().invoke(app, ["merge", "--help"], env={"COLUMNS": "300"}).output
    assert f"{DEFAULT_BLOCK_SIZE} (the default)" in text
    assert f"{DEFAULT_SHARD_SIZE} (the default)" in text
