"""mergekit recipes: a mergekit YAML for a base plus experts, read with mergekit's meaning.

mergekit's task-vector methods are one family, generalized task arithmetic (GTA, mergekit
0.1.5's ``merge_methods/registry.py``): per-model ``weight`` and ``density``, a sparsification,
an optional sign consensus, ``normalize``, ``rescale`` and ``lambda``. specmerge's ``gta`` method
computes the same thing, so each mergekit method becomes ``gta`` with its preset:

| mergekit | sparsification | consensus | normalize | rescale |
|---|---|---|---|---|
| task_arithmetic | none | none | false | false |
| ties | magnitude | sum | true | false |
| dare_ties | random | sum | false | true |
| dare_linear | random | none | false | true |
| breadcrumbs | magnitude_outliers | none | false | false |
| breadcrumbs_ties | magnitude_outliers | sum | false | false |

mergekit's ``ties`` stays ``gta`` rather than specmerge's ``ties`` with ``trim_count: exact``
(which keeps mergekit's count, ⌊ρd⌋): that would not be faithful. mergekit keeps exactly
max(1, ⌊ρd⌋) entries by argsort, an arbitrary subset where magnitudes tie at the threshold (common
with bf16 inputs), while ``ties`` keeps every tied entry; mergekit elects + where the weighted
vote is exactly 0, ``ties`` the majority sign; and ``ties`` takes no per-model weights or
densities. ``gta`` reproduces mergekit's ties bit for bit on float32 inputs
(docs/results/mergekit_parity.md), but holds whole tensors.

``linear`` (Σ w_i θ_i / Σ w_i over the listed models) is θ0 + Σ w_i τ_i / Σ w_i, i.e. ``gta``
with λ = 1 / Σ w_i, whether or not the base is listed (its τ is 0). GTA methods skip a listed
base model, as mergekit does. mergekit's other methods are specmerge methods of the same name
(``NATIVE``). Without ``base_model``, linear's first model stands as θ0, and so does karcher's,
nuslerp's and multislerp's (``NO_BASE``; the last two get its weight as ``base_weight``); other
methods are refused naming the field (``MERGEKIT_METHODS``: mergekit's own base contract).
Passthrough takes ``slices`` or one model; one slice over every layer merged with a method is
the ``models`` form. Tokenizer keys (``tokenizer_source``, ``tokenizer``, ``chat_template``)
become specmerge's ``tokenizer`` and ``chat_template``. What specmerge cannot honour is refused
by name: several merged slices, ``modules``, ``pad_to_multiple_of``, and methods specmerge
lacks. Gradients and ``filter``-ed values of ``weight``, ``density`` and
``lambda`` are kept as they are and resolved per tensor with mergekit's rules
(``specmerge.schedules``).

This package: ``__init__`` holds the method tables, ``is_mergekit`` and ``from_mergekit`` (the
method mapping above); ``values`` the error type and the parsers of single values and
``models`` entries; ``slices`` slices and passthrough; ``tokenizer`` the tokenizer keys.
"""

from __future__ import annotations

import os
from typing import Any

from specmerge.mergekit.slices import _from_slices, _merged_slice, _passthrough_of_one, _with_slice
from specmerge.mergekit.tokenizer import _with_tokenizer
from specmerge.mergekit.values import (
    DTYPES,
    MODEL_PARAMS,
    MergekitError,
    _flag,
    _model_path,
    _number,
    _path_of,
    _scalar,
    _setting,
    _with_dtype,
)
from specmerge.schedules import is_schedule

__all__ = ["BASE_WEIGHT", "DTYPES", "GTA_PRESETS", "MERGEKIT_METHODS", "MERGEKIT_ONLY",
           "MODEL_PARAMS", "NATIVE", "NO_BASE", "OTHER_METHODS", "SHARED_PARAMS", "SUPPORTED",
           "TOP_KEYS", "UNSUPPORTED_KEYS", "MergekitError", "from_mergekit", "is_mergekit",
           "mergekit_methods"]

GTA_PRESETS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"sparsification": "none", "consensus": "none", "normalize": False,
                        "rescale": False},
    "ties": {"sparsification": "magnitude", "consensus": "sum", "normalize": True,
             "rescale": False},
    "dare_ties": {"sparsification": "random", "consensus": "sum", "normalize": False,
                  "rescale": True},
    "dare_linear": {"sparsification": "random", "consensus": "none", "normalize": False,
                    "rescale": True},
    "breadcrumbs": {"sparsification": "magnitude_outliers", "consensus": "none",
                    "normalize": False, "rescale": False},
    "breadcrumbs_ties": {"sparsification": "magnitude_outliers", "consensus": "sum",
                         "normalize": False, "rescale": False},
}
# mergekit methods that are specmerge methods of the same name and meaning
# (specmerge.methods.weightspace, .spherical, .selective): mergekit's shared parameter →
# specmerge's (None: accepted and dropped, it does not change the result); per-model weight,
# density and epsilon as for GTA (a shared parameter listed here is the method's own)
NATIVE: dict[str, dict[str, str | None]] = {
    "slerp": {"t": "t"},
    "nearswap": {"t": "t"},
    "model_stock": {"filter_wise": "filter_wise"},
    "sce": {"select_topk": "select_topk", "int8_mask": None},
    "della": {"normalize": "normalize", "rescale": "rescale", "lambda": "scaling",
              "int8_mask": None},
    "della_linear": {"normalize": "normalize", "rescale": "rescale", "lambda": "scaling",
                     "int8_mask": None},
    "karcher": {"max_iter": "max_iter", "tol": "tol"},
    "nuslerp": {"nuslerp_row_wise": "nuslerp_row_wise", "nuslerp_flatten": "nuslerp_flatten"},
    "multislerp": {"normalize_weights": "normalize_weights", "eps": "eps"},
    "arcee_fusion": {},
    "ram": {"epsilon": "epsilon"},
    "ramplus_tl": {"r": "r", "alpha": "alpha", "epsilon": "epsilon"},
}
# methods that mergekit runs without a base_model: the first model is specmerge's base; karcher
# averages it with the others (as mergekit averages all its inputs), and nuslerp and
# multislerp interpolate it with its weight (``base_weight``) instead of around it
NO_BASE = ("linear", "karcher", "nuslerp", "multislerp")
BASE_WEIGHT = ("nuslerp", "multislerp")
SUPPORTED = ("linear", *GTA_PRESETS, *NATIVE)
OTHER_METHODS = ("core_space", "lrp", "task_adapter")
# method names that only mergekit uses (task_arithmetic, ties and NATIVE are specmerge's too)
MERGEKIT_ONLY = (frozenset(SUPPORTED) - {"task_arithmetic", "ties"} - frozenset(NATIVE)
                 | frozenset(OTHER_METHODS))
SHARED_PARAMS = ("normalize", "rescale", "int8_mask", "lambda")
TOP_KEYS = ("models", "merge_method", "base_model", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "name")
UNSUPPORTED_KEYS = {
    "modules": "per-module merge definitions; merge whole models",
}


# mergekit 0.1.5's 20 methods (mergekit/merge_methods/registry.py), each with its
# InputContract.base: "required" (a base_model is needed), "optional", or "ignored" (a listed
# base is one more input, as in linear's weighted average)
MERGEKIT_METHODS: dict[str, str] = {
    "linear": "ignored", "passthrough": "ignored", "karcher": "ignored",
    "nuslerp": "optional", "multislerp": "optional",
    **dict.fromkeys(("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                     "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock",
                     "nearswap", "sce", "arcee_fusion", "ram", "ramplus_tl"), "required"),
}


def mergekit_methods() -> dict[str, str | None]:
    """Each mergekit 0.1.5 method → the specmerge method a recipe of it runs (None: refused,
    not implemented)."""
    return {m: ("gta" if m == "linear" or m in GTA_PRESETS else m if m in NATIVE or
                m == "passthrough" else None) for m in MERGEKIT_METHODS}



def is_mergekit(data: dict[str, Any]) -> bool:
    """A mergekit recipe: per-model ``parameters``, a mergekit-only key or method name, or
    mergekit's shared parameters with one of its method names (``gta``, specmerge's own method,
    shares parameter names with mergekit and is never read as mergekit)."""
    if data.get("merge_method") == "gta" or not isinstance(data.get("merge_method"), (str, type(None))):
        return False  # a merge_method that is no name is refused by the recipe's validation
    models = data.get("models")
    if isinstance(models, list) and any(isinstance(m, dict) and "parameters" in m
                                        for m in models):
        return True
    if "slices" in data:  # mergekit has slices or models, never both; specmerge's has both
        return "models" not in data
    if any(k in data for k in ("tokenizer_source", "modules")):  # chat_template: both
        return True
    if data.get("merge_method") in MERGEKIT_ONLY:  # a str (or None) here
        return True
    if "base_model" not in data and data.get("merge_method") in MERGEKIT_METHODS:
        return True  # specmerge needs a base_model; mergekit's linear, passthrough do not
    if (data.get("merge_method") in NATIVE and isinstance(models, list)
            and isinstance(data.get("base_model"), str)
            and any(_path_of(m) == os.path.realpath(data["base_model"]) for m in models)):
        return True  # mergekit lists the base among the models (slerp's t = 0 end)
    params = data.get("parameters")
    return (data.get("merge_method") in (*SUPPORTED, *OTHER_METHODS) and isinstance(params, dict)
            and any(k in params for k in SHARED_PARAMS))


def from_mergekit(data: dict[str, Any]) -> dict[str, Any]:
    """The specmerge recipe (a dict) that means what the mergekit recipe ``data`` means."""
    if "slices" in data:
        if data.get("merge_method") != "passthrough":
            models_form, layer_range = _merged_slice(data)
            return _with_slice(from_mergekit(models_form), layer_range)
        return _from_slices(data)
    for key, why in UNSUPPORTED_KEYS.items():
        if key in data:
            raise MergekitError(f"mergekit's '{key}' is not supported: {why}")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise MergekitError(f"mergekit recipe keys {unknown} are not supported")
    method = data.get("merge_method")
    if method == "passthrough":
        return _passthrough_of_one(data)
    if method not in SUPPORTED:
        lacking = f"mergekit's {method!r} is not implemented in specmerge" if method in \
            OTHER_METHODS else f"unknown mergekit merge_method {method!r}"
        raise MergekitError(f"{lacking}; supported: {list(SUPPORTED)}, or write a specmerge "
                            f"recipe (specmerge methods lists ours)")
    shared = dict(data.get("parameters") or {})
    defaults = {k: (_scalar if k == "gamma" else _setting)(shared.pop(k), f"parameters.{k}")
                for k in MODEL_PARAMS if k in shared and k not in NATIVE.get(method, {})}
    extra = sorted(set(shared) - set(NATIVE.get(method, SHARED_PARAMS)))
    if extra:
        raise MergekitError(f"parameters {extra} are not mergekit's shared parameters for "
                            f"{method} (specmerge reads {list(SHARED_PARAMS + MODEL_PARAMS)})")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise MergekitError("'models' must list the models to merge")
    entries = [_model_path(m, i) for i, m in enumerate(models)]
    base = data.get("base_model")
    if base is not None and not isinstance(base, (str, os.PathLike)):
        raise MergekitError(f"base_model must be a path, got {str(base)[:80]!r}")
    params: dict[str, Any] = {}
    if base is None:
        base = _no_base(method, entries)
        if method in BASE_WEIGHT:
            params["base_weight"] = {**defaults, **entries[0][1]}.get("weight", 1.0)
    base = os.fspath(base)
    experts = [(p, {**defaults, **q}) for p, q in entries
               if os.path.realpath(p) != os.path.realpath(base)]
    if not experts:
        raise MergekitError("no model other than the base to merge")

    if method == "linear":
        weights = [{**defaults, **q}.get("weight", 1.0) for _, q in entries]
        if any(is_schedule(w) for w in weights):
            raise MergekitError("linear with per-tensor weights (gradients, filters) is not "
                                "supported yet: its normalization by the sum of the weights "
                                "would vary per tensor; give one weight per model")
        total = sum(_number(w, f"models[{i}].parameters.weight" if "weight" in q
                            else "parameters.weight")
                    for i, (w, (_, q)) in enumerate(zip(weights, entries, strict=True)))
        if _flag(shared.get("normalize", True), "parameters.normalize"):
            if total == 0:
                raise MergekitError("linear: the weights sum to zero")
            params["scaling"] = 1.0 / total
        elif abs(total - 1.0) > 1e-12:
            raise MergekitError("linear with normalize: false sums Σ w_i θ_i, which is not a "
                                "base plus task vectors unless the weights sum to 1")
        params.update(GTA_PRESETS["task_arithmetic"])
    elif method in NATIVE:
        for key, ours in NATIVE[method].items():
            if key in shared and ours is not None:
                value = _setting(shared[key], f"parameters.{key}")
                params[ours] = (_flag(value, f"parameters.{key}") if isinstance(value, bool)
                                else value)
    else:
        params.update(GTA_PRESETS[method])
        for key in ("normalize", "rescale"):
            if key in shared:
                params[key] = _flag(shared[key], f"parameters.{key}")
        if "lambda" in shared:
            value = _setting(shared["lambda"], "parameters.lambda")
            params["scaling"] = (value if is_schedule(value)
                                 else _number(value, "parameters.lambda"))
    gammas = {q["gamma"] for _, q in experts if "gamma" in q}
    if len(gammas) > 1:
        raise MergekitError("per-model gamma values differ; specmerge takes one gamma")
    if gammas:
        params["gamma"] = gammas.pop()
    epsilons = ({_number(q.get("epsilon", 0.15), "epsilon") for _, q in experts}  # 0.15: mergekit's
                if any("epsilon" in q for _, q in experts) else set())
    if epsilons and not method.startswith("della"):
        raise MergekitError(f"parameters ['epsilon'] are not mergekit's parameters for {method} "
                            f"(della and della_linear take it)")
    if len(epsilons) > 1:
        raise MergekitError("per-model epsilon values differ; specmerge takes one epsilon")
    if epsilons:
        params["epsilon"] = epsilons.pop()
    out: dict[str, Any] = {
        "base_model": base,
        "models": [{"model": p, "weight": q.get("weight", 1.0),
                    **({"density": q["density"]} if "density" in q else {})}
                   for p, q in experts],
        "merge_method": method if method in NATIVE else "gta", "parameters": params,
    }
    return _with_tokenizer(data, _with_dtype(data, out))


def _no_base(method: str, entries: list[tuple[str, dict[str, Any]]]) -> str:
    """The model that stands as θ0 in a recipe without ``base_model``: the first model, for
    linear (Σ w_i θ_i / Σ w_i = θ_1 + Σ_{i>1} w_i τ_i / Σ w_i, with τ_i = θ_i − θ_1; mergekit
    also takes the config and tokenizer from the first model) and the other ``NO_BASE``
    methods. Other methods are refused, naming the field and what mergekit 0.1.5 does (its
    InputContract.base)."""
    if method in NO_BASE:
        return entries[0][0]
    policy = MERGEKIT_METHODS.get(method)
    if policy == "required":
        raise MergekitError(f"base_model is missing: mergekit's {method} needs one (mergekit "
                            f"0.1.5 refuses {method} without a base input too)")
    raise MergekitError(f"base_model is missing: mergekit's {method} runs without one, "
                        f"specmerge's {method} does not yet; give base_model")
