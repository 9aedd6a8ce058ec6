"""Real Hugging Face checkpoint layouts: tiny random models built with transformers' config
classes, saved as sharded bf16 checkpoints, merged, and loaded back with transformers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import specmerge  # noqa: E402
from specmerge.engine import plan_recipe  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)
transformers.logging.set_verbosity_error()

COMMON = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
ARCHS = {
    "llama_tied": ("LlamaConfig", "AutoModelForCausalLM", {**COMMON, "tie_word_embeddings": True}),
    "llama": ("LlamaConfig", "AutoModelForCausalLM", {**COMMON, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "AutoModelForCausalLM", COMMON),
    "mistral": ("MistralConfig", "AutoModelForCausalLM", COMMON),
    "gemma": ("GemmaConfig", "AutoModelForCausalLM", {**COMMON, "head_dim": 8}),
    "phi": ("PhiConfig", "AutoModelForCausalLM", COMMON),
    "gpt2": ("GPT2Config", "AutoModelForCausalLM",
             {"vocab_size": 96, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
              "bos_token_id": 1, "eos_token_id": 2}),
    "phi3": ("Phi3Config", "AutoModelForCausalLM", {**COMMON, "pad_token_id": 0}),
    "bert": ("BertConfig", "AutoModel",
             {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64}),
}
METHODS = {
    "task_arithmetic": {"merge_method": "task_arithmetic"},
    "ties": {"merge_method": "ties"},
    "task_arithmetic+svc": {"merge_method": "task_arithmetic", "calibrate": {"method": "svc"}},
    "tsv_m": {"merge_method": "tsv_m"},
    "swudi": {"merge_method": "swudi"},
    "swudi_a+svc": {"merge_method": "swudi_a", "calibrate": {"method": "svc"}},
}


def build(arch: str, root: Path, k: int = 2, dtype: torch.dtype = torch.bfloat16,
          seed: int = 0) -> tuple[Path, list[Path]]:
    """A base and k experts (base + small random task vectors), bf16, in 3+ shards."""
    config_cls, auto_cls, kwargs = ARCHS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, auto_cls).from_config(config).to(dtype)
    dirs = []
    for i in range(k + 1):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn_like(p))
        d = root / arch / ("base" if i == 0 else f"expert_{i}")
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(d, max_shard_size=max(size // 4, 20_000))
        dirs.append(d)
        if i == 0:
            base_sd = {n: p.clone() for n, p in model.state_dict().items()}
        else:
            model.load_state_dict(base_sd)
    return dirs[0], dirs[1:]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("llm")
    return {arch: build(arch, root) for arch in ARCHS}


def _load(arch: str, path: Path):
    _, auto_cls, _ = ARCHS[arch]
    return getattr(transformers, auto_cls).from_pretrained(path, output_loading_info=True)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_matrix(models, tmp_path, arch, method) -> None:
    base, experts = models[arch]
    assert len(list(base.glob("*.safetensors"))) >= 3
    recipe = {"base_model": str(base), "models": [str(e) for e in experts], **METHODS[method]}
    out = specmerge.merge(recipe, tmp_path / "out", progress=False).out_dir
    model, info = _load(arch, out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    ref, _ = _load(arch, base)
    assert next(model.parameters()).dtype == next(ref.parameters()).dtype == torch.bfloat16
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        tied = (model.get_output_embeddings().weight.data_ptr()
                == model.get_input_embeddings().weight.data_ptr())
        ref_tied = (ref.get_output_embeddings().weight.data_ptr()
                    == ref.get_input_embeddings().weight.data_ptr())
        assert tied == ref_tied
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        if arch == "bert":
            assert torch.isfinite(model(input_ids=ids).last_hidden_state).all()
        else:
            gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
            assert gen.shape == (1, 7)


def _to_linear(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    conv = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    return {n: (t.T.contiguous() if n.endswith(conv) else t) for n, t in sd.items()}


@pytest.mark.parametrize("method", ["swudi", "task_arithmetic+svc"])
def test_gpt2_conv1d_is_merged_in_linear_orientation(tmp_path, method) -> None:
    from safetensors.torch import load_file

    base, experts = build("gpt2", tmp_path, k=3, dtype=torch.float32, seed=3)
    recipe = {"base_model": str(base), "models": [str(e) for e in experts], **METHODS[method],
              "scope": {"split_fused": False}}  # c_attn whole here; its blocks: next test
    out = specmerge.merge(recipe, tmp_path / "out", progress=False).out_dir
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(str(f)))

    def sd(d: Path) -> dict[str, torch.Tensor]:
        tensors = {}
        for f in d.glob("*.safetensors"):
            tensors.update(load_file(str(f)))
        return tensors

    # the same merge on the weights in Linear orientation (no config: plain linear roles)
    ref = specmerge.merge_state_dicts(recipe, _to_linear(sd(base)),
                                      [_to_linear(sd(e)) for e in experts])
    ref = _to_linear(ref)  # and back
    for name, t in ref.items():
        err = float((got[name] - t).norm() / t.norm().clamp_min(1e-30))
        assert err < 1e-6, (name, err)
    plan = {e.name: e for e in plan_recipe(recipe).entries}
    assert plan["transformer.wte.weight"].role == "embedding"
    assert plan["transformer.wpe.weight"].role == "embedding"
    assert plan["transformer.h.0.attn.c_attn.weight"].transpose
    if method == "swudi":  # embeddings take the fallback, not the matrix method
        assert plan["transformer.wte.weight"].action == "fallback"
        assert plan["transformer.wpe.weight"].action == "fallback"


def test_remote_code_files_are_copied_and_checked(tmp_path) -> None:
    from specmerge.errors import OutputError

    base, experts = build("llama", tmp_path, k=1)
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig",
                       "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (base / "config.json").write_text(json.dumps(cfg))
    recipe = {"base_model": str(base), "models": [str(e) for e in experts],
              "merge_method": "task_arithmetic"}
    with pytest.raises(OutputError, match="configuration_tiny.py is not in the base directory"):
        specmerge.merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    for f in ("configuration_tiny.py", "modeling_tiny.py", "LICENSE", "params.json",
              "processor_config.json"):
        (base / f).write_text("# " + f)
    out = specmerge.merge(recipe, tmp_path / "out", progress=False).out_dir
    for f in ("configuration_tiny.py", "modeling_tiny.py", "LICENSE", "params.json",
              "processor_config.json", "generation_config.json"):
        assert (out / f).read_text() == (base / f).read_text(), f
    assert not list(out.glob("*.index.json")) or (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("stored_by", ["expert", "base"])
def test_tied_head_stored_by_only_some_inputs(tmp_path, stored_by) -> None:
    """A .bin saved from state_dict() keeps lm_head.weight; save_pretrained drops the tied copy.
    Either way the merge runs and writes what the base writes."""
    base, experts = build("llama_tied", tmp_path, k=2)
    odd = experts[0] if stored_by == "expert" else base
    model = transformers.AutoModelForCausalLM.from_pretrained(odd)
    for f in odd.glob("*.safetensors*"):
        f.unlink()
    torch.save(model.state_dict(), odd / "pytorch_model.bin")
    assert "lm_head.weight" in torch.load(odd / "pytorch_model.bin", weights_only=True)
    recipe = {"base_model": str(base), "models": [str(e) for e in experts],
              "merge_method": "task_arithmetic", "calibrate": {"method": "svc"}}
    out = specmerge.merge(recipe, tmp_path / "out", progress=False).out_dir
    from specmerge.io.checkpoint import Checkpoint

    assert ("lm_head.weight" in Checkpoint(out).infos) == (stored_by == "base")
    merged, info = _load("llama_tied", out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (merged.get_output_embeddings().weight.data_ptr()
            == merged.get_input_embeddings().weight.data_ptr())


def test_model_card_follows_hub_conventions(tmp_path) -> None:
    import yaml

    base, experts = build("gpt2", tmp_path, k=2, dtype=torch.float32)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "openai-community/gpt2"}))
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump({"base_model": "../gpt2/base",
                                      "models": ["../gpt2/expert_1", "../gpt2/expert_2"],
                                      "merge_method": "swudi", "calibrate": {"method": "svc"}}))
    card = (specmerge.merge(recipe, tmp_path / "out", progress=False).out_dir
            / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front == {"base_model": "openai-community/gpt2", "library_name": "transformers",
                     "tags": ["merge", "specmerge", "swudi"]}
    assert "- base: `base`" in card and "- expert 2: `expert_2`" in card  # under gpt2/
    assert "common directory" in card and str(tmp_path) not in card
    rows = [ln for ln in card.splitlines() if ln.startswith("| `")]
    conv = next(r for r in rows if "attn.c_attn.weight" in r)
    assert "transformer.h.*.attn.c_attn.weight" in conv and "| 2 |" in conv
    assert "Conv1D: merged transposed" in conv and "| yes |" in conv
    wte = next(r for r in rows if "wte.weight" in r)
    assert "embedding" in wte and "fallback `average`" in wte
    # a local path in _name_or_path is not a Hub id: the base directory's name is used
    (base / "config.json").write_text(json.dumps({**cfg, "_name_or_path": str(base)}))
    card = (specmerge.merge(recipe, tmp_path / "out2", progress=False).out_dir
            / "README.md").read_text()
    assert 'base_model: "base"' in card


CONFIG_CODE = '''from transformers import LlamaConfig


class TinyConfig(LlamaConfig):
    model_type = "tiny_llama"
'''
MODELING_CODE = '''from transformers import LlamaForCausalLM

from .configuration_tiny import TinyConfig


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
'''


def test_trust_remote_code_base_merges_into_a_loadable_output(tmp_path) -> None:
    base, experts = build("llama", tmp_path, k=2)
    for d in (base, *experts):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(model_type="tiny_llama", architectures=["TinyForCausalLM"],
                   auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                             "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
        (d / "config.json").write_text(json.dumps(cfg))
    (base / "configuration_tiny.py").write_text(CONFIG_CODE)
    (base / "modeling_tiny.py").write_text(MODELING_CODE)
    recipe = {"base_model": str(base), "models": [str(e) for e in experts],
              "merge_method": "swudi", "calibrate": {"method": "svc"}}
    out = specmerge.merge(recipe, tmp_path / "out", progress=False).out_dir
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, output_loading_info=True)
    assert type(model).__name__ == "TinyForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # roles were inferred for the unknown model type: the embedding is not a matrix parameter
    plan = {e.name: e for e in plan_recipe(recipe).entries}
    assert plan["model.embed_tokens.weight"].role == "embedding"
    assert plan["model.embed_tokens.weight"].action == "fallback"
    with torch.no_grad():
        assert model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=2, do_sample=False,
                              pad_token_id=0).shape == (1, 5)


def test_added_tokens_with_the_base_vocabulary(tmp_path, caplog) -> None:
    from specmerge.errors import IncompatibleCheckpointError

    base, experts = build("llama", tmp_path, k=2)
    model = transformers.AutoModelForCausalLM.from_pretrained(experts[1])
    model.resize_token_embeddings(99)  # a fine-tune that added 3 tokens
    experts[1] = tmp_path / "expert_added"
    model.save_pretrained(experts[1])
    recipe = {"base_model": str(base), "models": [str(e) for e in experts],
              "merge_method": "task_arithmetic", "calibrate": {"method": "svc"}}
    with pytest.raises(IncompatibleCheckpointError, match=r"adds 3 token.*tokenizer: \{source: base\}"):
        specmerge.merge(recipe, tmp_path / "out", progress=False)
    with caplog.at_level("WARNING"):
        out = specmerge.merge({**recipe, "tokenizer": {"source": "base"}}, tmp_path / "out",
                              progress=False).out_dir
    assert "dropping the 3 row(s)" in caplog.text
    merged, info = _load("llama", out)
    assert merged.get_input_embeddings().weight.shape[0] == 96
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # the kept rows are merged as usual: row 5 of the embedding from the two experts' rows 5
    from safetensors.torch import load_file

    def emb(d):
        return next(load_file(str(f))["model.embed_tokens.weight"] for f in d.glob("*.safetensors")
                    if "model.embed_tokens.weight" in load_file(str(f)))

    e0, e1, b = emb(experts[0]), emb(experts[1]), emb(base)
    want = b[:96].float() + 0.3 * ((e0[:96].float() - b.float()) + (e1[:96].float() - b.float()))
    torch.testing.assert_close(emb(out).float(), want.to(torch.bfloat16).float())
    with pytest.raises(specmerge.SpecmergeError, match="'.*expert_2' is neither the base_model"):
        specmerge.load_recipe({**recipe, "tokenizer": {"source": "expert_2"}})


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in d.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("arch, name, sizes, transpose", [
    ("gpt2", "transformer.h.1.attn.c_attn.weight", (32, 32, 32), True),
    ("phi3", "model.layers.1.self_attn.qkv_proj.weight", (32, 16, 16), False),  # GQA: 4 q, 2 kv
    ("phi3", "model.layers.0.mlp.gate_up_proj.weight", (64, 64), False),
])
def test_fused_projections_are_merged_block_by_block(tmp_path, arch, name, sizes,
                                                     transpose) -> None:
    from specmerge.methods.interference import swudi

    base, experts = build(arch, tmp_path, k=3, dtype=torch.float32, seed=5)
    recipe = {"base_model": str(base), "models": [str(e) for e in experts],
              "merge_method": "swudi"}
    entry = next(e for e in plan_recipe(recipe).entries if e.name == name)
    assert entry.role == "fused" and entry.blocks is not None
    assert entry.blocks.sizes == sizes and entry.transpose == transpose
    got = _tensors(specmerge.merge(recipe, tmp_path / "out", progress=False).out_dir)[name]
    b = _tensors(base)[name]
    taus = [_tensors(e)[name] - b for e in experts]
    if transpose:
        taus = [t.T.contiguous() for t in taus]
    blocks = [t.split(list(sizes)) for t in taus]
    want = torch.cat([swudi([bl[j] for bl in blocks]) for j in range(len(sizes))])
    want = b + (want.T if transpose else want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    whole = specmerge.merge({**recipe, "scope": {"split_fused": False}}, tmp_path / "whole",
                            progress=False).out_dir
    assert not torch.allclose(_tensors(whole)[name], got)  # splitting changes the merge


def test_gpt_neox_blocks_interleaved_per_head_are_regrouped() -> None:
    from specmerge.engine import matrix_apply
    from specmerge.plan import PlanEntry
    from specmerge.roles import Blocks

    heads, d, hidden = 4, 3, 5
    # rows [head0: q0 q0 q0 k0 k0 k0 v0 v0 v0][head1: …]: give each row its block's id (0, 1, 2)
    ids = torch.arange(3).repeat_interleave(d).repeat(heads).float()
    t = ids[:, None].expand(heads * 3 * d, hidden).contiguous()
    entry = PlanEntry("x.query_key_value.weight", tuple(t.shape), torch.float32, "method",
                      False, True, role="fused", blocks=Blocks((heads * d,) * 3, interleave=heads))
    seen = []

    def record(ts):
        seen.append(float(ts[0].mean()))
        assert (ts[0] == ts[0][0, 0]).all()  # one block: every row from the same q, k or v
        return ts[0] * 10

    out = matrix_apply(entry, record, [t])
    assert seen == [0.0, 1.0, 2.0]
    torch.testing.assert_close(out, t * 10)  # put back in the interleaved layout


def _tiny_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(92)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="</s>").save_pretrained(directory)


def test_added_tokens_with_the_union_vocabulary(tmp_path) -> None:
    base, experts = build("llama", tmp_path, k=2)
    for d in (base, *experts):
        _tiny_tokenizer(d)
    added = tmp_path / "expert_added"
    tok = transformers.AutoTokenizer.from_pretrained(experts[1])
    tok.add_tokens(["<tool>", "<think>"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    model = transformers.AutoModelForCausalLM.from_pretrained(experts[1])
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():  # give the new rows values of their own
        model.get_input_embeddings().weight[96:] = torch.randn(3, 32).to(torch.bfloat16)
        model.get_output_embeddings().weight[96:] = torch.randn(3, 32).to(torch.bfloat16)
    model.save_pretrained(added)
    tok.save_pretrained(added)
    recipe = {"base_model": str(base), "models": [str(experts[0]), str(added)],
              "merge_method": "swudi", "calibrate": {"method": "svc"},
              "tokenizer": {"source": "union"}}
    out = specmerge.merge(recipe, tmp_path / "out", progress=False).out_dir
    merged_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(merged_tok) == 99
    assert merged_tok.encode("w5 <tool> <think> <|im_end|>", add_special_tokens=False) == [
        9, 96, 97, 98]
    merged, info = _load("llama", out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert merged.config.vocab_size == 99
    got, src = _tensors(out), _tensors(added)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape == (99, 32)
        assert torch.equal(got[name][96:], src[name][96:]), name  # only this expert has them
    # the base's rows are merged as usual: the same as a merge without the added tokens
    plain = specmerge.merge({**recipe, "tokenizer": {"source": "base"}}, tmp_path / "plain",
                            progress=False).out_dir
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(got[name][:96], _tensors(plain)[name])
    with torch.no_grad():
        ids = merged_tok("w5 <tool>", return_tensors="pt").input_ids
        assert merged.generate(ids, max_new_tokens=2, do_sample=False,
                               pad_token_id=0).shape[1] == ids.shape[1] + 2


def test_union_without_added_tokens_is_the_base_vocabulary(tmp_path) -> None:
    base, experts = build("llama", tmp_path, k=2)
    for d in (base, *experts):
        _tiny_tokenizer(d)
    recipe = {"base_model": str(base), "models": [str(e) for e in experts],
              "merge_method": "task_arithmetic"}
    union = specmerge.merge({**recipe, "tokenizer": {"source": "union"}}, tmp_path / "u",
                            progress=False).out_dir
    plain = specmerge.merge(recipe, tmp_path / "p", progress=False).out_dir
    assert _tensors(union).keys() == _tensors(plain).keys()
    assert all(torch.equal(_tensors(union)[n], t) for n, t in _tensors(plain).items())
    assert json.loads((union / "config.json").read_text())["vocab_size"] == 96
