"""The method registry: names → functions, with parameters, defaults and a citation.

A method's parameters are the keyword-only arguments of its function, so a parameter's name and
default are written once, in code, and the registry, the recipe validation, ``specmerge methods``
and the docs all read them from there. ``docs`` adds one line of explanation per parameter and
``choices`` the allowed values of string parameters.

Calling conventions (see DESIGN.md):
- merge methods: ``fn(task_vectors, *, <params>) -> Tensor`` (the merged update τ, not θ).
  Methods with ``uses_weights`` also take ``weights`` (one float per expert); methods with
  ``uses_rng`` take ``generators`` (one seeded CPU ``torch.Generator`` per expert).
- calibrations: ``fn(merged, task_vectors, *, <params>) -> Tensor``.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["elementwise", "subspace", "interference", "calibration"]
# keyword arguments supplied by the engine, never by the user
ENGINE_ARGS = frozenset({"weights", "generators", "thresholds"})


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    types: tuple[type, ...]
    doc: str
    choices: tuple[str, ...] | None = None
    range: str | None = None  # interval such as "(0, 1]"; checked for numbers
    check: Callable[[Any], object] | None = None  # extra validation; raises ValueError

    @property
    def type_name(self) -> str:
        names = [t.__name__ if t is not type(None) else "null" for t in self.types]
        return " | ".join(names)

    def validate(self, value: Any, method: str) -> Any:
        """Return ``value`` coerced to the parameter's type, or raise a ValueError that names it."""
        where = f"parameter {self.name!r} of method {method!r}"
        if value is None:
            if type(None) in self.types:
                return None
            raise ValueError(f"{where} may not be null (expected {self.type_name})")
        if self.choices is not None:
            ok = isinstance(value, str) and (
                value in self.choices
                or any(c.endswith("*") and value.startswith(c[:-1]) for c in self.choices)
            )
            if not ok:
                raise ValueError(f"{where} must be one of {list(self.choices)}, got {value!r}")
            if self.check is not None:
                self.check(value)
            return value
        if bool in self.types and isinstance(value, bool):
            return value
        if float in self.types and isinstance(value, (int, float)) and not isinstance(value, bool):
            return self._in_range(float(value), where)
        if int in self.types and isinstance(value, int) and not isinstance(value, bool):
            return self._in_range(value, where)
        if str in self.types and isinstance(value, str):
            return value
        raise ValueError(f"{where} must be {self.type_name}, got {value!r}")

    def _in_range(self, value: float, where: str) -> float:
        if self.range is None:
            return value
        lo_br, hi_br = self.range[0], self.range[-1]
        lo_s, hi_s = (x.strip() for x in self.range[1:-1].split(","))
        lo, hi = float(lo_s), float(hi_s)
        ok_lo = value >= lo if lo_br == "[" else value > lo
        ok_hi = value <= hi if hi_br == "]" else value < hi
        if not (ok_lo and ok_hi):
            raise ValueError(f"{where} must lie in {self.range}, got {value!r}")
        return value


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Any]
    family: Family
    summary: str
    citation: str
    params: tuple[Param, ...]
    matrix_only: bool = False
    uses_weights: bool = False
    uses_rng: bool = False
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_calibration(self) -> bool:
        return self.family == "calibration"

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def validate(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Check user parameters against the signature; return every parameter, defaults filled."""
        params = dict(params or {})
        allowed = [p.name for p in self.params]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for method {self.name!r}; "
                f"allowed: {allowed or 'none'}"
            )
        return {p.name: p.validate(params.get(p.name, p.default), self.name) for p in self.params}


_REGISTRY: dict[str, Method] = {}


def _types_of(annotation: Any) -> tuple[type, ...]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return tuple(t for arg in typing.get_args(annotation) for t in _types_of(arg))
    if origin is Literal:
        return (str,)
    if annotation is None:
        return (type(None),)
    if isinstance(annotation, type):
        return (annotation,)
    raise TypeError(f"unsupported parameter annotation {annotation!r}")


def register(
    name: str,
    *,
    family: Family,
    summary: str,
    citation: str,
    docs: Mapping[str, str],
    choices: Mapping[str, tuple[str, ...]] | None = None,
    ranges: Mapping[str, str] | None = None,
    checks: Mapping[str, Callable[[Any], object]] | None = None,
    matrix_only: bool = False,
    uses_weights: bool = False,
    uses_rng: bool = False,
    notes: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that registers a method. Parameters come from the function's keyword-only args."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        hints = typing.get_type_hints(fn)
        sig = inspect.signature(fn)
        params = []
        for p in sig.parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in ENGINE_ARGS:
                continue
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{name}: parameter {p.name!r} needs a default")
            if p.name not in docs:
                raise TypeError(f"{name}: parameter {p.name!r} has no doc line")
            params.append(
                Param(p.name, p.default, _types_of(hints[p.name]), docs[p.name],
                      (choices or {}).get(p.name), (ranges or {}).get(p.name),
                      (checks or {}).get(p.name))
            )
        _REGISTRY[name] = Method(
            name=name, fn=fn, family=family, summary=summary, citation=citation,
            params=tuple(params), matrix_only=matrix_only, uses_weights=uses_weights,
            uses_rng=uses_rng, notes=notes,
        )
        return fn

    return deco


def get_method(name: str) -> Method:
    """Look a method up by name; the error lists what exists."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def all_methods() -> list[Method]:
    _load_all()
    order = {"elementwise": 0, "subspace": 1, "interference": 2, "calibration": 3}
    return sorted(_REGISTRY.values(), key=lambda m: order[m.family])


def _load_all() -> None:
    # importing the family modules runs their @register decorators
    from specmerge.methods import calibration, elementwise, interference, subspace  # noqa: F401
