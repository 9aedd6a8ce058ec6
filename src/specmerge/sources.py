"""Sources: where θ0 and the task vectors τ_i of one parameter come from.

A ``Source`` offers an ``index`` (name → shape, dtype, in the base's order) and, per parameter,
``task_vectors(name, device, dtype)``: θ0 and the τ_i = θ_i − θ0 on the device in the compute
dtype. Every input tensor is checked for NaN/Inf as it is read, and the error names its file.
A ``RowSource`` can also read a parameter by rows (``reads_rows``), which the engine uses to
merge it in blocks; a source that says ``reads_rows`` False for every name (``StateDictSource``)
needs none of the row members.

``CheckpointSource`` holds one base checkpoint and K experts, each behind the ``Expert``
interface (``specmerge.experts``: dense checkpoints and LoRA adapters); it never asks which
kind an expert is. It is picklable (paths and lazily opened readers, never open files or
locks), so a backend can ship it to another process or machine. A τ_i is a dense tensor, or,
read with ``factored=True``, a ``LowRank(B, A, scale)`` where the expert is factored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from specmerge.alignment import (
    VocabularySource,
    added_token_rows,
    match_tied_head,
    tied_pair,
    vocabulary_tensors,
    warn_other_base,
)
from specmerge.errors import CheckpointError, IncompatibleCheckpointError
from specmerge.experts import AdapterExpert, DenseExpert, Expert, StoredRows, open_expert
from specmerge.io.checkpoint import Checkpoint, check_compatible
from specmerge.io.tokenizer import VocabularyUnion, force_tokens, vocabulary_union
from specmerge.lowrank import TaskVector
from specmerge.numerics import (  # noqa: F401  (re-exported: the checks' old home)
    check_finite,
    count_nonfinite,
    nonfinite_error,
    to_compute,
)
from specmerge.plan import ParamInfo, PlanEntry, TensorRef
from specmerge.recipe import Recipe
from specmerge.roles import ModelInfo

log = logging.getLogger(__name__)


@dataclass
class TaskVectors:
    """θ0 and the τ_i of one parameter, on the device, in the compute dtype (private copies).

    With ``factored`` reads, an adapter's τ_i is a ``LowRank`` (rank 0 where it does not touch
    the weight); θ0 is None when it was not asked for and no τ_i needed it."""

    theta0: Tensor | None
    taus: list[TaskVector]


class Source(Protocol):
    """What every stage needs: the index, roles, θ0, the τ_i whole, and the NaN/Inf scan."""

    vocab_rows: dict[str, int]  # output rows of vocabulary-sized tensors (union vocabulary)

    @property
    def num_experts(self) -> int: ...

    def index(self) -> dict[str, ParamInfo]: ...

    def model_info(self) -> ModelInfo: ...

    def base_tensor(self, name: str) -> Tensor: ...

    def task_vectors(self, name: str, device: torch.device, dtype: torch.dtype, *,
                     factored: bool = False, base: bool = True, check: bool = True
                     ) -> TaskVectors: ...

    def reads_rows(self, name: str) -> bool: ...

    def check_inputs(self, name: str, block_rows: int) -> None: ...

    def needs_base(self, name: str) -> bool: ...


class RowSource(Source, Protocol):
    """A source that reads parameters by rows where ``reads_rows`` says so, and places the
    added tokens' rows of a union vocabulary (``placed_rows``, where ``vocab_rows`` is set)."""

    def read_rows(self, name: str, start: int, stop: int, *,
                  buffers: list[list[Tensor]] | None = None) -> list[StoredRows]: ...

    def rows_to_task_vectors(self, name: str, rows: list[StoredRows], device: torch.device,
                             dtype: torch.dtype, *, check: bool = True) -> TaskVectors: ...

    def placed_rows(self, name: str, device: torch.device, dtype: torch.dtype
                    ) -> tuple[Tensor, Tensor]: ...


class CheckpointSource:
    """Checkpoints on disk: a base and K experts (``Expert``), read one tensor at a time."""

    def __init__(self, base: str | Path, experts: Sequence[str | Path],
                 allow_nonfinite: bool = False, vocabulary: VocabularySource = "error",
                 tokenizer_model: int | None = None, tokens: Mapping[str, Any] | None = None):
        self.base = Checkpoint(base)
        self.allow_nonfinite = allow_nonfinite
        self.experts: list[Expert] = [open_expert(p, allow_nonfinite) for p in experts]
        info = self.model_info()
        pair = tied_pair(self.index(), info)
        for e in self.experts:
            if isinstance(e, AdapterExpert):
                e.adapter.check_against(self.base)
                warn_other_base(e.adapter, self.base)
            elif isinstance(e, DenseExpert):
                if pair is not None:
                    match_tied_head(self.base, e.ckpt, *pair)
                e.rows = added_token_rows(self.base, e.ckpt, info, vocabulary)
                check_compatible(self.base, e.ckpt, other_shape=e.rows)
        self.union: VocabularyUnion | None = None
        self.vocab_rows: dict[str, int] = {}  # output rows of the vocabulary-sized tensors
        # the tokenizer source's directory where it is an expert (its files are copied)
        self.tokenizer_dir = (None if not tokenizer_model else
                              self.experts[tokenizer_model - 1].config_dir)
        if vocabulary == "union" or tokens:
            self.union = vocabulary_union(
                self.base.config_dir, [e.config_dir for e in self.experts],
                self.tokenizer_dir, added=vocabulary == "union")
            if tokens:
                force_tokens(self.union, tokens, self.config_dirs, self.paths)
            if self.union.new or self.union.forced:
                self.vocab_rows = vocabulary_tensors(self.index(), info, self.union.size)
            else:
                log.info("tokenizer source: no expert adds a token; the base's vocabulary")
                self.union = None

    @classmethod
    def from_recipe(cls, recipe: Recipe, allow_nonfinite: bool = False) -> CheckpointSource:
        """The recipe's base and experts, with its tokenizer source for added tokens (a model:
        its vocabulary, which extends the base's; the base: the base's)."""
        model = recipe.tokenizer_model
        vocabulary: VocabularySource = (
            "union" if model else "base" if model == 0 else
            recipe.vocabulary if recipe.vocabulary in ("base", "union") else "error")
        tokens = ({t: spec.model_dump() for t, spec in recipe.tokenizer.tokens.items()}
                  if recipe.tokenizer is not None and recipe.tokenizer.tokens else None)
        return cls(recipe.base_model, [m.model for m in recipe.models], allow_nonfinite,
                   vocabulary, model, tokens)

    @property
    def config_dirs(self) -> list[Path | None]:
        """The base's directory of config files, then each expert's."""
        return [self.base.config_dir, *(e.config_dir for e in self.experts)]

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def paths(self) -> list[Path]:
        return [self.base.path, *(e.path for e in self.experts)]

    @property
    def config_dir(self) -> Path | None:
        return self.base.config_dir

    def input_files(self) -> list[Path]:
        """Every file a worker reads tensors from (the driver alone reads config files)."""
        return [*self.base.files, *(f for e in self.experts for f in e.files())]

    def index(self) -> dict[str, ParamInfo]:
        return {n: ParamInfo(i.shape, i.dtype) for n, i in self.base.infos.items()}

    def model_info(self) -> ModelInfo:
        """Roles' facts from the base's config.json (none: roles from names and shapes)."""
        cfg = self.base.config_dir / "config.json" if self.base.config_dir else None
        if cfg is None or not cfg.is_file():
            return ModelInfo()
        try:
            return ModelInfo.from_config(json.loads(cfg.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise CheckpointError(f"{cfg}: not valid JSON ({err})") from err

    def base_tensor(self, name: str) -> Tensor:
        return self.base.read(name)

    def input_tensor(self, ref: TensorRef) -> Tensor:
        """Tensor ``ref.name`` of model ``ref.model`` (0: the base) as stored, checked for
        NaN/Inf: a copy's input."""
        if ref.model == 0:
            return self._base(ref.name, check=True)
        expert = self.experts[ref.model - 1]
        assert isinstance(expert, DenseExpert)  # checked by check_refs
        return expert.read(ref.name)

    def check_refs(self, entries: Sequence[PlanEntry]) -> None:
        """Every input a plan entry names exists with the entry's shape (slices may name
        layers a model does not have), in a full checkpoint."""
        for e in entries:
            for ref in e.inputs:
                ckpt = self.base if ref.model == 0 else self.experts[ref.model - 1]
                if not isinstance(ckpt, (Checkpoint, DenseExpert)):
                    raise CheckpointError(f"{ckpt.path}: a LoRA adapter cannot be a slice's "
                                          f"source; give a full checkpoint")
                infos = ckpt.infos if isinstance(ckpt, Checkpoint) else ckpt.ckpt.infos
                info = infos.get(ref.name)
                if info is None:
                    raise CheckpointError(f"{ckpt.path}: no tensor {ref.name!r} (wanted for "
                                          f"{e.name!r}); does the layer_range go past its "
                                          f"layers?")
                if tuple(info.shape) != tuple(e.shape):
                    raise CheckpointError(f"{info.file}: tensor {ref.name!r} has shape "
                                          f"{list(info.shape)}, {e.name!r} needs "
                                          f"{list(e.shape)}")

    def _base(self, name: str, check: bool) -> Tensor:
        t = self.base.read(name)
        if check:
            check_finite(t, f"{self.base.infos[name].file}: tensor {name!r}",
                         self.allow_nonfinite)
        return t

    def reads_rows(self, name: str) -> bool:
        """Whether ``read_rows`` reads only the rows asked for: the base and every expert can
        (safetensors; an adapter that leaves ``name`` alone or saves it whole)."""
        return self.base.can_read_rows(name) and all(e.reads_rows(name) for e in self.experts)

    def read_rows(self, name: str, start: int, stop: int, *,
                  buffers: list[list[Tensor]] | None = None) -> list[StoredRows]:
        """Rows ``start:stop`` of ``name`` in the base, then in each expert, as stored: only
        file I/O (a reader thread's share). ``buffers``: one reusable buffer per input (a list
        of K + 1 lists, filled on first use), so that a loop over blocks allocates nothing; the
        rows are then views of them, valid until the next read into the same buffers (which
        ``rows_to_task_vectors`` copies out of)."""
        if buffers is not None and not buffers:
            buffers.extend([] for _ in range(1 + len(self.experts)))
        into = (lambda k: None) if buffers is None else (lambda k: buffers[k])
        out = [StoredRows(self.base.infos[name].file,
                          self.base.read_rows(name, start, stop, into=into(0)))]
        out += [e.read_rows(name, start, stop, into(k + 1)) for k, e in enumerate(self.experts)]
        return out

    def rows_to_task_vectors(self, name: str, rows: list[StoredRows], device: torch.device,
                             dtype: torch.dtype, *, check: bool = True) -> TaskVectors:
        """θ0 and the τ_i of the blocks ``read_rows`` gave, in new tensors (nothing refers to
        the blocks afterwards; ``rows`` is emptied as they are converted). ``check``: NaN/Inf in
        them is an error naming the file."""
        def convert(stored: StoredRows) -> Tensor:
            assert stored.rows is not None
            if check or stored.adapter:  # adapters' tensors are always checked as read
                check_finite(stored.rows, f"{stored.file}: tensor {name!r}",
                             self.allow_nonfinite)
            return to_compute(stored.rows, device, dtype)

        rows.reverse()  # pop from the end: each stored block is dropped once converted
        stored = rows.pop()
        theta0 = convert(stored)
        if theta0 is stored.rows:  # already in the compute dtype and on the device
            theta0 = theta0.clone()
        taus = []
        while rows:
            stored = rows.pop()
            if stored.rows is None:  # an adapter that leaves this tensor alone
                taus.append(torch.zeros_like(theta0))
                continue
            t = convert(stored)
            taus.append(torch.sub(t, theta0) if t is stored.rows else t.sub_(theta0))
        return TaskVectors(theta0, taus)

    def check_inputs(self, name: str, block_rows: int) -> None:
        """Raise the NonFiniteError of the first input of ``name`` (base, then experts) that
        holds NaN/Inf, counting over all its rows, read ``block_rows`` at a time where the file
        allows it. Called when an output that the method makes non-finite from any non-finite
        input is not finite, so that the error names the file."""
        if self.allow_nonfinite:
            return
        DenseExpert(self.base, self.allow_nonfinite, {}).check_inputs(name, block_rows)
        for e in self.experts:
            e.check_inputs(name, block_rows)

    def placed_rows(self, name: str, device: torch.device, dtype: torch.dtype
                    ) -> tuple[Tensor, Tensor]:
        """For the union vocabulary: the union ids of the added tokens and their rows of
        ``name``, each the mean of the rows of the experts that have the token."""
        assert self.union is not None
        full: dict[int, Tensor] = {}  # model (0: the base, i: expert i) → its tensor

        def row(model: int, j: int) -> Tensor:
            if model not in full:
                expert = self.experts[model - 1] if model else None
                assert expert is None or isinstance(expert, DenseExpert)  # adds no token
                full[model] = self.base.read(name) if expert is None else expert.read(name)
            if j >= full[model].shape[0]:
                path = self.experts[model - 1].path if model else self.base.path
                raise CheckpointError(f"{path}: token id {j} has no row in {name!r} "
                                      f"({full[model].shape[0]} rows)")
            return to_compute(full[model][j], device, dtype)

        ids, rows = [], []
        for _, _, uid in self.union.new:
            if uid not in self.union.forced:
                ids.append(uid)
                rows.append(torch.stack([row(i + 1, j) for i, j in
                                         self.union.sources[uid]]).mean(0))
        for uid, pick in self.union.forced.items():
            ids.append(uid)
            rows.append(row(*pick) if pick is not None else
                        torch.zeros(self.index()[name].shape[1:], device=device, dtype=dtype))
        return torch.tensor(ids, device=device), torch.stack(rows)

    @property
    def saved_names(self) -> set[str]:
        """Tensors that some adapter stores whole (``modules_to_save``)."""
        return {n for e in self.experts for n in e.saved}

    def needs_base(self, name: str) -> bool:
        """Whether some τ_i of ``name`` needs θ0: a full expert, or an adapter's saved module."""
        return any(e.needs_base(name) for e in self.experts)

    def task_vectors(self, name: str, device: torch.device, dtype: torch.dtype, *,
                     factored: bool = False, base: bool = True, check: bool = True
                     ) -> TaskVectors:
        """θ0 and the τ_i of ``name``. ``factored``: adapters give ``LowRank`` τ_i (rank 0 where
        they do not touch the weight) instead of dense ones. ``base`` False: θ0 is read only if
        some τ_i needs it (a factored merge of adapters reads no base weight). ``check`` False:
        the dense checkpoints' tensors are not checked for NaN/Inf (the caller checks the
        output, ``check_inputs``); adapters' always are."""
        theta0 = None
        if base or not factored or self.needs_base(name):
            theta0 = to_compute(self._base(name, check), device, dtype)
        shape = self.base.infos[name].shape
        taus = [e.task_vector(name, theta0, shape, device, dtype, factored=factored,
                              check=check) for e in self.experts]
        return TaskVectors(theta0, taus)


class StateDictSource:
    """In-memory state dicts (``merge_state_dicts``): a ``Source``, never a ``RowSource`` (its
    tensors are merged whole). The caller's tensors are never modified; ``config`` (a
    config.json as a dict) gives the parameter roles."""

    def __init__(self, base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]],
                 allow_nonfinite: bool = False, config: Mapping[str, Any] | None = None):
        self.config = dict(config or {})
        for i, sd in enumerate(experts):
            for name, t in base.items():
                other = sd.get(name)
                if other is None or tuple(other.shape) != tuple(t.shape):
                    found = "missing" if other is None else f"shape {list(other.shape)}"
                    raise IncompatibleCheckpointError(
                        f"expert state dict {i}: tensor {name!r} is {found}, expected shape "
                        f"{list(t.shape)} as in the base")
            extra = sorted(set(sd) - set(base))
            if extra:
                raise IncompatibleCheckpointError(
                    f"expert state dict {i}: tensor {extra[0]!r} is not in the base")
        self.base, self.experts = base, list(experts)
        self.allow_nonfinite = allow_nonfinite
        self.vocab_rows: dict[str, int] = {}  # no tokenizers in memory: no union vocabulary

    def index(self) -> dict[str, ParamInfo]:
        return {n: ParamInfo(tuple(t.shape), t.dtype) for n, t in self.base.items()}

    def model_info(self) -> ModelInfo:
        return ModelInfo.from_config(self.config)

    def base_tensor(self, name: str) -> Tensor:
        return self.base[name].clone()

    def needs_base(self, name: str) -> bool:
        return True

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def reads_rows(self, name: str) -> bool:
        return False  # the tensors are in memory already: merged whole, never by rows

    def check_inputs(self, name: str, block_rows: int) -> None:
        tensors = [self.base[name], *(sd[name] for sd in self.experts)]
        labels = ["base state dict", *(f"expert state dict {i}" for i in range(len(self.experts)))]
        for t, label in zip(tensors, labels, strict=True):
            check_finite(t, f"{label}: tensor {name!r}", self.allow_nonfinite)

    def task_vectors(self, name: str, device: torch.device, dtype: torch.dtype, *,
                     factored: bool = False, base: bool = True, check: bool = True
                     ) -> TaskVectors:
        """θ0 and the dense τ_i (state dicts hold no factored experts)."""
        tensors = [self.base[name], *(sd[name] for sd in self.experts)]
        if check:
            self.check_inputs(name, 0)
        theta0 = tensors[0].to(device, dtype, copy=True)
        return TaskVectors(theta0, [t.to(device, dtype, copy=True).sub_(theta0)
                                    for t in tensors[1:]])
