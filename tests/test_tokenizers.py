"""The output's tokenizer (mergekit's tokenizer_source, tokenizer block and chat_template) on
tiny checkpoints with word-level tokenizers written by the test (the tokenizers library only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import specmerge
from specmerge.errors import SpecmergeError
from specmerge.io.chat_template import CHATML
from tests.conftest import make_state_dicts, write_hf_dir

tokenizers = pytest.importorskip("tokenizers")

WORDS = ["<unk>"] + [f"w{i}" for i in range(15)]  # the base's 16 tokens: the embedding's rows
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _tokenizer(d: Path, words: list[str], template: str | None = None) -> None:
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "name": d.name}
    (d / "tokenizer_config.json").write_text(json.dumps(
        cfg if template is None else {**cfg, "chat_template": template}))


@pytest.fixture
def models(tmp_path: Path) -> dict:
    """A base and 2 experts with the base's vocabulary, and an expert that adds <a> and <b>."""
    base, experts = make_state_dicts(k=3)
    gen = torch.Generator().manual_seed(5)
    added = {n: (torch.cat([t, torch.randn(2, 8, generator=gen)]) if n in (EMBED, HEAD) else t)
             for n, t in experts[2].items()}
    dirs = [write_hf_dir(tmp_path / n, sd) for n, sd in
            (("base", base), ("e0", experts[0]), ("e1", experts[1]), ("added", added))]
    for d in dirs[:3]:
        _tokenizer(d, WORDS, template="{{ 'base template' }} {{ messages }}" if d.name == "e1"
                   else None)
    _tokenizer(dirs[3], WORDS + ["<a>", "<b>"])
    return {"base": dirs[0], "e0": dirs[1], "e1": dirs[2], "added": dirs[3], "root": tmp_path,
            "sds": {"base": base, "e0": experts[0], "e1": experts[1], "added": added}}


def _recipe(m: dict, experts: tuple[str, ...] = ("e0", "e1"), **extra) -> dict:
    return {"base_model": str(m["base"]), "models": [str(m[e]) for e in experts],
            "merge_method": "task_arithmetic", "parameters": {"scaling": 0.5}, **extra}


def _merge(recipe: dict, out: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    out = specmerge.merge(recipe, out, progress=False).out_dir
    return out, load_file(str(out / "model.safetensors"))


def test_a_model_with_the_base_vocabulary_gives_its_tokenizer_files(models, tmp_path) -> None:
    plain_dir, plain = _merge(_recipe(models), tmp_path / "plain")
    out, got = _merge(_recipe(models, tokenizer={"source": str(models["e1"])}), tmp_path / "o")
    assert got.keys() == plain.keys() and all(torch.equal(got[n], plain[n]) for n in plain)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["name"] == "e1" and "chat_template" in cfg  # e1's files, not the base's
    assert json.loads((plain_dir / "tokenizer_config.json").read_text())["name"] == "base"
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (plain_dir / "config.json").read_text())  # config.json stays the base's


def test_a_model_that_adds_tokens_gives_its_vocabulary(models, tmp_path) -> None:
    """The tokenizer source 'added' extends the base's vocabulary: its two tokens' rows are its
    own (no other model has them), every other row as with the base's vocabulary."""
    recipe = _recipe(models, ("e0", "added"))
    out, got = _merge({**recipe, "tokenizer": {"source": str(models["added"])}}, tmp_path / "o")
    _, base_vocab = _merge({**recipe, "tokenizer": {"source": "base"}}, tmp_path / "b")
    _, union = _merge({**recipe, "tokenizer": {"source": "union"}}, tmp_path / "u")
    for name in (EMBED, HEAD):
        assert got[name].shape == (18, 8)
        assert torch.equal(got[name][16:], models["sds"]["added"][name][16:])
        assert torch.equal(got[name][:16], base_vocab[name]) and torch.equal(got[name],
                                                                             union[name])
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert (tok.token_to_id("w3"), tok.token_to_id("<b>")) == (4, 17)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 18
    assert json.loads((out / "tokenizer_config.json").read_text())["name"] == "added"


def test_a_tokenizer_source_that_reorders_or_is_no_input_is_refused(models, tmp_path) -> None:
    _tokenizer(models["e1"], list(reversed(WORDS)))
    with pytest.raises(SpecmergeError, match=r"e1: token .* here and .* in the base.*"
                                             r"tokenizer source '.*e1'"):
        _merge(_recipe(models, tokenizer={"source": str(models["e1"])}), tmp_path / "x")
    with pytest.raises(SpecmergeError, match=r"tokenizer.source .* is neither the base_model"):
        _merge(_recipe(models, tokenizer={"source": str(models["root"])}), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_forced_tokens_take_their_source_row(models, tmp_path) -> None:
    """mergekit's tokenizer.tokens with force: every model's row is the source's, so the
    merged row is it: a model's own row, another token's row, or zeros."""
    sds = models["sds"]
    tokens = {"w1": {"source": str(models["e1"]), "force": True},
              "w2": {"source": {"kind": "model_token", "model": str(models["base"]),
                                "token": "w9"}, "force": True},
              "w3": {"source": {"kind": "zero"}, "force": True},
              "w4": {"source": str(models["e0"])}}  # no force: every model has it, unchanged
    _, plain = _merge(_recipe(models), tmp_path / "p")
    _, got = _merge(_recipe(models, tokenizer={"source": "base", "tokens": tokens}),
                    tmp_path / "o")
    for name in (EMBED, HEAD):
        assert torch.equal(got[name][2], sds["e1"][name][2])
        assert torch.equal(got[name][3], sds["base"][name][10])
        assert not got[name][4].any()
        keep = [i for i in range(16) if i not in (2, 3, 4)]
        assert torch.equal(got[name][keep], plain[name][keep])
    added = {"<a>": {"source": str(models["e0"]), "force": False}}
    with pytest.raises(SpecmergeError, match=r"tokens\['<a>'\]: without force"):
        _merge(_recipe(models, ("e0", "added"), tokenizer={"source": "union", "tokens": added}),
               tmp_path / "x")
    with pytest.raises(SpecmergeError, match=r"tokens\['<new>'\]: the token is not in"):
        _merge(_recipe(models, tokenizer={"source": "base", "tokens": {
            "<new>": {"source": {"kind": "zero"}, "force": True}}}), tmp_path / "x")


@pytest.mark.parametrize("value, want", [
    ("chatml", CHATML),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}",
     "{% for m in messages %}{{ m['content'] }}{% endfor %}"),
    ("auto", "{{ 'base template' }} {{ messages }}"),  # the only input with one: e1
])
def test_chat_template_is_written_into_tokenizer_config(models, tmp_path, value, want) -> None:
    # auto: the plurality of the inputs' templates (e0 and e1 share one, the base has another)
    _tokenizer(models["e0"], WORDS, template="{{ 'base template' }} {{ messages }}")
    (models["base"] / "chat_template.jinja").write_text("{{ 'old' }}")
    out, _ = _merge(_recipe(models, chat_template=value), tmp_path / "o")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == want
    assert (out / "chat_template.jinja").read_text() == want  # transformers prefers this file


def test_mergekit_tokenizer_keys_convert_and_merge(models, tmp_path) -> None:
    base, e0, added = (str(models[k]) for k in ("base", "e0", "added"))
    mk = {"base_model": base, "merge_method": "task_arithmetic",
          "models": [{"model": e0, "parameters": {"weight": 1.0}},
                     {"model": added, "parameters": {"weight": 1.0}}],
          "tokenizer": {"source": added, "tokens": {"w1": {"source": e0, "force": True}}},
          "chat_template": "chatml"}
    rec = specmerge.load_recipe(mk)
    assert rec.tokenizer is not None and rec.tokenizer.source == added
    assert rec.chat_template == "chatml" and rec.tokenizer_model == 2
    out, got = _merge(mk, tmp_path / "o")
    assert got[EMBED].shape == (18, 8)
    assert torch.equal(got[EMBED][2], models["sds"]["e0"][EMBED][2])
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    # the tokenizer block's default source is union, as in mergekit
    assert specmerge.load_recipe({**mk, "tokenizer": {}}).tokenizer.source == "union"
