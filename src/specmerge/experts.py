"""Experts: one fine-tuned model of the base, behind one small interface, whatever its kind.

An expert answers, per parameter of the base: whether its task vector needs θ0
(``needs_base``), whether it can be read by rows (``reads_rows``, ``read_rows``), its task
vector τ_i whole (``task_vector``: dense, or factored where the kind allows it), and the scan
that names its file when a merged output is not finite (``check_inputs``). Two kinds today:

- ``DenseExpert``: a full checkpoint (safetensors, sharded, ``.bin``); τ_i = θ_i − θ0.
- ``AdapterExpert``: a PEFT LoRA adapter; τ_i = s·B·A on the weights it targets, θ_i − θ0 on the
  modules it saves, 0 elsewhere.

A new kind (say, a DoRA adapter or a quantized checkpoint) is one more class here, with an
``open_expert`` rule; the sources, the engine and the formats do not change.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from specmerge.io.adapter import Adapter, is_adapter
from specmerge.io.checkpoint import Checkpoint
from specmerge.lowrank import LowRank, TaskVector
from specmerge.numerics import check_finite, count_nonfinite, nonfinite_error, to_compute

log = logging.getLogger(__name__)


@dataclass
class StoredRows:
    """A row block of one input as stored (its file's dtype), with the file it came from.
    ``rows`` None: an adapter that does not touch the tensor (its τ is zero there).
    ``adapter``: the rows are an adapter's saved module, checked for NaN/Inf however read."""

    file: Path
    rows: Tensor | None
    adapter: bool = False


class Expert(Protocol):
    """One expert. ``kind``: "dense" or "adapter". The adapter facts (``targets``: the weights
    its LoRA factors target, ``saved``: its whole modules, ``ranks``, ``fan_in_fan_out``,
    ``factor_dtype``) are empty, False or None for a dense expert."""

    kind: str
    path: Path
    targets: frozenset[str]
    saved: frozenset[str]
    ranks: tuple[int, ...]
    fan_in_fan_out: bool
    factor_dtype: torch.dtype | None

    @property
    def config_dir(self) -> Path | None: ...

    def files(self) -> list[Path]: ...

    def needs_base(self, name: str) -> bool: ...

    def reads_rows(self, name: str) -> bool: ...

    def read_rows(self, name: str, start: int, stop: int,
                  into: list[Tensor] | None) -> StoredRows: ...

    def task_vector(self, name: str, theta0: Tensor | None, shape: Sequence[int],
                    device: torch.device, dtype: torch.dtype, *, factored: bool,
                    check: bool) -> TaskVector: ...

    def check_inputs(self, name: str, block_rows: int) -> None: ...


class DenseExpert:
    """A full checkpoint. ``rows``: tensors read up to the base's rows (added tokens dropped,
    or placed by a union vocabulary)."""

    kind = "dense"
    targets: frozenset[str] = frozenset()
    saved: frozenset[str] = frozenset()
    ranks: tuple[int, ...] = ()
    fan_in_fan_out = False
    factor_dtype: torch.dtype | None = None

    def __init__(self, ckpt: Checkpoint, allow_nonfinite: bool, rows: dict[str, int]):
        self.ckpt, self.allow_nonfinite, self.rows = ckpt, allow_nonfinite, rows
        self.path = ckpt.path

    @property
    def config_dir(self) -> Path | None:
        return self.ckpt.config_dir

    def files(self) -> list[Path]:
        return list(self.ckpt.files)

    def needs_base(self, name: str) -> bool:
        return True

    def reads_rows(self, name: str) -> bool:
        return self.ckpt.can_read_rows(name)

    def read_rows(self, name: str, start: int, stop: int,
                  into: list[Tensor] | None) -> StoredRows:
        return StoredRows(self.ckpt.infos[name].file,
                          self.ckpt.read_rows(name, start, stop, into=into))

    def read(self, name: str, check: bool = True) -> Tensor:
        """The whole stored tensor, checked for NaN/Inf unless ``check`` is False."""
        t = self.ckpt.read(name)
        if check:
            check_finite(t, f"{self.ckpt.infos[name].file}: tensor {name!r}",
                         self.allow_nonfinite)
        return t

    def task_vector(self, name: str, theta0: Tensor | None, shape: Sequence[int],
                    device: torch.device, dtype: torch.dtype, *, factored: bool,
                    check: bool) -> TaskVector:
        assert theta0 is not None
        t = self.read(name, check)
        if name in self.rows:
            t = t[:self.rows[name]]
        return to_compute(t, device, dtype).sub_(theta0)

    def check_inputs(self, name: str, block_rows: int) -> None:
        if self.allow_nonfinite:
            return
        info = self.ckpt.infos[name]
        rows = info.shape[0] if info.shape else 1
        if self.ckpt.can_read_rows(name):
            bad = sum(count_nonfinite(self.ckpt.read_rows(name, lo, min(lo + block_rows, rows)))
                      for lo in range(0, rows, max(1, block_rows)))
        else:
            bad = count_nonfinite(self.ckpt.read(name))
        if bad:
            raise nonfinite_error(f"{info.file}: tensor {name!r}", bad)


class AdapterExpert:
    """A PEFT LoRA adapter; its tensors are always checked for NaN/Inf as they are read."""

    kind = "adapter"

    def __init__(self, adapter: Adapter, allow_nonfinite: bool):
        self.adapter, self.allow_nonfinite = adapter, allow_nonfinite
        self.path = adapter.path
        self.targets = frozenset(adapter.lora)
        self.saved = frozenset(adapter.saved)
        self.ranks = tuple(adapter.file.infos[lo.a].shape[0] for lo in adapter.lora.values())
        self.fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
        self.factor_dtype = next((adapter.file.infos[lo.a].dtype
                                  for lo in adapter.lora.values()), None)

    @property
    def config_dir(self) -> Path | None:
        return None  # an adapter carries no model config; the base's is used

    def files(self) -> list[Path]:
        return list(self.adapter.file.files)

    def needs_base(self, name: str) -> bool:
        return name in self.saved

    def reads_rows(self, name: str) -> bool:
        """A weight its LoRA targets is read whole (τ = s·B·A, formed per tensor)."""
        return name not in self.targets and (
            name not in self.saved
            or self.adapter.file.can_read_rows(self.adapter.saved[name]))

    def read_rows(self, name: str, start: int, stop: int,
                  into: list[Tensor] | None) -> StoredRows:
        key = self.adapter.saved.get(name)
        if key is None:
            return StoredRows(self.path, None)
        return StoredRows(self.adapter.file.infos[key].file,
                          self.adapter.file.read_rows(key, start, stop, into=into), adapter=True)

    def _read(self, ckpt: Checkpoint, key: str) -> Tensor:
        t = ckpt.read(key)
        check_finite(t, f"{ckpt.infos[key].file}: tensor {key!r}", self.allow_nonfinite)
        return t

    def task_vector(self, name: str, theta0: Tensor | None, shape: Sequence[int],
                    device: torch.device, dtype: torch.dtype, *, factored: bool,
                    check: bool) -> TaskVector:
        """Factored: s·B·A as ``LowRank`` (rank 0 where the adapter does not touch a 2-D
        weight); otherwise, and for a saved module, dense."""
        if factored:
            tau = self.adapter.factors(name, device, dtype, self._read)
            if tau is not None:
                return tau
            if name not in self.saved:
                return (zero_factors(shape, device, dtype) if len(shape) == 2
                        else torch.zeros(tuple(shape), device=device, dtype=dtype))
        assert theta0 is not None
        return self.adapter.task_vector(name, theta0, self._read)

    def check_inputs(self, name: str, block_rows: int) -> None:
        """Nothing: adapters' tensors are checked as they are read."""


def zero_factors(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> LowRank:
    """τ = 0 of a 2-D weight as a rank-0 factored task vector."""
    return LowRank(torch.zeros(shape[0], 0, device=device, dtype=dtype),
                   torch.zeros(0, shape[1], device=device, dtype=dtype))


def open_expert(path: str | Path, allow_nonfinite: bool) -> DenseExpert | AdapterExpert:
    """The expert at ``path``: an adapter directory (adapter_config.json), else a checkpoint.
    A dense expert's row limits are set by the source once it knows the base."""
    if is_adapter(Path(path).expanduser()):
        return AdapterExpert(Adapter(path), allow_nonfinite)
    return DenseExpert(Checkpoint(path), allow_nonfinite, {})
