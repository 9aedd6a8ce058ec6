"""The method registry: names → functions, with parameters, constraints, defaults and a citation.

A method's parameters are the keyword-only arguments of its function, so a parameter's name and
default are written once, in code; the registry, the recipe validation, ``specmerge methods`` and
the docs all read them from there. A parameter's allowed values are declared once too, as
constraint objects (in the manner of scikit-learn's ``Interval`` and ``StrOptions``): the choices
of a ``Literal`` annotation become an ``Options`` constraint by themselves, and ranges are
declared as ``Interval`` objects. The same objects validate a recipe, validate a direct call of
the function, write the error text, document the parameter and give invalid values to tests.

Calling conventions (see DESIGN.md):
- merge methods: ``fn(task_vectors, *, <params>) -> Tensor`` (the merged update τ, not θ).
  Methods with ``uses_weights`` also take ``weights`` (one float per expert), with
  ``uses_densities`` ``densities`` (each model's ``density``, default 1); methods with
  ``uses_base`` take ``base`` (θ0 of the same tensor or rows, read-only: weight-space methods
  such as SLERP need the weights, not only the τ_i); methods with
  ``uses_rng`` take ``generators`` (one seeded CPU ``torch.Generator`` per expert, or with
  ``counter_rng`` one ``CounterRNG`` positioned at the block's first element); a method with
  a ``statistic`` takes its value under ``statistic.kwarg`` when the statistic is wanted.
- calibrations: ``fn(merged, task_vectors, *, <params>) -> Tensor``.
- a ``factored`` method also takes factored task vectors (``specmerge.lowrank.LowRank``, LoRA)
  and then returns a factored τ equal to its dense result; any other method receives them
  densified (the decorator does it for direct calls, the engine per tensor).
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from torch import Tensor

from specmerge.lowrank import LowRank

Family = Literal["elementwise", "subspace", "interference", "calibration"]
# keyword arguments supplied by the engine, never by the user
ENGINE_ARGS = frozenset({"weights", "densities", "generators", "base"})


# ---------------------------------------------------------------------------------------------
# Constraints
# ---------------------------------------------------------------------------------------------

class Constraint(Protocol):
    """An allowed set of values. ``str(c)`` completes "must be …" in an error message."""

    def is_satisfied_by(self, value: Any) -> bool: ...

    def invalid_values(self) -> list[Any]: ...


@dataclass(frozen=True)
class Interval:
    """Finite numbers of ``kind`` (int or float) between ``left`` and ``right`` (None: unbounded).

    ``closed`` says which ends belong to the interval: "left", "right", "both" or "neither".
    """

    kind: type
    left: float | None
    right: float | None
    closed: Literal["left", "right", "both", "neither"] = "both"

    def is_satisfied_by(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.left is not None:
            if value < self.left or (value == self.left and self.closed in ("right", "neither")):
                return False
        if self.right is not None:
            if value > self.right or (value == self.right and self.closed in ("left", "neither")):
                return False
        return True

    def notation(self) -> str:
        lo = "(" if self.left is None or self.closed in ("right", "neither") else "["
        hi = ")" if self.right is None or self.closed in ("left", "neither") else "]"
        left = "-inf" if self.left is None else _num(self.left)
        right = "inf" if self.right is None else _num(self.right)
        return f"{lo}{left}, {right}{hi}"

    def __str__(self) -> str:
        kind = "an integer" if self.kind is int else "a finite number"
        return f"{kind} in {self.notation()}"

    def invalid_values(self) -> list[Any]:
        out: list[Any] = [math.nan, math.inf, "1"]
        if self.left is not None:
            out.append(self.left - 1 if self.closed in ("left", "both") else self.left)
        if self.right is not None:
            out.append(self.right + 1 if self.closed in ("right", "both") else self.right)
        if self.kind is int:
            out.append((self.left if self.left is not None else 0) + 0.5)
        return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


@dataclass(frozen=True)
class Options:
    """One of a fixed set of strings (read from a ``Literal`` annotation)."""

    values: tuple[str, ...]

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.values

    def __str__(self) -> str:
        return f"one of {list(self.values)}"

    def invalid_values(self) -> list[Any]:
        return ["__not_an_option__", 1]


@dataclass(frozen=True)
class AnyOf:
    """A value that satisfies at least one of ``options`` (e.g. a number or "auto")."""

    options: tuple[Constraint, ...]

    def is_satisfied_by(self, value: Any) -> bool:
        return any(c.is_satisfied_by(value) for c in self.options)

    def __str__(self) -> str:
        return " or ".join(str(c) for c in self.options)

    def invalid_values(self) -> list[Any]:
        return [v for c in self.options for v in c.invalid_values()
                if not self.is_satisfied_by(v)]


# λ: every method's ``scaling`` (and the recipe's model weights and fallback scaling) shares it;
# far beyond any use in merging, and small enough that λ · τ stays finite in float32
SCALING = Interval(float, -1e4, 1e4)
COMMON_CONSTRAINTS: dict[str, Interval] = {"scaling": SCALING}


# ---------------------------------------------------------------------------------------------
# Whole-model statistics
# ---------------------------------------------------------------------------------------------

class Statistic(Protocol):
    """A whole-model pre-pass that a method declares in its registry entry.

    The engine runs it over every entry the method computes, before the merge, as rounds of
    map and reduce: ``map`` sees one parameter's task vectors and returns a partial result;
    ``reduce`` combines the partials of a round exactly (whatever their order or grouping) into
    the next state; ``combine`` adds partials into one partial (exactly), so that a parameter read
    in row blocks gives one partial. A method's ``tensor_statistics`` run the same way over the
    row blocks of one parameter. When ``done``, ``value`` is passed to the method as ``kwarg``.
    """

    kwarg: str

    def wanted(self, params: Mapping[str, Any]) -> bool: ...

    def start(self, params: Mapping[str, Any], num_experts: int, numel: int,
              dtype: Any) -> Any: ...

    def done(self, state: Any) -> bool: ...

    def map(self, state: Any, task_vectors: Sequence[Tensor]) -> Any: ...

    def combine(self, partials: Sequence[Any]) -> Any: ...

    def reduce(self, state: Any, partials: Sequence[Any]) -> Any: ...

    def value(self, state: Any) -> Any: ...


# ---------------------------------------------------------------------------------------------
# Parameters and methods
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    types: tuple[type, ...]
    doc: str
    constraints: tuple[Constraint, ...] = ()

    @property
    def type_name(self) -> str:
        names = [t.__name__ if t is not type(None) else "null" for t in self.types]
        return " | ".join(names)

    def _flat(self) -> list[Constraint]:
        return [x for c in self.constraints
                for x in (c.options if isinstance(c, AnyOf) else (c,))]

    @property
    def choices(self) -> tuple[str, ...] | None:
        for c in self._flat():
            if isinstance(c, Options):
                return c.values
        return None

    @property
    def range(self) -> str | None:
        for c in self._flat():
            if isinstance(c, Interval):
                return c.notation()
        return None

    def describe(self) -> str:
        """The allowed values, in words (``specmerge methods``)."""
        return " and ".join(str(c) for c in self.constraints)

    def validate(self, value: Any, method: str) -> Any:
        """Return ``value`` coerced to the parameter's type, or raise a ValueError that names it."""
        where = f"parameter {self.name!r} of method {method!r}"
        if value is None:
            if type(None) in self.types:
                return None
            raise ValueError(f"{where} may not be null (expected {self.type_name})")
        value = self._coerce(value, where)
        for c in self.constraints:
            if not c.is_satisfied_by(value):
                raise ValueError(f"{where} must be {c}, got {_short_repr(value)}")
        return value

    def _coerce(self, value: Any, where: str) -> Any:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if bool in self.types and isinstance(value, bool):
            return value
        if float in self.types and number:
            if not math.isfinite(value):
                raise ValueError(f"{where} must be a finite number, got {value!r}")
            return float(value)
        if int in self.types and isinstance(value, int) and not isinstance(value, bool):
            return value
        if str in self.types and isinstance(value, str):
            return value
        raise ValueError(f"{where} must be {self.type_name}, got {_short_repr(value)}")


def _short_repr(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


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
    uses_densities: bool = False
    uses_rng: bool = False
    uses_base: bool = False  # takes ``base``: θ0 (its rows, in row blocks), for weight-space maths
    factored: bool = False  # accepts factored task vectors (LowRank) and may return one
    statistic: Statistic | None = None
    # row blocks: the result on rows r of every τ_i is rows r of the result on the whole, given
    # the values of ``tensor_statistics`` (run over the blocks of the one parameter first)
    rowwise: bool = False
    tensor_statistics: tuple[Statistic, ...] = ()
    counter_rng: bool = False  # ``generators`` are ``CounterRNG``s, positioned at the block
    # a NaN/Inf in any θ_i or θ0 entry makes that entry of θ0 + τ NaN/Inf (checked by a test), so
    # checking the output finds every non-finite input the output depends on
    propagates_nonfinite: bool = False
    check: Callable[[Mapping[str, Any], Sequence[float]], None] | None = None
    notes: str = ""
    # parameters added after recipes were recorded: left out of the record at their default
    recorded_if_set: frozenset[str] = frozenset()
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

    def recorded(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` as a resolved recipe records them: a parameter in ``recorded_if_set`` is
        left out while it holds its default, so the records (and model cards) of recipes
        written before it existed stay byte-identical; the default applies when read back."""
        return {k: v for k, v in params.items()
                if not (k in self.recorded_if_set and v == self.param(k).default)}

    def check_recipe(self, params: Mapping[str, Any], weights: Sequence[float]) -> None:
        """Cross-field checks that need the experts (K = len(weights)); raise ValueError."""
        if self.check is not None:
            self.check(params, weights)


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


def _literal_options(annotation: Any) -> Options | None:
    if typing.get_origin(annotation) is Literal:
        return Options(tuple(typing.get_args(annotation)))
    for arg in typing.get_args(annotation):
        found = _literal_options(arg)
        if found is not None:
            return found
    return None


def register(
    name: str,
    *,
    family: Family,
    summary: str,
    citation: str,
    docs: Mapping[str, str],
    constraints: Mapping[str, Constraint] | None = None,
    matrix_only: bool = False,
    uses_weights: bool = False,
    uses_densities: bool = False,
    uses_rng: bool = False,
    uses_base: bool = False,
    factored: bool = False,
    statistic: Statistic | None = None,
    tensor_statistics: tuple[Statistic, ...] = (),
    rowwise: bool = False,
    counter_rng: bool = False,
    propagates_nonfinite: bool = False,
    check: Callable[[Mapping[str, Any], Sequence[float]], None] | None = None,
    notes: str = "",
    recorded_if_set: tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that registers a method and validates the keyword parameters of direct calls.

    Parameters come from the function's keyword-only arguments; ``constraints`` adds a
    constraint object per parameter beside the ``Literal`` choices read from the annotation
    (a parameter named in ``COMMON_CONSTRAINTS`` gets that one unless it declares its own).
    ``check(params, weights)`` runs the cross-field checks a recipe needs (e.g. an index < K).
    ``recorded_if_set`` names parameters added after recipes were recorded: the resolved recipe
    and the model card name them only when they differ from their default.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        old = _REGISTRY.get(name)
        # the same function of the same module may register again when its module is executed
        # again (a re-import after an import that failed part-way, as seen in a Ray worker);
        # another function under a taken name is an error
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (
                fn.__module__, fn.__qualname__):
            raise ValueError(f"method {name!r} registered twice ({old.fn.__module__}."
                             f"{old.fn.__qualname__} and {fn.__module__}.{fn.__qualname__})")
        if uses_base and (matrix_only or factored):
            raise ValueError(f"method {name!r}: uses_base is for element-wise or per-tensor "
                             f"maths in the stored layout (not matrix_only, not factored)")
        hints = typing.get_type_hints(fn)
        engine_args = (ENGINE_ARGS | ({statistic.kwarg} if statistic is not None else set())
                       | {s.kwarg for s in tensor_statistics})
        params = []
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in engine_args:
                continue
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{name}: parameter {p.name!r} needs a default")
            if p.name not in docs:
                raise TypeError(f"{name}: parameter {p.name!r} has no doc line")
            declared = (constraints or {}).get(p.name, COMMON_CONSTRAINTS.get(p.name))
            # a declared AnyOf already holds the annotation's Literal choices as one option
            literal = None if isinstance(declared, AnyOf) else _literal_options(hints[p.name])
            cons = [c for c in (literal, declared) if c is not None]
            param = Param(p.name, p.default, _types_of(hints[p.name]), docs[p.name], tuple(cons))
            param.validate(p.default, name)  # a default always satisfies its own constraints
            params.append(param)
        by_name = {p.name: p for p in params}
        unknown = sorted(set(recorded_if_set) - set(by_name))
        if unknown:
            raise TypeError(f"{name}: recorded_if_set names no parameter: {unknown}")

        @functools.wraps(fn)
        def validated(*args: Any, **kwargs: Any) -> Any:
            for key, value in kwargs.items():
                if key in by_name:
                    by_name[key].validate(value, name)
            if not factored:  # element-wise maths: factored task vectors are densified
                args = tuple(_densified(a) for a in args)
            return fn(*args, **kwargs)

        _REGISTRY[name] = Method(
            name=name, fn=fn, family=family, summary=summary, citation=citation,
            params=tuple(params), matrix_only=matrix_only, uses_weights=uses_weights,
            uses_densities=uses_densities,
            uses_rng=uses_rng, uses_base=uses_base, factored=factored, statistic=statistic,
            rowwise=rowwise,
            tensor_statistics=tensor_statistics, counter_rng=counter_rng,
            propagates_nonfinite=propagates_nonfinite, check=check, notes=notes,
            recorded_if_set=frozenset(recorded_if_set),
        )
        return validated

    return deco


def _densified(arg: Any) -> Any:
    if isinstance(arg, LowRank):
        return arg.dense()
    if isinstance(arg, (list, tuple)) and any(isinstance(a, LowRank) for a in arg):
        return [a.dense() if isinstance(a, LowRank) else a for a in arg]
    return arg


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
    from specmerge.methods import (  # noqa: F401
        calibration,
        elementwise,
        interference,
        passthrough,
        selective,
        spherical,
        subspace,
        weightspace,
    )


class UnboundRankWarning(UserWarning):
    """A method's rank setting keeps more directions than its input has: the truncation it
    describes does nothing (e.g. SWUDI's rank_ratio on LoRA experts)."""


def warn_unbound(message: str) -> None:
    """Say once (per distinct message: Python's default warning filter) that a rank setting
    cannot bind; the CLI routes it to the log."""
    import warnings

    warnings.warn(message, UnboundRankWarning, stacklevel=3)
