"""PEFT LoRA adapters as experts: τ = s·B·A on the targeted weights, read without peft, checked
against peft's own merge_and_unload on adapters that peft saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import specmerge  # noqa: E402
from specmerge.errors import CheckpointError, IncompatibleCheckpointError  # noqa: E402

transformers.logging.set_verbosity_error()


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in d.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def llama(root: Path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base")
    return root / "base"


def adapter(base: Path, out: Path, seed: int, cls=transformers.AutoModelForCausalLM,
            **lora) -> Path:
    torch.manual_seed(seed)
    model = cls.from_pretrained(base, torch_dtype="auto")
    pm = peft.get_peft_model(model, peft.LoraConfig(**lora))
    with torch.no_grad():  # peft starts B at zero: give every factor values
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(out)
    return out


def peft_merged(base: Path, ad: Path, cls=transformers.AutoModelForCausalLM):
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(base, torch_dtype="auto"), ad)
    return {k: v for k, v in model.merge_and_unload().state_dict().items()}


def test_one_adapter_at_lambda_1_equals_peft_merge_and_unload(tmp_path) -> None:
    base = llama(tmp_path)
    ad = adapter(base, tmp_path / "ad", 1, r=4, lora_alpha=8, layers_to_transform=[1],
                 target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"])
    recipe = {"base_model": str(base), "models": [str(ad)], "merge_method": "task_arithmetic",
              "parameters": {"scaling": 1.0}}
    got = _tensors(specmerge.merge(recipe, tmp_path / "out", progress=False).out_dir)
    want = peft_merged(base, ad)
    b = _tensors(base)
    for name, t in got.items():
        torch.testing.assert_close(t, want[name], rtol=1e-6, atol=1e-6)
    # layers_to_transform: layer 0 untouched; modules_to_save: lm_head replaced whole
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                       b["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(got["lm_head.weight"], b["lm_head.weight"])


def test_gpt2_rslora_fan_in_fan_out_adapter(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    ad = adapter(base, tmp_path / "ad", 2, r=2, lora_alpha=4, use_rslora=True,
                 fan_in_fan_out=True, target_modules=["c_attn", "c_fc"])
    assert json.loads((ad / "adapter_config.json").read_text())["use_rslora"]
    recipe = {"base_model": str(base), "models": [str(ad)], "merge_method": "task_arithmetic",
              "parameters": {"scaling": 1.0}}
    got = _tensors(specmerge.merge(recipe, tmp_path / "out", progress=False).out_dir)
    want = peft_merged(base, ad)
    for name, t in got.items():
        torch.testing.assert_close(t, want[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", [
    {"merge_method": "task_arithmetic", "calibrate": {"method": "svc"}},
    {"merge_method": "swudi"},
    {"merge_method": "tsv_m", "calibrate": {"method": "svc"}},  # low-rank τ: rank cutoff
    {"merge_method": "iso_c"}])
def test_dense_experts_and_adapters_mix(tmp_path, method) -> None:
    base = llama(tmp_path)
    ads = [adapter(base, tmp_path / f"ad{i}", 3 + i, r=4, lora_alpha=16,
                   target_modules=["q_proj", "k_proj", "up_proj"]) for i in range(2)]
    def save_dense(sd, out: Path) -> Path:
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        model.load_state_dict(sd)
        model.save_pretrained(out)
        return out

    dense = save_dense(peft_merged(base, ads[1]), tmp_path / "dense")
    recipe = {"base_model": str(base), "models": [str(ads[0]), str(dense)], **method}
    mixed = _tensors(specmerge.merge(recipe, tmp_path / "mixed", progress=False).out_dir)
    d0 = save_dense(peft_merged(base, ads[0]), tmp_path / "dense0")
    all_dense = _tensors(specmerge.merge({**recipe, "models": [str(d0), str(dense)]},
                                         tmp_path / "dense_out", progress=False).out_dir)
    for name, t in all_dense.items():
        if method["merge_method"] in ("tsv_m", "iso_c"):  # polar factors / a flat spectrum of
            # a rank-8 sum: float32 rounding of the two routes to τ differs at 1e-5 relative
            err = float((mixed[name] - t).norm() / (t - _tensors(base)[name]).norm().clamp_min(1e-30))
            assert err < 1e-4, (name, err)
        else:
            torch.testing.assert_close(mixed[name], t, rtol=1e-5, atol=1e-6)


def test_refusals_and_warnings(tmp_path, caplog) -> None:
    base = llama(tmp_path)
    ad = adapter(base, tmp_path / "ad", 5, r=2, lora_alpha=4, target_modules=["q_proj"])
    recipe = {"base_model": str(base), "models": [str(ad)], "merge_method": "task_arithmetic"}
    cfg_path = ad / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA"):
        specmerge.merge(recipe, tmp_path / "o1", progress=False)
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="peft_type 'IA3' is not supported"):
        specmerge.merge(recipe, tmp_path / "o2", progress=False)
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": "someone/else"}))
    with caplog.at_level("WARNING"):
        specmerge.merge(recipe, tmp_path / "o3", progress=False)
    assert "names 'someone/else' as its base" in caplog.text
    other = tmp_path / "other"
    cfg_small = transformers.LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg_small).save_pretrained(other)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleCheckpointError, match="does not make the base's shape"):
        specmerge.merge({**recipe, "base_model": str(other)}, tmp_path / "o4", progress=False)


@pytest.fixture(scope="module")
def three_adapters(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    """A float64 base, three LoRA adapters on every linear, and the same experts densified by
    peft (float64, so that θ_i = θ0 + τ_i is stored without float32 rounding)."""
    root = tmp_path_factory.mktemp("lora3")
    cls = transformers.AutoModelForCausalLM
    cls.from_pretrained(llama(root), torch_dtype=torch.float64).save_pretrained(root / "b64")
    base = root / "b64"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ads = [adapter(base, root / f"ad{i}", 10 + i, r=4 + 2 * i, lora_alpha=8,
                   target_modules=targets) for i in range(3)]
    dense = []
    for i, ad in enumerate(ads):
        model = cls.from_pretrained(base, torch_dtype=torch.float64)
        model.load_state_dict(peft_merged(base, ad))
        model.save_pretrained(root / f"dense{i}")
        dense.append(root / f"dense{i}")
    return base, ads, dense


@pytest.mark.parametrize("method", [
    "task_arithmetic", "tsv_m+svc", "iso_c+svc", "iso_cts+svc", "star", "wudi_closed_form+svc",
    "swudi", "swudi_a+svc", "ties+svc"])
def test_adapters_merge_like_their_densified_experts(tmp_path, three_adapters, method) -> None:
    """The factored path (adapters) and the dense path (peft-merged full experts) agree to
    1e-5 relative per merged update, in float64 (float32: test_lowrank, on exact τ)."""
    base, ads, dense = three_adapters
    name, _, cal = method.partition("+")
    recipe = {"base_model": str(base), "merge_method": name, "dtype": "float64",
              **({"calibrate": {"method": cal}} if cal else {})}
    got = _tensors(specmerge.merge({**recipe, "models": [str(a) for a in ads]}, tmp_path / "f",
                                   progress=False).out_dir)
    want = _tensors(specmerge.merge({**recipe, "models": [str(d) for d in dense]},
                                    tmp_path / "d", progress=False).out_dir)
    b = _tensors(base)
    for key, t in want.items():
        update = t - b[key]
        if update.abs().max() == 0:
            assert torch.equal(got[key], t), key  # untouched by every adapter: θ0 exactly
            continue
        err = float((got[key] - t).norm() / update.norm())
        assert err < 1e-5, (key, err)


def _update(model_sd: dict[str, torch.Tensor], base_sd: dict[str, torch.Tensor], key: str
            ) -> torch.Tensor:
    return model_sd[key].double() - base_sd[key].double()


@pytest.mark.parametrize("method,rank,exact", [
    ({"merge_method": "swudi", "calibrate": {"method": "svc"}}, None, False),
    ({"merge_method": "task_arithmetic", "parameters": {"scaling": 0.5}}, 64, True),
    ({"merge_method": "ties"}, 3, False)])  # element-wise: a truncated dense SVD
def test_peft_output_loads_and_reproduces_the_merged_update(tmp_path, three_adapters, method,
                                                            rank, exact) -> None:
    base, ads, _ = three_adapters
    recipe = {"base_model": str(base), "models": [str(a) for a in ads], **method}
    full = _tensors(specmerge.merge(recipe, tmp_path / "full", progress=False).out_dir)
    out = specmerge.merge({**recipe, "output": {"format": "peft", "rank": rank}},
                          tmp_path / "ad", progress=False).out_dir
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] <= (rank or 8) and cfg["lora_alpha"] == cfg["r"]
    assert set(cfg["rank_pattern"]) == set(cfg["alpha_pattern"])
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "relative error" in card
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float64), out)
    merged = model.merge_and_unload().state_dict()
    b = _tensors(base)
    errors = {}
    for line in card.splitlines():  # | `name` | rank | error |
        if line.startswith("| `"):
            cells = [c.strip(" `") for c in line.strip("|").split("|")]
            errors[cells[0]] = float(cells[2])
    assert errors, card
    for key in full:
        if key not in errors:  # not targeted: the base, in both outputs
            torch.testing.assert_close(merged[key], b[key])
            continue
        want_update = _update(full, b, key)
        err = float((_update(merged, b, key) - want_update).norm() / want_update.norm())
        if exact:  # the factors are stored in the adapters' float32: the card's value and the
            # update read back are both float32 rounding (the card said 0.0 and the read-back was
            # 9.6e-7 here, 1.01e-6 under MKL_CBWR=COMPATIBLE), compared to that level
            assert err < 2e-6 and errors[key] < 2e-6, key
        else:
            assert err == pytest.approx(errors[key], rel=5e-3, abs=1e-6), key  # as the card says
    if exact:  # rank 64 fits every task arithmetic update (rank <= 4 + 6 + 8): float32 rounding
        assert max(errors.values()) < 2e-6
    else:
        assert max(errors.values()) > 1e-3  # truncated


@pytest.mark.parametrize("method", [
    {"merge_method": "swudi_a", "calibrate": {"method": "svc"}},
    {"merge_method": "ties", "parameters": {"trim_scope": "global"}}])  # + a statistic pass
def test_peft_output_reads_no_base_weight(tmp_path, three_adapters, monkeypatch, method) -> None:
    from specmerge.io.checkpoint import Checkpoint

    base, ads, _ = three_adapters
    real, reads = Checkpoint.read, []

    def spy(self, name: str):
        if self.path == base.resolve() or base.resolve() in self.path.parents:
            reads.append(name)
        return real(self, name)

    monkeypatch.setattr(Checkpoint, "read", spy)
    recipe = {"base_model": str(base), "models": [str(a) for a in ads], **method}
    out = specmerge.merge(recipe, tmp_path / "ad", output_format="peft", progress=False).out_dir
    assert (out / "adapter_model.safetensors").is_file()
    assert reads == []
    again = specmerge.merge(recipe, tmp_path / "ad2", output_format="peft", workers=2,
                            progress=False).out_dir
    for f in ("adapter_model.safetensors", "adapter_config.json", "README.md"):  # same bytes
        assert (out / f).read_bytes() == (again / f).read_bytes(), f


def test_a_peft_output_re_runs_to_the_same_files(tmp_path, three_adapters, monkeypatch) -> None:
    """A re-run of an adapter's resolved recipe, which sits elsewhere than the recipe it came
    from, from another current directory, writes every file again byte for byte (the card
    named the inputs relative to the recipe's directory)."""
    import os

    import yaml

    base, ads, _ = three_adapters
    here = tmp_path / "recipes" / "deep"
    here.mkdir(parents=True)
    (here / "r.yaml").write_text(yaml.safe_dump({
        "base_model": os.path.relpath(base, here),
        "models": [os.path.relpath(a, here) for a in ads], "merge_method": "task_arithmetic",
        "output": {"format": "peft", "rank": 4}}))
    first = specmerge.merge(here / "r.yaml", tmp_path / "a", progress=False).out_dir
    monkeypatch.chdir(here)
    again = specmerge.merge(first / "specmerge_recipe.yaml", tmp_path / "x" / "b",
                            progress=False).out_dir
    files = sorted(p.name for p in first.iterdir())
    assert "README.md" in files and sorted(p.name for p in again.iterdir()) == files
    for name in files:
        assert (again / name).read_bytes() == (first / name).read_bytes(), name


def test_peft_output_refusals(tmp_path, three_adapters) -> None:
    base, ads, dense = three_adapters
    recipe = {"base_model": str(base), "models": [str(ads[0]), str(dense[1])],
              "merge_method": "task_arithmetic", "output": {"format": "peft"}}
    with pytest.raises(specmerge.SpecmergeError, match=r"models\[1\].*full checkpoint"):
        specmerge.merge(recipe, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(specmerge.SpecmergeError, match="output rank"):
        specmerge.merge({**recipe, "output": {"format": "peft", "rank": 0}}, tmp_path / "x",
                        progress=False)
    with pytest.raises(specmerge.SpecmergeError, match="format"):
        specmerge.merge({**recipe, "output": {"format": "gguf"}}, tmp_path / "x",
                        progress=False)
    with pytest.raises(specmerge.SpecmergeError, match="applies to format peft"):
        specmerge.merge({**recipe, "output": {"rank": 4}}, tmp_path / "x", progress=False)
    # a NaN in an adapter's factor: named, and no output (even with allow_nonfinite)
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((ads[0] / "adapter_config.json").read_text())
    tensors = load_file(str(ads[0] / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    nan_recipe = {**recipe, "models": [str(bad)]}
    with pytest.raises(specmerge.SpecmergeError, match="NaN"):
        specmerge.merge(nan_recipe, tmp_path / "x", progress=False)
    with pytest.raises(specmerge.SpecmergeError, match="q_proj.*NaN/Inf"):
        specmerge.merge(nan_recipe, tmp_path / "x", allow_nonfinite=True, progress=False)
    assert not (tmp_path / "x").exists()


def test_peft_output_of_gpt2_conv1d_adapters(tmp_path) -> None:
    """fan_in_fan_out adapters (GPT-2's Conv1D, stored (in, out)) give a fan_in_fan_out output
    whose update equals the full merge's."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    ads = [adapter(base, tmp_path / f"ad{i}", 20 + i, r=2, lora_alpha=4, fan_in_fan_out=True,
                   target_modules=["c_attn", "c_fc"]) for i in range(2)]
    recipe = {"base_model": str(base), "models": [str(a) for a in ads],
              "merge_method": "task_arithmetic", "parameters": {"scaling": 1.0}}
    full = _tensors(specmerge.merge(recipe, tmp_path / "full", progress=False).out_dir)
    out = specmerge.merge(recipe, tmp_path / "ad", output_format="peft", rank=4,
                          progress=False).out_dir
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"]
    model = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base), out)
    merged = model.merge_and_unload().state_dict()
    for key, t in full.items():
        if key in merged:
            torch.testing.assert_close(merged[key], t, rtol=1e-5, atol=1e-6)


def test_cli_writes_a_peft_adapter(tmp_path, three_adapters) -> None:
    import yaml
    from typer.testing import CliRunner

    from specmerge.cli import app

    base, ads, _ = three_adapters
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base_model": str(base), "models": [str(a) for a in ads],
                                      "merge_method": "tsv_m"}))
    res = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "o"), "-q",
                                   "--output-format", "peft", "--rank", "4"])
    assert res.exit_code == 0, res.output
    assert "wrote LoRA adapter" in res.output
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["r"] == 4
    bad = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "p"), "-q",
                                   "--output-format", "gguf"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    assert "format" in bad.output and not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def saved_module_adapters(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A bf16 base and two adapters on q_proj/up_proj, one of which also saves lm_head whole
    (``modules_to_save``), so that the embedding, the norms and lm_head can go by rows."""
    root = tmp_path_factory.mktemp("lora-rows")
    cls = transformers.AutoModelForCausalLM
    cls.from_pretrained(llama(root), torch_dtype=torch.bfloat16).save_pretrained(root / "b16")
    base = root / "b16"
    ads = [adapter(base, root / "ad0", 21, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                   modules_to_save=["lm_head"]),
           adapter(base, root / "ad1", 22, r=2, lora_alpha=4, target_modules=["q_proj"])]
    return base, ads


@pytest.mark.parametrize("method,extra", [
    ("task_arithmetic", {}), ("ties", {}), ("ties", {"parameters": {"trim_scope": "global"}}),
    ("dare", {"seed": 3}), ("weight_average", {})])
def test_adapters_merge_by_rows_where_they_do_not_target(tmp_path, saved_module_adapters,
                                                         monkeypatch, method, extra) -> None:
    """With adapter experts, the tensors no LoRA targets (untouched: τ = 0; saved whole:
    positioned reads of the saved rows) go in row blocks, with the whole-tensor bytes."""
    from conftest import tree_hash

    import specmerge.io.writer as writer

    base, ads = saved_module_adapters
    recipe = {"base_model": str(base), "models": [str(a) for a in ads], "merge_method": method,
              **extra}
    whole = specmerge.merge(recipe, tmp_path / "whole", block_size="1GiB", progress=False)
    by_rows: list[str] = []
    real = writer.Region.write_rows

    def spy(self: writer.Region, start: int, rows: torch.Tensor) -> None:
        by_rows.append(self.name)
        real(self, start, rows)

    monkeypatch.setattr(writer.Region, "write_rows", spy)
    rows = specmerge.merge(recipe, tmp_path / "rows", block_size="256B", progress=False)
    assert tree_hash(rows.out_dir) == tree_hash(whole.out_dir)
    went = set(by_rows)
    assert {"model.embed_tokens.weight", "lm_head.weight",
            "model.layers.0.self_attn.k_proj.weight"} <= went  # untouched, saved, untouched
    assert not any("q_proj" in n or "up_proj" in n for n in went)  # LoRA targets: whole
    got, b = _tensors(rows.out_dir), _tensors(base)
    assert torch.equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert not torch.equal(got["lm_head.weight"], b["lm_head.weight"])


def test_nan_in_a_saved_module_read_by_rows_names_the_adapter(tmp_path,
                                                              saved_module_adapters) -> None:
    from safetensors.torch import load_file, save_file

    from specmerge.errors import NonFiniteError

    base, ads = saved_module_adapters
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ads[0].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in sd if k.endswith("lm_head.weight"))  # peft saves it without
    # its "modules_to_save.default" infix
    sd[key][5, 3] = float("nan")
    save_file(sd, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    recipe = {"base_model": str(base), "models": [str(bad), str(ads[1])],
              "merge_method": "ties"}  # TIES does not propagate NaN: the inputs are checked
    for method in ("ties", "task_arithmetic"):
        with pytest.raises(NonFiniteError, match=rf"{bad}.*lm_head.*1 NaN"):
            specmerge.merge({**recipe, "merge_method": method}, tmp_path / f"o-{method}",
                            block_size="256B", progress=False)


@pytest.mark.parametrize(("change", "expect"), [
    ({"r": 0}, "r must be a positive number"),
    ({"r": 4}, "r = 4 for .* but its lora_A has rank 2; peft would refuse"),
    ({"lora_alpha": "abc"}, "lora_alpha must be a positive number, got 'abc'"),
    ({"alpha_pattern": {"q_proj(": 2}}, "alpha_pattern key 'q_proj\\(' is not a regular"),
    ({"rank_pattern": {"q_proj": 3}}, "r = 3 for"),
])
def test_adapter_configs_peft_would_refuse_are_refused(tmp_path, change, expect) -> None:
    base = llama(tmp_path)
    ad = adapter(base, tmp_path / "ad", 5, r=2, lora_alpha=4, target_modules=["q_proj"])
    cfg_path = ad / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    recipe = {"base_model": str(base), "models": [str(ad)], "merge_method": "task_arithmetic"}
    with pytest.raises(CheckpointError, match=expect) as e:
        specmerge.merge(recipe, tmp_path / "out", progress=False)
    assert "adapter_config.json" in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape", [(0, 32), (32,)])
def test_rank_0_or_1d_lora_factors_are_refused(tmp_path, shape) -> None:
    from safetensors.torch import load_file, save_file

    base = llama(tmp_path)
    ad = adapter(base, tmp_path / "ad", 5, r=2, lora_alpha=4, target_modules=["q_proj"])
    f = ad / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sd if "lora_A" in k)
    sd[key] = torch.zeros(shape)
    save_file(sd, str(f))
    recipe = {"base_model": str(base), "models": [str(ad)], "merge_method": "task_arithmetic"}
    with pytest.raises(CheckpointError, match="must be 2-D with rank >= 1"):
        specmerge.merge(recipe, tmp_path / "out", progress=False)


def test_a_lora_on_the_embedding_is_refused_by_name(tmp_path) -> None:
    base = llama(tmp_path)
    ad = adapter(base, tmp_path / "ad", 5, r=2, lora_alpha=4,
                 target_modules=["q_proj", "embed_tokens"])
    recipe = {"base_model": str(base), "models": [str(ad)], "merge_method": "task_arithmetic"}
    with pytest.raises(CheckpointError, match="LoRA on an embedding layer .*lora_embedding"):
        specmerge.merge(recipe, tmp_path / "out", progress=False)


def test_peft_output_refuses_the_options_it_has_no_use_for(tmp_path, three_adapters) -> None:
    """--block-size, --no-prefetch and --shard-size cannot change a PEFT adapter (whole factors,
    one file): given, each is refused by name before anything is read; --workers is honoured
    and gives the same bytes."""
    import yaml
    from conftest import tree_hash
    from typer.testing import CliRunner

    from specmerge.cli import app

    base, ads, _ = three_adapters
    recipe = {"base_model": str(base), "models": [str(a) for a in ads],
              "merge_method": "ties", "output": {"format": "peft"}}
    for option, value, flag in [("block_size", "1MiB", "--block-size"),
                                ("prefetch", False, "--no-prefetch"),
                                ("shard_size", "1GB", "--shard-size")]:
        with pytest.raises(specmerge.SpecmergeError,
                           match=rf"{option} \({flag}\) does not apply to output format peft"):
            specmerge.merge(recipe, tmp_path / "x", progress=False, **{option: value})
        assert not (tmp_path / "x").exists()
    one = specmerge.merge(recipe, tmp_path / "w1", progress=False).out_dir
    two = specmerge.merge(recipe, tmp_path / "w2", workers=2, progress=False).out_dir
    assert tree_hash(one) == tree_hash(two)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "r.yaml"), str(tmp_path / "cli"),
                                   "--block-size", "1MiB", "--quiet"])
    assert res.exit_code == 1 and "does not apply to output format peft" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "cli").exists()
