"""mergekit recipes, the values in them: the error type, and the parsers of a mergekit value
(one number or flag, a per-tensor setting, a ``models`` entry, the output dtype). Each refuses
what specmerge cannot honour by name; this module imports no other module of the package."""

from __future__ import annotations

import os
from typing import Any

from specmerge.schedules import check_schedule, is_schedule

# the per-model parameters specmerge reads (mergekit's others are refused by name)
MODEL_PARAMS = ("weight", "density", "gamma", "epsilon")
# mergekit's dtype names → specmerge's out_dtype
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


class MergekitError(ValueError):
    """A mergekit recipe feature that specmerge does not implement (named in the message)."""


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

