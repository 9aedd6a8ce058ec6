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
    """What one model type adds to the generic rules."""

    conv1d: tuple[str, ...] = ()  # regexes of (in, out) Conv1D weights
    fused: tuple[str, ...] = ()  # regexes of stacked projections (merged whole)


_LLAMA_LIKE = Arch()
ARCHITECTURES: dict[str, Arch] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
                                "gemma2", "gemma3", "gemma3_text", "phi", "bert", "roberta",
                                "t5")},
    "phi3": Arch(fused=(r"\.qkv_proj\.weight$", r"\.gate_up_proj\.weight$")),
    "gpt2": Arch(conv1d=(r"\.c_attn\.weight$", r"\.c_proj\.weight$", r"\.c_fc\.weight$"),
                 fused=(r"\.c_attn\.weight$",)),
    "gpt_neox": Arch(fused=(r"\.query_key_value\.weight$",)),
    "falcon": Arch(fused=(r"\.query_key_value\.weight$",)),
}


@dataclass(frozen=True)
class ModelInfo:
    """What the roles need from config.json."""

    model_type: str | None = None
    vocab_size: int | None = None
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> ModelInfo:
        cfg = dict(config or {})
        text = cfg.get("text_config")
        if isinstance(text, Mapping):  # multimodal configs keep the language model's sizes there
            cfg = {**text, **{k: v for k, v in cfg.items() if k != "text_config"}}
        vocab = cfg.get("vocab_size")
        model_type = cfg.get("model_type")
        tied = cfg.get("tie_word_embeddings", model_type in ("gpt2", "bert", "roberta", "t5"))
        return cls(model_type if isinstance(model_type, str) else None,
                   vocab if isinstance(vocab, int) else None, bool(tied))

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
    if any(re.search(p, name) for p in arch.fused):
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


def is_conv1d(name: str, info: ModelInfo) -> bool:
    """Stored (in, out): GPT-2's Conv1D weights, fused or not."""
    arch = info.arch or Arch()
    return any(re.search(p, name) for p in arch.conv1d)


def log_inferred(info: ModelInfo) -> None:
    if info.model_type is not None and info.arch is None:
        log.info("model_type %r has no role table: roles inferred from names and shapes "
                 "(vocab_size %s)", info.model_type, info.vocab_size)
