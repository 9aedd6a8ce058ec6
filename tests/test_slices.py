"""Passthrough of slices (mergekit's layer stacking): output layers copied from chosen layers
of chosen models, config.json's layer count rewritten, the output loads and generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

import specmerge  # noqa: E402
from specmerge.errors import SpecmergeError  # noqa: E402


def _llama(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("slices")
    return _llama(root / "a", 0), _llama(root / "b", 1)


def test_a_mergekit_passthrough_stacks_layers_and_generates(two, tmp_path) -> None:
    """mergekit's orcamini-platy-44layer.yml pattern, small: a's layers 0-1 then b's 0-1 then
    a's 1: a 5-layer model from two 2-layer ones; every tensor is its source's, bit for bit."""
    a, b = two
    mk = {"slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                     {"sources": [{"model": str(b), "layer_range": [0, 2]}]},
                     {"sources": [{"model": str(a), "layer_range": [1, 2]}]}],
          "merge_method": "passthrough", "dtype": "float32"}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(mk))
    out = specmerge.merge(tmp_path / "mk.yml", tmp_path / "out", progress=False).out_dir
    got, ta, tb = _tensors(out), _tensors(a), _tensors(b)
    sources = [(ta, 0), (ta, 1), (tb, 0), (tb, 1), (ta, 1)]
    for j, (src, layer) in enumerate(sources):
        for name, t in src.items():
            if f"layers.{layer}." in name:
                torch.testing.assert_close(got[name.replace(f"layers.{layer}.", f"layers.{j}.")],
                                           t, rtol=0, atol=0)
    assert torch.equal(got["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], ta["lm_head.weight"])  # the last slice's model
    assert len(got) == 2 + 1 + 5 * 9  # embed, head, final norm, 9 tensors per layer
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 5
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, 7)
    # the resolved recipe (specmerge's own form of slices) re-runs to the same bytes
    again = specmerge.merge(out / "specmerge_recipe.yaml", tmp_path / "again",
                            progress=False).out_dir
    assert ((out / "model.safetensors").read_bytes()
            == (again / "model.safetensors").read_bytes())


def test_slices_that_cannot_be_read_are_refused_by_name(two, tmp_path) -> None:
    a, b = two
    past = {"slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]}]}],
            "merge_method": "passthrough"}
    with pytest.raises(SpecmergeError, match=r"no tensor 'model.layers.2.*layer_range"):
        specmerge.merge(past, tmp_path / "x", progress=False)
    part = {"slices": [{"sources": [{"model": str(a), "layer_range": [0, 1]},
                                    {"model": str(b), "layer_range": [0, 1]}]}],
            "merge_method": "slerp", "base_model": str(a), "parameters": {"t": 0.5}}
    with pytest.raises(SpecmergeError, match=r"layer_range \[0, 1\] of models with 2 layers.*"
                                             r"slerp must take every layer"):
        specmerge.merge(part, tmp_path / "x", progress=False)
    two_slices = {**part, "slices": part["slices"] * 2}
    with pytest.raises(SpecmergeError, match="several merged slices are not yet"):
        specmerge.merge(two_slices, tmp_path / "x", progress=False)
    with pytest.raises(SpecmergeError, match="passthrough copies one model"):
        specmerge.merge({"base_model": str(a), "models": [str(b)],
                         "merge_method": "passthrough"}, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_one_merged_slice_over_every_layer_is_the_models_form(two, tmp_path) -> None:
    """mergekit's gradient-slerp.yml pattern: one slice of two sources over every layer, with
    a filtered gradient of t, is the models form of the same recipe, bit for bit."""
    a, b = two
    t = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0]},
         {"value": 0.5}]
    sliced = {"slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]},
                                      {"model": str(b), "layer_range": [0, 2]}]}],
              "merge_method": "slerp", "base_model": str(a), "parameters": {"t": t},
              "dtype": "float32"}
    models = {"models": [{"model": str(a)}, {"model": str(b)}], "merge_method": "slerp",
              "base_model": str(a), "parameters": {"t": t}, "dtype": "float32"}
    one = specmerge.merge(sliced, tmp_path / "s", progress=False).out_dir
    other = specmerge.merge(models, tmp_path / "m", progress=False).out_dir
    assert (one / "model.safetensors").read_bytes() == (other / "model.safetensors").read_bytes()
    ta, tb, got = _tensors(a), _tensors(b), _tensors(one)
    name = "model.layers.1.mlp.down_proj.weight"  # t = 0 at the last layer: a's tensor
    assert torch.equal(got[name], ta[name]) and not torch.equal(got[name], tb[name])


def test_a_passthrough_of_one_model_copies_it(two, tmp_path) -> None:
    """mergekit's passthrough of 'models' (one input, no base_model): the model, in the dtype."""
    a, _ = two
    mk = {"models": [{"model": str(a)}], "merge_method": "passthrough", "dtype": "bfloat16"}
    out = specmerge.merge(mk, tmp_path / "out", progress=False).out_dir
    got, ta = _tensors(out), _tensors(a)
    assert got.keys() == ta.keys()
    assert all(torch.equal(got[n], t.to(torch.bfloat16)) for n, t in ta.items())
    assert yaml.safe_load((out / "specmerge_recipe.yaml").read_text())["models"] == []
