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
"""

from __future__ import annotations

import os
from typing import Any

from specmerge.schedules import check_schedule, is_schedule

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
MODEL_PARAMS = ("weight", "density", "gamma", "epsilon")
SHARED_PARAMS = ("normalize", "rescale", "int8_mask", "lambda")
TOP_KEYS = ("models", "merge_method", "base_model", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "name")
UNSUPPORTED_KEYS = {
    "modules": "per-module merge definitions; merge whole models",
}
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


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


class MergekitError(ValueError):
    """A mergekit recipe feature that specmerge does not implement (named in the message)."""


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


def _path_of(entry: Any) -> str | None:
    """The real path of a ``models`` entry (a path or {model: PATH}), None if neither."""
    path = entry.get("model") if isinstance(entry, dict) else entry
    return os.path.realpath(path) if isinstance(path, (str, os.PathLike)) else None


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            raise MergekitError(f"{where}: values filtered by tensor name (a list of "
                                f"{{filter, value}}) are not supported; give one value")
        raise MergekitError(f"{where}: gradients (a list of values interpolated over layers) "
                            f"are not supported; give one value")
    if isinstance(value, dict):
        raise MergekitError(f"{where}: a mapping is not supported here; give one value")
    return value


def _setting(value: Any, where: str) -> Any:
    """A per-tensor value as mergekit writes it: a scalar, a gradient (list of numbers) or a
    filtered list of {filter, value} (``specmerge.schedules``, which resolves it per tensor)."""
    if isinstance(value, dict):
        raise MergekitError(f"{where}: a mapping is not supported here; give a value, a "
                            f"gradient or a list of {{filter, value}}")
    if is_schedule(value):
        try:
            check_schedule(value, where)
        except ValueError as err:
            raise MergekitError(str(err)) from None
    return value


def _flag(value: Any, where: str) -> bool:
    """A boolean parameter: a gradient, a filtered list or any non-boolean is refused by name
    (``bool([False, False])`` is True: a list must never be read as ``true``)."""
    value = _scalar(value, where)
    if not isinstance(value, bool):
        raise MergekitError(f"{where}: expected true or false, got {str(value)[:80]!r}")
    return value


def _number(value: Any, where: str) -> float:
    value = _scalar(value, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergekitError(f"{where}: expected a number, got {str(value)[:80]!r}")
    return float(value)


def _model_path(entry: Any, i: int) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, (str, os.PathLike)):
        return os.fspath(entry), {}
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), (str, os.PathLike)):
        raise MergekitError(f"models[{i}]: expected a path or {{model: PATH, parameters: …}}")
    unknown = sorted(set(entry) - {"model", "parameters"})
    if unknown:
        raise MergekitError(f"models[{i}]: keys {unknown} are not supported")
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise MergekitError(f"models[{i}].parameters must be a mapping")
    extra = sorted(set(params) - set(MODEL_PARAMS))
    if extra:
        raise MergekitError(f"models[{i}].parameters {extra} are not supported (specmerge reads "
                            f"{list(MODEL_PARAMS)})")
    return os.fspath(entry["model"]), {
        k: (_scalar if k == "gamma" else _setting)(v, f"models[{i}].parameters.{k}")
        for k, v in params.items()}


def _with_dtype(data: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """``out`` with mergekit's ``out_dtype`` (else ``dtype``) as specmerge's ``out_dtype``."""
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        if str(dtype) not in DTYPES:
            raise MergekitError(f"dtype {dtype!r}: use one of {sorted(set(DTYPES.values()))}")
        out["out_dtype"] = DTYPES[str(dtype)]
    return out


def _merged_slice(data: dict[str, Any]) -> dict[str, Any]:
    """One slice whose sources all take the same ``layer_range``, merged with a method: the
    ``models`` form of the same recipe (mergekit reads ``models`` as exactly such a slice over
    every layer, mergekit/plan.py), with the slice kept so that the plan checks that the range
    is every layer of the models (examples/gradient-slerp.yml)."""
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
    out = from_mergekit({**{k: v for k, v in data.items() if k != "slices"}, "models": models})
    layer_range = sources[0].get("layer_range")
    out["slices"] = [{"sources": [{"model": p, "layer_range": layer_range} for p in
                                  (out["base_model"], *(m["model"] for m in out["models"]))]}]
    return out


def _from_slices(data: dict[str, Any]) -> dict[str, Any]:
    """A mergekit passthrough of ``slices`` (one source each) as a specmerge recipe: the base
    is mergekit's base_model, else the first slice's model; ``models`` the other models."""
    if data.get("merge_method") != "passthrough":
        return _merged_slice(data)
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


def from_mergekit(data: dict[str, Any]) -> dict[str, Any]:
    """The specmerge recipe (a dict) that means what the mergekit recipe ``data`` means."""
    if "slices" in data:
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
        total = float(sum(weights))
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
