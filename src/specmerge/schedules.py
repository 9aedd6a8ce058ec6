"""Per-tensor parameter values: mergekit's gradients and filters, resolved once per tensor.

A parameter (a method's, or a model's ``weight``/``density``) may be given as
- a scalar: the same value for every tensor;
- a **gradient**, a list of numbers ``[v_0, …, v_n]``: interpolated linearly over the layers,
  at t = ℓ / (L − 1) for layer ℓ of L (t = 1 when L = 1); tensors outside the layers (the
  input embedding before them, the final norm and head after them) take t = 0, as in mergekit;
- a **filtered** list of ``{filter: SUBSTRING, value: V}`` entries: the first entry whose
  ``filter`` is a substring of the tensor's name (no filter, or ``"*"``, matches every tensor)
  gives the value, itself a scalar or a gradient; where no entry matches, the parameter's
  default applies.

These are mergekit 0.1.5's rules (``mergekit/config.py: evaluate_setting``; t from
``mergekit/plan.py: MergePlanner.plan_slice``; ``plan_module`` plans the pre-weights and the
post-weights both with its ``ConfigReader(t=0)``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")
NO_MATCH = object()  # a filtered list with no entry for the tensor


def is_schedule(value: Any) -> bool:
    """A gradient or a filtered list (anything else is a scalar)."""
    return isinstance(value, list)


def check_schedule(value: Any, where: str) -> None:
    """Raise ValueError naming ``where`` unless ``value`` is a well-formed schedule."""
    if not value:
        raise ValueError(f"{where}: an empty list is neither a gradient nor a filtered list")
    if all(isinstance(v, Mapping) for v in value):
        for i, entry in enumerate(value):
            unknown = sorted(set(entry) - {"filter", "value"})
            if unknown or "value" not in entry:
                raise ValueError(f"{where}[{i}]: a filtered entry is {{filter: NAME, value: V}}"
                                 f"{f'; unknown keys {unknown}' if unknown else ''}")
            if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                raise ValueError(f"{where}[{i}].filter must be a string")
            if isinstance(entry["value"], list):
                _check_gradient(entry["value"], f"{where}[{i}].value")
        return
    _check_gradient(value, where)


def _check_gradient(value: Sequence[Any], where: str) -> None:
    if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                            for v in value):
        raise ValueError(f"{where}: a gradient is a list of numbers, got {str(value)[:80]}")


def leaves(value: Any) -> Iterator[Any]:
    """Every scalar a schedule can resolve to (a gradient's interpolation stays between its
    ends, so its points are enough for interval constraints)."""
    if not is_schedule(value):
        yield value
        return
    for v in value:
        yield from leaves(v["value"]) if isinstance(v, Mapping) else [v]


def resolve(value: Any, name: str, t: float) -> Any:
    """The value of ``value`` for tensor ``name`` at layer position ``t`` (``NO_MATCH`` when a
    filtered list has no entry for it)."""
    if not is_schedule(value):
        return value
    if all(isinstance(v, Mapping) for v in value):
        for entry in value:
            f = entry.get("filter")
            if f is None or f == "*" or f in name:
                return resolve(entry["value"], name, t)
        return NO_MATCH
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def layer_positions(names: Sequence[str], roles: Mapping[str, str],
                    num_layers: int | None = None) -> dict[str, float]:
    """t of every tensor: ℓ / (L − 1) inside layer ℓ of L (L from ``num_layers``, else the
    largest layer index + 1), 0 for every tensor outside the layers (embedding, final norm,
    head: mergekit 0.1.5 gives its post-weights t = 0 too, not 1)."""
    index = {n: int(m.group(1)) for n in names if (m := LAYER.search(n))}
    count = num_layers or (max(index.values()) + 1 if index else 1)
    out = {}
    for n in names:
        if n in index:
            out[n] = index[n] / (count - 1) if count > 1 else 1.0
        else:
            out[n] = 0.0
    return out
