"""The recipe: what to merge and how. YAML or dict in, a validated ``Recipe`` out.

Validation happens here, before any tensor is read: unknown keys, unknown methods, bad method
parameters and bad values all fail with a message naming the field and the allowed values.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from specmerge.errors import RecipeError
from specmerge.io.chat_template import check_chat_template
from specmerge.linalg import COMPUTE_DTYPES, parse_dtype
from specmerge.mergekit import MergekitError, from_mergekit, is_mergekit
from specmerge.methods.presets import Context, apply_preset
from specmerge.methods.registry import SCALING, Interval, get_method
from specmerge.schedules import check_schedule, is_schedule, leaves

DENSITY = Interval(float, 0, 1)
MAX_RECIPE_BYTES = 1_000_000
MAX_ECHO = 300  # characters of a value or message echoed back in one error line
FALLBACKS = ("average", "task_arithmetic", "base")
OUT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _reject_unknown(model: type[BaseModel], data: Any, where: str) -> None:
    if isinstance(data, dict):
        allowed = list(model.model_fields)
        unknown = [k for k in data if k not in allowed]
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {where}; allowed keys: {allowed}")


class _Strict(BaseModel):
    """A recipe section whose unknown keys are refused with the list of allowed ones."""

    model_config = ConfigDict(extra="forbid")
    _where: ClassVar[str] = "the recipe"

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        _reject_unknown(cls, data, cls._where)
        return data


def _leaves(value: Any, what: str) -> list[Any]:
    """The scalars of a per-tensor value (itself, for a scalar), its form checked."""
    if is_schedule(value):
        check_schedule(value, what)
    return list(leaves(value))


def _bounded(value: float, what: str) -> float:
    if not SCALING.is_satisfied_by(value):
        raise ValueError(f"{what} must be {SCALING}, got {value!r}")
    return value


class ModelRef(BaseModel):
    """One expert: a path, and its weight in methods that use per-model weights."""

    model_config = ConfigDict(extra="forbid")
    model: str
    # a number, or a gradient / filtered list resolved per tensor (specmerge.schedules)
    weight: float | list[Any] = 1.0
    density: float | list[Any] | None = None  # per-model density, for methods that take one

    @field_validator("density", mode="before")
    @classmethod
    def _density(cls, v: Any) -> Any:
        for leaf in _leaves(v, "density"):
            if leaf is not None and (isinstance(leaf, bool) or not DENSITY.is_satisfied_by(leaf)):
                raise ValueError(f"density must be {DENSITY}, got {leaf!r}")
        return v

    @field_validator("weight", mode="before")
    @classmethod
    def _weight(cls, v: Any) -> Any:
        for leaf in _leaves(v, "weight"):
            if isinstance(leaf, bool) or not isinstance(leaf, (int, float)):
                raise ValueError(f"weight must be a number, got {str(leaf)[:80]!r}")
            _bounded(leaf, "weight")
        return v

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, (str, os.PathLike)):
            return {"model": os.fspath(data)}
        _reject_unknown(cls, data, "an entry of 'models'")
        return data


class Scope(_Strict):
    """Which parameters a matrix method (and calibration) applies to, and what the rest get.

    A parameter is a *matrix parameter* when its role (from config.json) is a linear, Conv1D or
    fused weight and its name contains none of the ``exclude`` substrings, or when a ``matrix``
    pattern names it (a pattern starting with ``re:`` is a regular expression). ``split_fused``
    merges fused projections block by block.
    Matrix methods give the rest the ``fallback``: ``average`` (mean of the τ_i), ``task_arithmetic``
    (``fallback_scaling`` · Σ w_i τ_i) or ``base`` (keep θ0). Element-wise methods apply to every
    floating parameter; calibration only to matrix parameters.
    """

    _where: ClassVar[str] = "'scope'"
    exclude: list[str] = ["embed", "lm_head"]
    matrix: list[str] = []
    fallback: Literal["average", "task_arithmetic", "base"] = "average"
    fallback_scaling: float = 0.3
    split_fused: bool = True

    @field_validator("fallback_scaling")
    @classmethod
    def _scaling(cls, v: float) -> float:
        return _bounded(v, "fallback_scaling")

    @field_validator("exclude", "matrix")
    @classmethod
    def _patterns(cls, v: list[str], info: ValidationInfo) -> list[str]:
        for i, pat in enumerate(v):
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as err:
                    raise ValueError(f"{info.field_name}[{i}] {pat[:MAX_ECHO]!r} is not a valid "
                                     f"regular expression: {err}") from None
        return v


class TokenSpec(_Strict):
    """One token's rows (mergekit's ``tokenizer.tokens``): ``source`` a model (its own row of
    the token), ``{kind: model_token, model, token | token_id}`` or ``{kind: zero}``;
    ``force`` uses it whatever the models hold."""

    _where: ClassVar[str] = "an entry of 'tokenizer.tokens'"
    source: str | dict[str, Any] | None = None
    force: bool = False

    @field_validator("source")
    @classmethod
    def _source(cls, v: Any) -> Any:
        if isinstance(v, dict):
            kind = v.get("kind")
            keys = {"zero": {"kind"}, "model_token": {"kind", "model", "token", "token_id"}}
            if kind not in keys or set(v) - keys[kind]:
                raise ValueError(f"a token's source is a model path, {{kind: model_token, model, "
                                 f"token | token_id}} or {{kind: zero}}; got {str(v)[:80]}")
            if kind == "model_token" and (not isinstance(v.get("model"), str)
                                          or ("token" in v) == ("token_id" in v)):
                raise ValueError("a model_token source names a model and one of token or "
                                 "token_id")
        return v


class TokenizerSpec(_Strict):
    """Which vocabulary and tokenizer the output has (mergekit's ``tokenizer_source`` and
    ``tokenizer`` block).

    ``base``: the base's; rows past it in the experts' embeddings and heads are dropped, with a
    warning that counts them. ``union``: the base's plus every token an expert added (experts
    must extend the base's vocabulary); a new token's embedding and head rows are the mean of the
    experts' that have it. A model path (the base or one of ``models``): that model's tokenizer
    files, and its vocabulary, which must extend the base's (its added tokens placed as for
    ``union``). ``tokens``: per-token rows with ``force`` (``specmerge.io.tokenizer``).
    """

    _where: ClassVar[str] = "'tokenizer'"
    source: str = "base"
    tokens: dict[str, TokenSpec] | None = None

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v: Any) -> Any:
        if not isinstance(v, (str, os.PathLike)) or not str(v):
            raise ValueError(f"tokenizer source must be 'base', 'union' or a model's path, "
                             f"got {str(v)[:80]!r}")
        return os.fspath(v)


class OutputSpec(_Strict):
    """What the merge writes. ``hf``: a full Hugging Face checkpoint (the default). ``peft``: a
    PEFT LoRA adapter of the merged update, every expert being a LoRA adapter; each targeted
    weight's update is written at rank min(its rank, ``rank``) by an exact (factored) or a
    truncated SVD. ``rank`` null: the largest rank among the experts' adapters."""

    _where: ClassVar[str] = "'output'"
    format: Literal["hf", "peft"] = "hf"
    rank: int | None = None

    @field_validator("rank")
    @classmethod
    def _rank(cls, v: int | None) -> int | None:
        if v is not None and (isinstance(v, bool) or v < 1):
            raise ValueError(f"output rank must be a positive integer or null, got {v!r}")
        return v

    @model_validator(mode="after")
    def _rank_needs_peft(self) -> OutputSpec:
        if self.rank is not None and self.format != "peft":
            raise ValueError(f"output rank {self.rank} applies to format peft (a LoRA adapter) "
                             f"only; a full model (format hf) has no rank")
        return self


class SliceSource(_Strict):
    """One source of an output slice: layers ``layer_range`` = [start, stop) of ``model``."""

    _where: ClassVar[str] = "a slice's 'sources'"
    model: str
    layer_range: tuple[int, int]

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range must be [start, stop) with 0 <= start < stop, got "
                             f"{list(v)}")
        return v


class SliceSpec(_Strict):
    """An output slice: its layers, in order, come from its sources (mergekit's ``slices``)."""

    _where: ClassVar[str] = "an entry of 'slices'"
    sources: list[SliceSource]

    @field_validator("sources")
    @classmethod
    def _some_source(cls, v: list[SliceSource]) -> list[SliceSource]:
        if not v:
            raise ValueError("a slice needs at least one source")
        return v


class BackendSpec(_Strict):
    """Where the merge runs (never what it computes: the output's bytes do not depend on it, and
    the resolved recipe does not record it). ``local``: this process (``--workers`` threads).
    ``ray``: tasks on the Ray cluster at ``address`` (null: ``RAY_ADDRESS``, else the cluster
    ``ray start`` last started on this machine, else a new local one), each asking for ``num_cpus`` CPUs and, on a CUDA device, ``num_gpus`` GPUs (a
    fraction shares one)."""

    _where: ClassVar[str] = "'backend'"
    name: Literal["local", "ray"] = "local"
    address: str | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None

    @field_validator("num_cpus", "num_gpus")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and (isinstance(v, bool) or v < 0):
            raise ValueError(f"backend num_cpus/num_gpus must be a number >= 0, got {v!r}")
        return v

    @model_validator(mode="after")
    def _ray_only(self) -> BackendSpec:
        if self.name == "local" and (self.address, self.num_cpus, self.num_gpus) != (None,) * 3:
            raise ValueError("backend address, num_cpus and num_gpus apply to name: ray only")
        return self


class Recipe(_Strict):
    """A validated merge recipe. ``parameters`` and ``calibrate`` hold every default filled in.

    ``preset: NAME`` among ``parameters`` (or in ``calibrate``) stands for the named official
    setting of the method (``specmerge.methods.presets``); the parameters given beside it
    override it, and it is resolved to its values here, so the record holds the values.

    ``space`` (LoRA experts only): ``full`` (the default) merges the task vectors themselves;
    ``core`` (Core Space) and ``knots`` (KnOTS) run the method on small matrices of the
    adapters' factors and lift the result back, factored (``specmerge.spaces``).
    """

    base_model: str
    models: list[ModelRef]
    merge_method: str
    parameters: dict[str, Any] = {}
    calibrate: dict[str, Any] | None = None
    scope: Scope = Scope()
    dtype: str = "float32"
    out_dtype: str | None = None
    seed: int = 0
    tokenizer: TokenizerSpec | None = None
    output: OutputSpec | None = None
    backend: BackendSpec | None = None
    # where the method runs on LoRA experts' updates (specmerge.spaces, docs/spaces.md)
    space: Literal["full", "core", "knots"] = "full"
    # passthrough: the output's layers, copied from chosen layers of chosen models, in order
    slices: list[SliceSpec] | None = None
    # the output tokenizer's chat template: a name, auto, or Jinja text (io/chat_template.py)
    chat_template: str | None = None

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str | None) -> str | None:
        return None if v is None else check_chat_template(v)

    @model_validator(mode="after")
    def _tokenizer_models(self) -> Recipe:
        """A tokenizer source or token source that is a path names an input of the recipe."""
        paths = [os.path.realpath(p) for p in (self.base_model, *(m.model for m in self.models))]
        tok = self.tokenizer
        named = [] if tok is None else [("tokenizer.source", tok.source)] * (
            tok.source not in ("base", "union"))
        for token, spec in (tok.tokens or {}).items() if tok is not None else ():
            src = spec.source
            model = src.get("model") if isinstance(src, dict) else src
            if isinstance(model, str):
                named.append((f"tokenizer.tokens[{token!r}].source", model))
        for where, path in named:
            if os.path.realpath(path) not in paths:
                raise ValueError(f"{where} {path[:MAX_ECHO]!r} is neither the base_model nor "
                                 f"one of 'models' (tokens are read from the recipe's inputs)")
        return self

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v  # backend: ray

    @model_validator(mode="after")
    def _at_least_one(self) -> Recipe:
        passthrough = self.merge_method == "passthrough"
        if not self.models and not self.slices and not passthrough:
            raise ValueError("'models' needs at least one expert")
        if self.slices is not None:
            known = {os.path.realpath(p) for p in (self.base_model,
                                                    *(m.model for m in self.models))}
            for i, sl in enumerate(self.slices):
                for j, src in enumerate(sl.sources):
                    if os.path.realpath(src.model) not in known:
                        raise ValueError(f"slices[{i}].sources[{j}].model {src.model!r} is "
                                         f"neither the base_model nor one of 'models'")
                if passthrough and len(sl.sources) != 1:
                    raise ValueError(f"slices[{i}]: a passthrough slice takes one source "
                                     f"(layers copied as they are), not {len(sl.sources)}")
            if not passthrough:
                self._merged_slice(known)
        elif passthrough and self.models:
            raise ValueError("merge_method passthrough copies one model (the base_model) or "
                             "takes 'slices' (which layers of which model go where); "
                             "remove 'models' or give 'slices'")
        return self

    def _merged_slice(self, known: set[str]) -> None:
        """Slices merged with a method: one slice, every source the same layer_range, the
        sources the base and every model (the plan checks that the range is every layer)."""
        assert self.slices is not None
        ranges = {src.layer_range for sl in self.slices for src in sl.sources}
        models = [os.path.realpath(src.model) for src in self.slices[0].sources]
        if len(self.slices) != 1 or len(ranges) != 1 or sorted(models) != sorted(known) or \
                len(models) != len(known):
            raise ValueError(f"'slices' merged with {self.merge_method!r}: one slice whose "
                             f"sources are the base_model and every model, with one "
                             f"layer_range, is supported; several merged slices are not yet "
                             f"(merge_method passthrough copies layers)")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        name = str(parse_dtype(v)).removeprefix("torch.")
        if name not in COMPUTE_DTYPES:
            hint = (f"; the output dtype is 'out_dtype' (e.g. out_dtype: {name})"
                    if name in OUT_DTYPES else "")
            raise ValueError(f"'dtype' (the compute dtype) must be one of {list(COMPUTE_DTYPES)}, "
                             f"got {v!r}{hint}")
        return name

    @field_validator("out_dtype")
    @classmethod
    def _out_dtype(cls, v: str | None) -> str | None:
        if v is None:
            return None
        name = str(parse_dtype(v)).removeprefix("torch.")
        if name not in OUT_DTYPES:
            raise ValueError(f"'out_dtype' must be null or one of {list(OUT_DTYPES)}, got {v!r}")
        return name

    @model_validator(mode="after")
    def _method(self) -> Recipe:
        method = get_method(self.merge_method)
        if method.is_calibration:
            raise ValueError(f"{self.merge_method!r} is a calibration; use it as "
                             f"calibrate: {{method: {self.merge_method}}} after a merge method")
        weights = [m.weight for m in self.models]
        ctx = Context(len(weights), self.merge_method)
        given = apply_preset(self.merge_method, self.parameters, ctx, "parameters")
        scheduled = {k: v for k, v in given.items() if is_schedule(v)}
        self.parameters = method.validate({k: v for k, v in given.items() if k not in scheduled})
        for key, value in scheduled.items():  # every value a tensor can get is validated
            for leaf in _leaves(value, f"parameters.{key}"):
                method.validate({**self.parameters, key: leaf})
        self.parameters.update(scheduled)
        if not self.has_schedules:  # per-tensor values are checked per tensor by the plan
            method.check_recipe(self.parameters, weights)
        base = os.path.realpath(self.base_model)
        for i, m in enumerate(self.models):
            if os.path.realpath(m.model) == base:
                raise ValueError(f"models[{i}] is the base model itself ({m.model}); list only "
                                 "the fine-tuned experts (mergekit recipes often list the base "
                                 "there too: remove it)")
        if not method.uses_densities and any(m.density is not None for m in self.models):
            raise ValueError(f"method {self.merge_method!r} does not take per-model densities; "
                             f"set its parameters under 'parameters'")
        if not method.uses_weights and any(m.weight != 1.0 for m in self.models):
            raise ValueError(f"method {self.merge_method!r} does not use per-model weights; "
                             f"remove 'weight' from 'models' or use a method that does")
        if self.calibrate is not None:
            cal = dict(self.calibrate)
            name = cal.pop("method", None)
            if name is None:
                raise ValueError("'calibrate' needs a 'method', e.g. calibrate: {method: svc}")
            cal_method = get_method(name)
            if not cal_method.is_calibration:
                raise ValueError(f"calibrate.method {name!r} is not a calibration method")
            cal = apply_preset(name, cal, ctx, "calibrate")
            self.calibrate = {"method": name, **cal_method.validate(cal)}
            cal_method.check_recipe(self.calibrate, weights)
        return self

    @model_validator(mode="after")
    def _space(self) -> Recipe:
        """A core or knots space runs the method on small matrices of the adapters' factors:
        a method that reads the base weights, or a whole-model statistic over the full τ_i,
        cannot run there."""
        if self.space == "full":
            return self
        method = get_method(self.merge_method)
        if method.uses_base:
            raise ValueError(f"space {self.space!r}: method {self.merge_method!r} uses the base "
                             f"weights, which have no {self.space} space; use space: full")
        stat = method.statistic
        if stat is not None and stat.wanted(self.parameters):
            raise ValueError(f"space {self.space!r}: {self.merge_method}'s whole-model statistic "
                             f"({stat.kwarg}) is over the full task vectors; use space: full, or "
                             f"its per-tensor setting (ties: trim_scope: tensor)")
        return self

    _root: str | None = PrivateAttr(default=None)  # the directory relative paths resolved from

    @property
    def has_schedules(self) -> bool:
        """Whether some parameter or model weight/density is a gradient or a filtered list."""
        return (any(is_schedule(v) for v in self.parameters.values())
                or any(is_schedule(m.weight) or is_schedule(m.density) for m in self.models))

    @property
    def vocabulary(self) -> str:
        """What the sources do with added tokens: "error" unless the recipe sets a source;
        "model" where the source is a model's path (``tokenizer_model``)."""
        if self.tokenizer is None:
            return "error"
        return self.tokenizer.source if self.tokenizer.source in ("base", "union") else "model"

    @property
    def tokenizer_model(self) -> int | None:
        """The input whose tokenizer the output takes (0: the base, i: the i-th expert), where
        the tokenizer source is a path; else None."""
        if self.vocabulary != "model":
            return None
        assert self.tokenizer is not None
        paths = [os.path.realpath(p) for p in (self.base_model, *(m.model for m in self.models))]
        return paths.index(os.path.realpath(self.tokenizer.source))

    @property
    def num_experts(self) -> int:
        return len(self.models)

    def relative(self, path: str | os.PathLike[str]) -> str:
        """``path`` relative to the recipe file's directory, as the model card names inputs (a
        recipe given as a dict has no file: the path stays absolute)."""
        return os.path.relpath(os.fspath(path), self._root) if self._root else os.fspath(path)

    @property
    def recorded_parameters(self) -> dict[str, Any]:
        """The method's parameters as records name them (``Method.recorded``: a parameter added
        after recipes were recorded only when it is not at its default)."""
        return get_method(self.merge_method).recorded(self.parameters)

    def resolved(self) -> dict[str, Any]:
        """Every field, defaults filled in: what ``specmerge_recipe.yaml`` records (a model's
        ``density`` only where it is set: only some methods take one; a method parameter added
        after recipes were recorded only where it is not at its default)."""
        data = self.model_dump(mode="json")
        data.pop("backend", None)  # how the merge ran, not what it computed
        data["parameters"] = self.recorded_parameters
        for key in ("tokenizer", "output", "chat_template"):
            if data.get(key) is None:
                data.pop(key, None)
        if data.get("tokenizer") is not None and data["tokenizer"].get("tokens") is None:
            data["tokenizer"].pop("tokens")  # unset: earlier records unchanged
        if data.get("space") == "full":  # the default, unrecorded: earlier records unchanged
            data.pop("space")
        if data.get("slices") is None:  # likewise: only a passthrough records its slices
            data.pop("slices", None)
        for m in data["models"]:
            if m.get("density") is None:
                m.pop("density", None)
        return data


def _resolve_paths(data: dict[str, Any], root: Path) -> dict[str, Any]:
    def fix(p: str) -> str:
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (root / path).resolve())

    data = dict(data)
    if isinstance(data.get("base_model"), (str, os.PathLike)):
        data["base_model"] = fix(os.fspath(data["base_model"]))
    if "models" in data and not isinstance(data["models"], list):
        return data  # validation names it (a string is not iterated as paths by character)
    models = []
    for m in data.get("models") or []:
        if isinstance(m, (str, os.PathLike)):
            models.append(fix(os.fspath(m)))
        elif isinstance(m, dict) and isinstance(m.get("model"), (str, os.PathLike)):
            models.append({**m, "model": fix(os.fspath(m["model"]))})
        else:
            models.append(m)
    if "models" in data:
        data["models"] = models
    return _resolve_other_paths(data, fix)


def _resolve_other_paths(data: dict[str, Any], fix: Any) -> dict[str, Any]:
    """The paths in ``slices`` and ``tokenizer`` (source, tokens' sources), as the models'."""
    if isinstance(data.get("slices"), list):
        data["slices"] = [
            {**sl, "sources": [{**src, "model": fix(src["model"])}
                               if isinstance(src, dict) and isinstance(src.get("model"), str)
                               else src for src in sl["sources"]]}
            if isinstance(sl, dict) and isinstance(sl.get("sources"), list) else sl
            for sl in data["slices"]]
    tok = data.get("tokenizer")
    if not isinstance(tok, dict):
        return data
    tok = dict(tok)
    if isinstance(tok.get("source"), str) and tok["source"] not in ("base", "union"):
        tok["source"] = fix(tok["source"])
    if isinstance(tok.get("tokens"), dict):
        tokens = {}
        for token, spec in tok["tokens"].items():
            src = spec.get("source") if isinstance(spec, dict) else None
            if isinstance(src, str):
                spec = {**spec, "source": fix(src)}
            elif isinstance(src, dict) and isinstance(src.get("model"), str):
                spec = {**spec, "source": {**src, "model": fix(src["model"])}}
            tokens[token] = spec
        tok["tokens"] = tokens
    data["tokenizer"] = tok
    return data


def recipe_files(source: Recipe | dict[str, Any] | str | os.PathLike[str]) -> list[Path]:
    """The recipe's own file, when it was given as one: an input like the models, which no
    output may contain or replace."""
    if isinstance(source, (str, os.PathLike)):
        return [Path(source).expanduser().resolve()]
    return []


def load_recipe(source: Recipe | dict[str, Any] | str | os.PathLike[str],
                **overrides: Any) -> Recipe:
    """Build a validated Recipe from a dict, a YAML path or a Recipe; apply ``overrides``.

    Relative model paths are resolved against the YAML file's directory (for a dict: against
    the current directory), so a recipe means the same thing wherever it is run from.
    """
    from_file = isinstance(source, Recipe) and source._root is not None
    if isinstance(source, Recipe):
        data: dict[str, Any] = source.model_dump(mode="json")
        root = Path(source._root) if source._root else Path.cwd()
    elif isinstance(source, dict):
        data, root = dict(source), Path.cwd()
    else:
        path = Path(source).expanduser()
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping, found {type(data).__name__}")
        root, from_file = path.resolve().parent, True
    if not isinstance(source, Recipe) and is_mergekit(data):
        try:
            data = from_mergekit(data)
        except MergekitError as err:
            raise RecipeError(f"mergekit recipe: {_cap(str(err))}") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    data = _resolve_paths(data, root)
    try:
        rec = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err)) from None
    except ValueError as err:
        raise RecipeError(f"invalid recipe: {_cap(str(err))}") from None
    if from_file:
        rec._root = str(root)
    return rec


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "recipe"
        msg = _cap(str(e.get("msg", "")).removeprefix("Value error, "))
        lines.append(f"{loc}: {msg}")
    return "invalid recipe: " + "; ".join(lines)


def _cap(text: str) -> str:
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + f"… ({len(text)} characters)"


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML without aliases (so no expansion bomb) and without duplicate keys."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a recipe; write the value out",
                self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_cap(repr(key))}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """A recipe file's YAML, with the file named in every error."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise RecipeError(f"{path}: not a file")
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {size} bytes is too large for a recipe "
                              f"(at most {MAX_RECIPE_BYTES})")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file (a recipe is UTF-8 YAML)") from None
    except OSError as err:
        raise RecipeError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {_cap(str(err))}") from None
