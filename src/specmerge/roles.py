"""Parameter roles: what each tensor of a checkpoint is, from its name, shape and config.json.

Roles decide how a matrix method sees a tensor: ``linear`` weights are (out, in) as in
``nn.Linear``; ``conv1d`` weights (GPT-2's ``Conv1D``) are stored (in, out) and are transposed
before a matrix method and back after; ``fused`` projections stack several linear blocks (q/k/v,
gate/up) and are merged whole for now; ``embedding`` and ``head`` tensors take the scope's
fallback; ``norm``, ``bias`` and ``other`` are not matrices.

A small declarative table per known ``model_type`` names what differs from the generic rules (the
facts come from the transformers modelling files of each architecture). For an unknown type the
roles are inferred: a 2-D tensor with a dimension equal to ``vocab_size`` is an embedding (a head
when its name says so), 1-D tensors are norms or biases, other 2-D floating tensors linear.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

Role = Literal["embedding", "head", "linear", "conv1d", "fused", "norm", "bias", "other"]
MATRIX_ROLES = frozenset({"linear", "conv1d", "fused"})

# generic name rules, shared by every architecture (searched, in this order)
EMBEDDING = re.compile(r"(embed_tokens|wte|wpe|word_embeddings|position_embeddings|"
                       r"token_type_embeddings|embed_in|embed_positions|relative_attention_bias|"
                       r"(^|\.)shared)\.weight$")
HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output|score|classifier)(\.decoder)?\.weight$|"
                  r"(cls\.predictions\.decoder|lm_head\.decoder)\.weight$")
# the input embedding that a tied head shares
TIED_EMBEDDING = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in|(^|\.)shared)\.weight$")
NORM = re.compile(r"(norm|ln_?\w*|layernorm|LayerNorm)[^.]*\.weight$", re.IGNORECASE)


@dataclass(frozen=True)
class Arch:
    """What one model type adds to the generic rules: regexes of its (in, out) Conv1D weights,
    and of its fused projections with their blocks along the output dimension: "qkv" (q, k and
    v of sizes heads·d, kv_heads·d, kv_heads·d), "halves" (gate and up), "qkv_per_head" (q, k, v
    interleaved head by head, as GPT-NeoX stores them)."""

    conv1d: tuple[str, ...] = ()
    fused: tuple[tuple[str, str], ...] = ()


_LLAMA_LIKE = Arch()
ARCHITECTURES: dict[str, Arch] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
                                "gemma2", "gemma3", "gemma3_text", "phi", "bert", "roberta",
                                "t5")},
    "phi3": Arch(fused=((r"\.qkv_proj\.weight$", "qkv"), (r"\.gate_up_proj\.weight$", "halves"))),
    "gpt2": Arch(conv1d=(r"\.c_attn\.weight$", r"\.c_proj\.weight$", r"\.c_fc\.weight$"),
                 fused=((r"\.c_attn\.weight$", "qkv"),)),
    "gpt_neox": Arch(fused=((r"\.query_key_value\.weight$", "qkv_per_head"),)),
    # falcon's fused layout depends on new_decoder_architecture and multi_query: merged whole
    "falcon": Arch(fused=((r"\.query_key_value\.weight$", "whole"),)),
}


@dataclass(frozen=True)
class ModelInfo:
    """What the roles need from config.json."""

    model_type: str | None = None
    vocab_size: int | None = None
    tie_word_embeddings: bool = False
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> ModelInfo:
        cfg = dict(config or {})
        text = cfg.get("text_config")
        if isinstance(text, Mapping):  # multimodal configs keep the language model's sizes there
            cfg = {**text, **{k: v for k, v in cfg.items() if k != "text_config"}}
        vocab = cfg.get("vocab_size")
        model_type = cfg.get("model_type")
        tied = cfg.get("tie_word_embeddings", model_type in ("gpt2", "bert", "roberta", "t5"))

        def integer(*keys: str) -> int | None:
            return next((cfg[k] for k in keys if isinstance(cfg.get(k), int)), None)

        hidden, heads = integer("hidden_size", "n_embd"), integer("num_attention_heads", "n_head")
        head_dim = integer("head_dim") or (hidden // heads if hidden and heads else None)
        return cls(model_type if isinstance(model_type, str) else None,
                   vocab if isinstance(vocab, int) else None, bool(tied), heads,
                   integer("num_key_value_heads") or heads, head_dim)

    @property
    def arch(self) -> Arch | None:
        return ARCHITECTURES.get(self.model_type or "")


def parameter_role(name: str, shape: Sequence[int], dtype: torch.dtype, info: ModelInfo) -> Role:
    """The role of one tensor (see the module docstring)."""
    if not dtype.is_floating_point:
        return "other"
    if len(shape) == 1 or name.endswith(".bias"):
        return "norm" if NORM.search(name) else ("bias" if name.endswith(".bias") else "other")
    if len(shape) != 2:
        return "other"
    arch = info.arch or Arch()
    if any(re.search(p, name) for p, _ in arch.fused):
        return "fused"
    if any(re.search(p, name) for p in arch.conv1d):
        return "conv1d"
    if HEAD.search(name):
        return "head"
    if EMBEDDING.search(name):
        return "embedding"
    if info.arch is None and info.vocab_size is not None and info.vocab_size in shape:
        return "embedding"  # unknown type: a vocabulary-sized matrix
    return "linear"


@dataclass(frozen=True)
class Blocks:
    """How a fused weight splits, in (out, in) orientation: ``sizes`` of the blocks along the
    output dimension, after grouping rows interleaved over ``interleave`` heads (0: none)."""

    sizes: tuple[int, ...]
    interleave: int = 0


def fused_blocks(name: str, rows: int, info: ModelInfo) -> Blocks | None:
    """The blocks of a fused projection with ``rows`` output rows, or None to merge it whole
    (unknown layout, or sizes from config.json that do not add up: logged)."""
    arch = info.arch or Arch()
    layout = next((kind for p, kind in arch.fused if re.search(p, name)), None)
    if layout is None or layout == "whole":
        return None
    heads, kv, d = info.heads, info.kv_heads, info.head_dim
    if layout == "halves":
        blocks = Blocks((rows // 2, rows // 2)) if rows % 2 == 0 else None
    elif heads is None or kv is None or d is None:
        blocks = None
    elif layout == "qkv":
        blocks = Blocks((heads * d, kv * d, kv * d))
    else:  # qkv_per_head
        blocks = Blocks((heads * d,) * 3, interleave=heads)
    if blocks is None or sum(blocks.sizes) != rows:
        log.warning("%s: cannot split the fused projection (%s) from config.json; merged whole",
                    name, layout)
        return None
    return blocks


def is_conv1d(name: str, info: ModelInfo) -> bool:
    """Stored (in, out): GPT-2's Conv1D weights, fused or not."""
    arch = info.arch or Arch()
    return any(re.search(p, name) for p in arch.conv1d)


def log_inferred(info: ModelInfo) -> None:
    if info.model_type is not None and info.arch is None:
        log.info("model_type %r has no role table: roles inferred from names and shapes "
                 "(vocab_size %s)", info.model_type, info.vocab_size)
