"""The plan: what happens to every parameter, decided once, before any tensor is read.

``build_plan`` is the only code that turns a recipe and a source's index into per-parameter
decisions; ``merge``, ``merge_state_dicts`` and ``analyze`` all run the plan it returns. Each
entry holds the parameter's action (the method, the scope's fallback, or a plain copy), its
output dtype, whether it is calibrated and the keyword arguments bound for its function. The
plan also lists the whole-model statistics its method declares (TIES's global threshold).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from specmerge.errors import RecipeError
from specmerge.linalg import compute_dtype, parse_dtype
from specmerge.methods.registry import Method, Statistic, get_method
from specmerge.recipe import Recipe, Scope, SliceSource, SliceSpec
from specmerge.roles import (
    MATRIX_ROLES,
    Blocks,
    ModelInfo,
    Role,
    fused_blocks,
    is_conv1d,
    log_inferred,
    parameter_role,
)
from specmerge.schedules import NO_MATCH, layer_positions, resolve

Action = Literal["method", "fallback", "copy"]
# the scope's fallbacks, as registry methods with their bound arguments (None: keep θ0)
FALLBACK_METHODS: dict[str, str | None] = {
    "average": "weight_average", "task_arithmetic": "task_arithmetic", "base": None}


@dataclass(frozen=True)
class ParamInfo:
    """One entry of a source's index."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class TensorRef:
    """One input of a plan entry: tensor ``name`` of model ``model`` (0: the base, i: the
    recipe's i-th expert)."""

    model: int
    name: str


@dataclass(frozen=True)
class PlanEntry:
    """What happens to one output parameter.

    ``method`` is the registry name of the function that computes its merged update (None: a
    zero update, or a copy); ``kwargs`` are its own bound keyword arguments (resolved per
    tensor); ``seeds`` the per-expert RNG seeds of a method that draws random numbers;
    ``inputs`` the tensors it is computed from, base first (``same_inputs``: the same name in
    the base and in every expert, which is what every recipe plans today); ``space`` the
    recipe's merge space on a method entry (``specmerge.spaces``; "full" elsewhere).
    """

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    action: Action
    calibrate: bool
    matrix: bool = False
    method: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = ()
    role: Role = "other"
    transpose: bool = False  # stored (in, out): matrix maths runs on the transpose
    blocks: Blocks | None = None  # a fused projection: matrix maths runs block by block
    out_rows: int | None = None  # a vocabulary-sized tensor of the union vocabulary
    inputs: tuple[TensorRef, ...] = ()
    space: str = "full"  # where the method runs on factored τ_i: full, core, knots

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape if self.out_rows is None else (self.out_rows, *self.shape[1:])

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def copies_one(self) -> bool:
        """Whether the entry is a copy of one named input (a slice's tensor)."""
        return self.action == "copy" and len(self.inputs) == 1

    @property
    def same_inputs(self) -> bool:
        """Whether the inputs are the entry's own name in the base and in every expert, in
        order (what the sources read today)."""
        return all(r == TensorRef(i, self.name) for i, r in enumerate(self.inputs))


def same_name_inputs(name: str, k: int) -> tuple[TensorRef, ...]:
    """The inputs of a parameter merged from the same tensor of the base and K experts."""
    return tuple(TensorRef(i, name) for i in range(k + 1))


@dataclass(frozen=True)
class Plan:
    """Every parameter's entry, in the source's order, plus what the whole merge shares."""

    recipe: Recipe
    entries: tuple[PlanEntry, ...]
    compute_dtype: torch.dtype
    calibration: tuple[str, Mapping[str, Any]] | None
    statistics: tuple[Statistic, ...]
    num_layers: int | None = None  # the output's layer count where slices set it

    def counts(self) -> dict[str, int]:
        counts = {a: sum(e.action == a for e in self.entries)
                  for a in ("method", "fallback", "copy")}
        counts["calibrated"] = sum(e.calibrate for e in self.entries)
        return counts


def is_matrix_param(name: str, shape: Sequence[int], dtype: torch.dtype, scope: Scope,
                    info: ModelInfo | None = None) -> bool:
    """Linear, Conv1D or fused weights (by role) whose name matches none of the scope's
    ``exclude`` patterns; embeddings and heads are not matrix parameters unless a ``matrix``
    pattern names them (any 2-D floating tensor it names is one)."""
    role = parameter_role(name, shape, dtype, info or ModelInfo())
    if any(_matches(p, name) for p in scope.matrix):
        return len(shape) == 2 and dtype.is_floating_point
    return role in MATRIX_ROLES and not any(_matches(p, name) for p in scope.exclude)


def _matches(pattern: str, name: str) -> bool:
    """A scope pattern: a substring, or a regular expression after "re:"."""
    return bool(re.search(pattern[3:], name)) if pattern.startswith("re:") else pattern in name


def parameter_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed from (recipe seed, parameter name, expert index): order-independent."""
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def build_plan(recipe: Recipe, index: Mapping[str, ParamInfo],
               info: ModelInfo | None = None, vocab_rows: Mapping[str, int] | None = None) -> Plan:
    """The plan of ``recipe`` over the parameters of ``index`` (name → shape, dtype), with roles
    from ``info`` (the base's config.json) and, for a union vocabulary, the output rows of the
    vocabulary-sized tensors."""
    info = info or ModelInfo()
    log_inferred(info)
    method = get_method(recipe.merge_method)
    weights = [m.weight for m in recipe.models]
    method_kwargs: dict[str, Any] = dict(recipe.parameters)
    if method.uses_weights:
        method_kwargs["weights"] = weights
    if method.uses_densities:
        method_kwargs["densities"] = [1.0 if m.density is None else m.density
                                      for m in recipe.models]
    fallback_method = FALLBACK_METHODS[recipe.scope.fallback]
    fallback_kwargs: dict[str, Any] = (
        {"weights": weights, "scaling": recipe.scope.fallback_scaling}
        if recipe.scope.fallback == "task_arithmetic" else {})
    out_override = parse_dtype(recipe.out_dtype) if recipe.out_dtype else None
    per_tensor = PerTensor(recipe, method, index, info) if recipe.has_schedules else None

    if recipe.merge_method == "passthrough":
        return slice_plan(recipe, index, info, out_override)
    if recipe.slices is not None:
        check_every_layer(recipe, index)
    entries = []
    for name, p in index.items():
        floating = p.dtype.is_floating_point
        role = parameter_role(name, p.shape, p.dtype, info)
        matrix = is_matrix_param(name, p.shape, p.dtype, recipe.scope, info)
        out_dtype = out_override if (out_override is not None and floating) else p.dtype
        calibrate = recipe.calibrate is not None and matrix
        transpose = matrix and is_conv1d(name, info)
        blocks = None
        if matrix and role == "fused" and recipe.scope.split_fused:
            blocks = fused_blocks(name, p.shape[1] if transpose else p.shape[0], info)
        if not floating:
            entry = PlanEntry(name, p.shape, out_dtype, "copy", False, matrix, role=role,
                              transpose=transpose, blocks=blocks)
        elif method.matrix_only and not matrix:
            entry = PlanEntry(name, p.shape, out_dtype, "fallback", calibrate, matrix,
                              fallback_method, per_tensor.fallback_kwargs(name, fallback_kwargs)
                              if per_tensor else fallback_kwargs, role=role,
                              transpose=transpose, blocks=blocks)
        else:
            seeds = tuple(parameter_seed(recipe.seed, name, i)
                          for i in range(recipe.num_experts)) if method.uses_rng else ()
            entry = PlanEntry(name, p.shape, out_dtype, "method", calibrate, matrix,
                              method.name, per_tensor.method_kwargs(name, method_kwargs)
                              if per_tensor else method_kwargs, seeds, role=role,
                              transpose=transpose, blocks=blocks, space=recipe.space)
        entry = dataclasses.replace(entry, inputs=same_name_inputs(name, recipe.num_experts))
        if vocab_rows and name in vocab_rows:
            entry = dataclasses.replace(entry, out_rows=vocab_rows[name])
        entries.append(entry)

    calibration = None
    if recipe.calibrate is not None:
        cal = dict(recipe.calibrate)
        calibration = (cal.pop("method"), cal)
    stats = tuple(s for s in (method.statistic,) if s is not None and s.wanted(recipe.parameters))
    if stats and per_tensor is not None:
        raise RecipeError(f"{recipe.merge_method}: per-tensor values (gradients, filters) cannot "
                          f"be combined with its whole-model statistic ({stats[0].kwarg}); "
                          f"give scalars, or a per-tensor setting of the method")
    return Plan(recipe, tuple(entries), compute_dtype(recipe.dtype), calibration, stats)


class PerTensor:
    """Resolves a recipe's gradients and filtered values (``specmerge.schedules``) for each
    tensor: its method keyword arguments and the models' weights and densities, each resolved
    set checked by the method's constraints and cross-field checks, the tensor named."""

    def __init__(self, recipe: Recipe, method: Method, index: Mapping[str, ParamInfo],
                 info: ModelInfo):
        self.recipe, self.merge_method = recipe, method
        roles = {n: parameter_role(n, p.shape, p.dtype, info) for n, p in index.items()}
        self.t = layer_positions(list(index), roles)
        self.defaults = method.defaults()
        self.checked: set[tuple[Any, ...]] = set()

    def _value(self, value: Any, name: str, default: Any) -> Any:
        out = resolve(value, name, self.t[name])
        return default if out is NO_MATCH else out

    def weights(self, name: str) -> list[float]:
        return [float(self._value(m.weight, name, 1.0)) for m in self.recipe.models]

    def method_kwargs(self, name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: self._value(v, name, self.defaults.get(k)) for k, v in kwargs.items()
               if k not in ("weights", "densities")}
        weights = self.weights(name)
        key = (tuple(sorted(out.items())), tuple(weights))
        if key not in self.checked:
            try:
                self.merge_method.check_recipe(self.merge_method.validate(out), weights)
            except ValueError as err:
                raise RecipeError(f"tensor {name!r}: {err}") from None
            self.checked.add(key)
        if "weights" in kwargs:
            out["weights"] = weights
        if "densities" in kwargs:
            out["densities"] = [1.0 if d is None else float(d) for d in
                                (self._value(m.density, name, None) for m in self.recipe.models)]
        return out

    def fallback_kwargs(self, name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return {**kwargs, "weights": self.weights(name)} if "weights" in kwargs else dict(kwargs)


LAYER_NAME = re.compile(r"^(.*?(?:^|\.)(?:layers|h|layer|blocks|block)\.)(\d+)(\..+)$")


def layer_count(index: Mapping[str, ParamInfo]) -> int:
    """The number of layers of a model's index: 1 + the largest layer number in its names."""
    return 1 + max((int(m.group(2)) for n in index if (m := LAYER_NAME.match(n))), default=-1)


def check_every_layer(recipe: Recipe, index: Mapping[str, ParamInfo]) -> None:
    """A slice merged with a method is the ``models`` form only where its layer_range is
    every layer: a part of the layers would be another model, which is not supported yet."""
    assert recipe.slices is not None
    start, stop = recipe.slices[0].sources[0].layer_range
    layers = layer_count(index)
    if (start, stop) != (0, layers):
        raise RecipeError(f"slices[0]: layer_range [{start}, {stop}] of models with {layers} "
                          f"layers; a slice merged with {recipe.merge_method} must take every "
                          f"layer ([0, {layers}]); merging part of the layers is not supported "
                          f"yet")


def slice_plan(recipe: Recipe, index: Mapping[str, ParamInfo], info: ModelInfo,
               out_override: torch.dtype | None) -> Plan:
    """The plan of a passthrough of ``recipe.slices`` (mergekit's semantics, mergekit/plan.py):
    output layer j is the j-th layer of the slices' ranges taken in order, each tensor copied
    from its slice's model (its own layer index there); the tensors outside the layers come
    from the first slice's model (the input embedding) or the last one's (final norm, head).
    Tensor names and shapes follow the base's layer 0 (every model is checked against them
    when read). Model 0 is the base, model i the recipe's i-th expert."""
    paths = [os.path.realpath(p) for p in (recipe.base_model, *(m.model for m in recipe.models))]
    slices = recipe.slices or [SliceSpec(sources=[SliceSource(  # one model copied whole
        model=recipe.base_model, layer_range=(0, max(1, layer_count(index))))])]
    per_layer: dict[str, ParamInfo] = {}  # "prefix{}suffix" → info, from the base's layer 0
    outside = {}
    for name, p in index.items():
        m = LAYER_NAME.match(name)
        if m is None:
            outside[name] = p
        elif m.group(2) == "0":
            per_layer[m.group(1) + "{}" + m.group(3)] = p

    def entry(out: str, model: int, name: str, p: ParamInfo) -> PlanEntry:
        dtype = out_override if (out_override is not None and p.dtype.is_floating_point) \
            else p.dtype
        return PlanEntry(out, p.shape, dtype, "copy", False,
                         role=parameter_role(out, p.shape, p.dtype, info),
                         inputs=(TensorRef(model, name),))

    first = paths.index(os.path.realpath(slices[0].sources[0].model))
    last = paths.index(os.path.realpath(slices[-1].sources[0].model))
    entries = [entry(n, first, n, p) for n, p in outside.items()
               if parameter_role(n, p.shape, p.dtype, info) == "embedding"]
    j = 0
    for sl in slices:
        src = sl.sources[0]
        model = paths.index(os.path.realpath(src.model))
        for layer in range(*src.layer_range):
            entries += [entry(t.format(j), model, t.format(layer), p)
                        for t, p in per_layer.items()]
            j += 1
    entries += [entry(n, last, n, p) for n, p in outside.items()
                if parameter_role(n, p.shape, p.dtype, info) != "embedding"]
    return Plan(recipe, tuple(entries), compute_dtype(recipe.dtype), None, (),
                num_layers=j if recipe.slices else None)
