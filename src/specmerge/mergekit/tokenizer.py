"""mergekit recipes, their tokenizer keys: ``tokenizer_source``, the ``tokenizer`` block and
``chat_template`` as specmerge's ``tokenizer`` and ``chat_template``."""

from __future__ import annotations

from typing import Any

from specmerge.mergekit.values import MergekitError


def _with_tokenizer(data: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """``out`` with mergekit's ``tokenizer_source`` or ``tokenizer`` block (``source``, whose
    default there is union, and ``tokens``) as specmerge's ``tokenizer``, and its
    ``chat_template`` (mergekit/config.py, mergekit/tokenizer/config.py)."""
    source, block = data.get("tokenizer_source"), data.get("tokenizer")
    if source is not None and block is not None:
        raise MergekitError("give tokenizer_source or tokenizer, not both (mergekit refuses "
                            "both too)")
    if block is not None:
        if not isinstance(block, dict):
            raise MergekitError("tokenizer: expected a mapping {source, tokens, "
                                "pad_to_multiple_of}")
        unknown = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"})
        if unknown:
            raise MergekitError(f"tokenizer keys {unknown} are not mergekit's")
        if block.get("pad_to_multiple_of") is not None:
            raise MergekitError("tokenizer.pad_to_multiple_of is not supported yet (the "
                                "padding rows mergekit fills with the mean embedding)")
        out["tokenizer"] = {"source": block.get("source", "union")}
        if block.get("tokens"):
            out["tokenizer"]["tokens"] = block["tokens"]
    elif source is not None:
        out["tokenizer"] = {"source": source}
    if data.get("chat_template") is not None:
        out["chat_template"] = data["chat_template"]
    return out
