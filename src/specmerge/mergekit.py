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
(``NATIVE``); ``karcher``, ``nuslerp`` and ``multislerp`` also run without a base_model
(``NO_BASE``). What specmerge cannot honour is refused by name: ``slices`` merged with a method
other than passthrough, ``modules``, other tokenizer sources, and methods specmerge lacks.
Gradients and ``filter``-ed values of ``weight``, ``density`` and ``lambda`` are kept as they are
and resolved per tensor with mergekit's rules (``specmerge.schedules``).
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
            "tokenizer_source", "tokenizer", "name")
UNSUPPORTED_KEYS = {
    "modules": "per-module merge definitions; merge whole models",
    "chat_template": "chat templates; set it in the output's tokenizer_config.json",
}
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


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
    if any(k in data for k in ("tokenizer_source", "modules", "chat_template")):
        return True
    if data.get("merge_method") in MERGEKIT_ONLY:  # a str (or None) here
        return True
    if data.get("merge_method") in NO_BASE and "base_model" not in data:
        return True  # a specmerge recipe always names its base
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


def _from_slices(data: dict[str, Any]) -> dict[str, Any]:
    """A mergekit passthrough of ``slices`` (one source each) as a specmerge recipe: the base
    is mergekit's base_model, else the first slice's model; ``models`` the other models."""
    if data.get("merge_method") != "passthrough":
        raise MergekitError(f"mergekit's 'slices' with merge_method {data.get('merge_method')!r} "
                            f"(several sources merged per slice) are not supported yet; "
                            f"passthrough slices are")
    unknown = sorted(set(data) - {"slices", "merge_method", "base_model", "dtype", "out_dtype",
                                  "tokenizer_source", "name"})
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
    tok = data.get("tokenizer_source")
    if tok not in (None, "base"):
        raise MergekitError(f"tokenizer source {tok!r} is not supported with slices: 'base'")
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
        raise MergekitError("mergekit's passthrough is read with 'slices' (which layers of "
                            "which model go where)")
    if method not in SUPPORTED:
        lacking = f"mergekit's {method!r} is not implemented in specmerge" if method in \
            OTHER_METHODS else f"unknown mergekit merge_method {method!r}"
        raise MergekitError(f"{lacking}; supported: {list(SUPPORTED)}, or write a specmerge "
                            f"recipe (specmerge methods lists ours)")
    tok = data.get("tokenizer_source", (data.get("tokenizer") or {}).get("source")
                   if isinstance(data.get("tokenizer"), dict) else data.get("tokenizer"))
    if tok not in (None, "base", "union"):
        raise MergekitError(f"tokenizer source {tok!r} is not supported yet: 'base' (the base "
                            f"model's vocabulary) or 'union' (every model's tokens)")
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
        if method not in NO_BASE:
            raise MergekitError(f"mergekit's {method} needs a base_model")
        base = entries[0][0]
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
    if tok is not None:
        out["tokenizer"] = {"source": tok}
    return _with_dtype(data, out)
