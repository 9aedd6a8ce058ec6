"""mergekit recipes with ``slices``, and passthrough: a passthrough of slices (one source each)
or of one model, and one slice merged with a method over every layer, which is the ``models``
form of the same recipe (``from_mergekit`` converts that form)."""

from __future__ import annotations

import os
from typing import Any

from specmerge.mergekit.tokenizer import _with_tokenizer
from specmerge.mergekit.values import MergekitError, _model_path, _with_dtype


def _merged_slice(data: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """One slice whose sources all take the same ``layer_range``, merged with a method: the
    ``models`` form of the same recipe (mergekit reads ``models`` as exactly such a slice over
    every layer, mergekit/plan.py), and that ``layer_range``, which ``_with_slice`` keeps in
    the converted recipe."""
    slices, method = data["slices"], data.get("merge_method")
    sources = slices[0].get("sources") if isinstance(slices, list) and len(slices) == 1 \
        and isinstance(slices[0], dict) and set(slices[0]) == {"sources"} else None
    ranges = {str(s.get("layer_range")) for s in sources if isinstance(s, dict)} \
        if isinstance(sources, list) else set()
    if not sources or len(ranges) != 1 or not all(
            isinstance(s, dict) and set(s) <= {"model", "layer_range", "parameters"}
            for s in sources):
        raise MergekitError(f"mergekit's 'slices' with merge_method {method!r}: one slice "
                            f"whose sources share one layer_range (every layer) is supported, "
                            f"and passthrough slices; several merged slices are not yet")
    if "models" in data:
        raise MergekitError("a mergekit recipe has 'slices' or 'models', not both")
    models = [{k: v for k, v in s.items() if k != "layer_range"} for s in sources]
    return ({**{k: v for k, v in data.items() if k != "slices"}, "models": models},
            sources[0].get("layer_range"))


def _with_slice(out: dict[str, Any], layer_range: Any) -> dict[str, Any]:
    """``out``, the converted ``models`` form of a merged slice, with the slice kept: every
    model over ``layer_range``, so that the plan checks that the range is every layer of the
    models (examples/gradient-slerp.yml)."""
    out["slices"] = [{"sources": [{"model": p, "layer_range": layer_range} for p in
                                  (out["base_model"], *(m["model"] for m in out["models"]))]}]
    return out


def _from_slices(data: dict[str, Any]) -> dict[str, Any]:
    """A mergekit passthrough of ``slices`` (one source each) as a specmerge recipe: the base
    is mergekit's base_model, else the first slice's model; ``models`` the other models."""
    unknown = sorted(set(data) - {"slices", "merge_method", "base_model", "dtype", "out_dtype",
                                  "tokenizer_source", "tokenizer", "chat_template", "name"})
    if unknown:
        raise MergekitError(f"mergekit recipe keys {unknown} are not supported with slices")
    slices = data["slices"]
    if not isinstance(slices, list) or not slices:
        raise MergekitError("'slices' must list the output's slices")
    out_slices = []
    for i, sl in enumerate(slices):
        sources = sl.get("sources") if isinstance(sl, dict) else None
        if not isinstance(sources, list) or len(sources) != 1 or set(sl) - {"sources"}:
            raise MergekitError(f"slices[{i}]: a passthrough slice has one source "
                                f"{{sources: [{{model: PATH, layer_range: [start, stop]}}]}}")
        src = sources[0]
        if not isinstance(src, dict) or set(src) - {"model", "layer_range"} or not isinstance(
                src.get("model"), (str, os.PathLike)):
            raise MergekitError(f"slices[{i}].sources[0]: expected {{model: PATH, layer_range: "
                                f"[start, stop]}} (per-source parameters are not supported)")
        out_slices.append({"sources": [{"model": os.fspath(src["model"]),
                                        "layer_range": src.get("layer_range")}]})
    paths = list(dict.fromkeys(s["sources"][0]["model"] for s in out_slices))
    base = data.get("base_model") or paths[0]
    if not isinstance(base, (str, os.PathLike)):
        raise MergekitError(f"base_model must be a path, got {str(base)[:80]!r}")
    base = os.fspath(base)
    out: dict[str, Any] = {
        "base_model": base, "merge_method": "passthrough", "slices": out_slices,
        "models": [p for p in paths if os.path.realpath(p) != os.path.realpath(base)]}
    out = _with_tokenizer(data, out)
    if out.get("tokenizer", {}).get("source", "base") != "base" or "tokens" in out.get(
            "tokenizer", {}):
        raise MergekitError(f"tokenizer {out['tokenizer']} is not supported with slices: "
                            f"tokenizer_source base (and chat_template) are")
    return _with_dtype(data, out)

def _passthrough_of_one(data: dict[str, Any]) -> dict[str, Any]:
    """mergekit's passthrough of ``models`` (at most one input, mergekit/merge_methods/
    passthrough.py): a copy of that one model, in the output dtype."""
    unknown = sorted(set(data) - {"models", "merge_method", "base_model", "dtype", "out_dtype",
                                  "tokenizer_source", "tokenizer", "chat_template", "name"})
    if unknown:
        raise MergekitError(f"mergekit recipe keys {unknown} are not supported with "
                            f"passthrough")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise MergekitError("passthrough needs 'slices' (which layers of which model go "
                            "where) or 'models' (the one model to copy)")
    paths = [_model_path(m, i) for i, m in enumerate(models)]
    if any(q for _, q in paths):
        raise MergekitError("passthrough of 'models': per-model parameters are not supported "
                            "(mergekit's scale neither)")
    base = data.get("base_model")
    inputs = {os.path.realpath(p) for p, _ in paths} | (
        {os.path.realpath(base)} if isinstance(base, (str, os.PathLike)) else set())
    if len(inputs) != 1:
        raise MergekitError(f"passthrough copies one model; the recipe names {len(inputs)} "
                            f"(models and base_model); use 'slices' to take layers of several")
    out = {"base_model": paths[0][0], "merge_method": "passthrough", "models": []}
    return _with_tokenizer(data, _with_dtype(data, out))

