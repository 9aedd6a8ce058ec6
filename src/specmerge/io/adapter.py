"""PEFT LoRA adapters as experts: ``adapter_config.json`` plus ``adapter_model.safetensors``.

A targeted weight W (out, in) has the task vector τ = s · B A, with B = ``lora_B`` (out, r),
A = ``lora_A`` (r, in) and s = α / r (α / √r with ``use_rslora``), α from ``lora_alpha`` or a
matching ``alpha_pattern`` entry (PEFT's ``LoraLayer``). With ``fan_in_fan_out`` (GPT-2's Conv1D,
stored (in, out)) τ = s · (B A)ᵀ. Untargeted weights have τ = 0; ``modules_to_save`` tensors are
stored whole, and their τ is the saved tensor minus θ0. Read with the same strict safetensors
reader as checkpoints; peft itself is not needed.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from specmerge.errors import CheckpointError, IncompatibleCheckpointError
from specmerge.io.checkpoint import Checkpoint
from specmerge.lowrank import LowRank

log = logging.getLogger(__name__)

CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
# PEFT features whose adapters are not a plain s·B·A on existing weights
REFUSED = {"use_dora": "DoRA (weight-decomposed LoRA)", "lora_bias": "LoRA biases",
           "layer_replication": "layer replication", "target_parameters": "parameter targets",
           "trainable_token_indices": "trainable token indices", "use_qalora": "QA-LoRA",
           "use_bdlora": "BD-LoRA"}


def is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


@dataclass(frozen=True)
class Lora:
    """One targeted weight: its factors' tensor names, scale and layout."""

    a: str
    b: str
    scale: float
    fan_in_fan_out: bool


class Adapter:
    """A read-only PEFT LoRA adapter directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        cfg_path = self.path / CONFIG
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise CheckpointError(f"{cfg_path}: not a readable adapter config ({err})") from err
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{cfg_path}: expected a JSON object")
        if cfg.get("peft_type") != "LORA":
            raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not "
                                  f"supported; specmerge reads LoRA adapters (peft_type LORA)")
        for key, what in REFUSED.items():
            if cfg.get(key):
                raise CheckpointError(f"{cfg_path}: {what} ({key}) is not supported; merge the "
                                      f"adapter into its base with peft and give the full model")
        self.config = cfg
        self.base_model = cfg.get("base_model_name_or_path")
        weights = self.path / "adapter_model.safetensors"
        if not weights.is_file():
            weights = self.path / "adapter_model.bin"
        self.file = Checkpoint(weights)
        self.lora: dict[str, Lora] = {}
        self.saved: dict[str, str] = {}  # base name → tensor name (modules_to_save)
        for key in self.file.infos:
            name = key.removeprefix(PREFIX).replace(".modules_to_save.default", "")
            if re.fullmatch(r"(.+)\.lora_embedding_[AB](?:\.default)?", name):
                raise CheckpointError(f"{weights}: {key!r} is a LoRA on an embedding layer "
                                      f"(lora_embedding_A/B), which specmerge does not read yet; "
                                      f"merge that adapter into its base with peft "
                                      f"(merge_and_unload) and give the full model")
            m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", name)
            if m is None:
                self.saved[name] = key
                continue
            module, which = m.groups()
            entry = self.lora.get(module + ".weight")
            a, b = (key, entry.b if entry else "") if which == "A" else (
                entry.a if entry else "", key)
            self.lora[module + ".weight"] = Lora(a, b, 0.0, bool(cfg.get("fan_in_fan_out")))
        for name, lora in list(self.lora.items()):
            if not lora.a or not lora.b:
                raise CheckpointError(f"{weights}: {name!r} has only one of lora_A and lora_B")
            a_shape, b_shape = self.file.infos[lora.a].shape, self.file.infos[lora.b].shape
            if len(a_shape) != 2 or len(b_shape) != 2 or 0 in a_shape or 0 in b_shape:
                raise CheckpointError(f"{weights}: the LoRA factors of {name!r} must be 2-D with "
                                      f"rank >= 1; found lora_A {list(a_shape)}, lora_B "
                                      f"{list(b_shape)}")
            r = a_shape[0]
            module = name.removesuffix(".weight")
            expected = _pattern_value(_mapping(cfg, "rank_pattern", cfg_path), module,
                                      _number(cfg, "r", cfg_path, r))
            if expected != r:
                raise CheckpointError(f"{cfg_path}: r = {expected:g} for {module!r}, but its "
                                      f"lora_A has rank {r}; peft would refuse this adapter")
            alpha = _pattern_value(_mapping(cfg, "alpha_pattern", cfg_path), module,
                                   _number(cfg, "lora_alpha", cfg_path, 8))
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            self.lora[name] = Lora(lora.a, lora.b, float(scale), lora.fan_in_fan_out)

    @property
    def config_dir(self) -> None:
        return None  # an adapter carries no model config; the base's is used

    def check_against(self, base: Checkpoint) -> None:
        """Every targeted weight and saved module exists in the base with the right shape."""
        for name, lora in self.lora.items():
            b = base.infos.get(name)
            a_info, b_info = self.file.infos[lora.a], self.file.infos[lora.b]
            shape = (b_info.shape[0], a_info.shape[1])
            if lora.fan_in_fan_out:
                shape = shape[::-1]
            if b is None:
                raise IncompatibleCheckpointError(f"{self.path}: the adapter targets {name!r}, "
                                                  f"which the base {base.path} does not have")
            if b.shape != shape or a_info.shape[0] != b_info.shape[1]:
                raise IncompatibleCheckpointError(
                    f"{self.path}: lora_B {list(b_info.shape)} · lora_A {list(a_info.shape)} of "
                    f"{name!r} does not make the base's shape {list(b.shape)}")
        for name, key in self.saved.items():
            b = base.infos.get(name)
            if b is None:
                raise IncompatibleCheckpointError(
                    f"{self.path}: the adapter holds {key!r}, which is neither a LoRA factor "
                    f"(lora_A/lora_B) nor a saved module of a tensor the base {base.path} has "
                    f"(no {name!r} there)")
            if b.shape != self.file.infos[key].shape:
                raise IncompatibleCheckpointError(
                    f"{self.path}: saved module tensor {name!r} "
                    f"{list(self.file.infos[key].shape)} does not match the base's "
                    f"{list(b.shape)}")

    def factors(self, name: str, device: torch.device, dtype: torch.dtype,
                read: Callable[[Checkpoint, str], torch.Tensor]) -> LowRank | None:
        """τ = s · B A of a targeted weight, factored, in the base's stored layout (transposed
        for ``fan_in_fan_out``); None when the adapter does not target ``name``."""
        lora = self.lora.get(name)
        if lora is None:
            return None
        tau = LowRank(read(self.file, lora.b).to(device).to(dtype),
                      read(self.file, lora.a).to(device).to(dtype), lora.scale)
        return tau.mT if lora.fan_in_fan_out else tau

    def task_vector(self, name: str, theta0: torch.Tensor,
                    read: Callable[[Checkpoint, str], torch.Tensor]) -> torch.Tensor:
        """τ of ``name`` in θ0's dtype and device, dense; ``read(checkpoint, key)`` reads a
        tensor."""
        tau = self.factors(name, theta0.device, theta0.dtype, read)
        if tau is not None:
            return tau.dense().contiguous()
        if name in self.saved:
            return read(self.file, self.saved[name]).to(theta0.device, theta0.dtype).sub_(theta0)
        return torch.zeros_like(theta0)


def _number(cfg: dict[str, object], key: str, path: Path, default: float) -> float:
    """A positive number of the adapter config (``r``, ``lora_alpha``), the field named."""
    value = cfg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise CheckpointError(f"{path}: {key} must be a positive number, got "
                              f"{str(value)[:40]!r}")
    return float(value)


def _mapping(cfg: dict[str, object], key: str, path: Path) -> dict[str, float]:
    """``alpha_pattern`` or ``rank_pattern``: module-name regexes to positive numbers."""
    patterns = cfg.get(key) or {}
    if not isinstance(patterns, dict):
        raise CheckpointError(f"{path}: {key} must map module names to numbers")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise CheckpointError(f"{path}: {key} key {pattern!r} is not a regular "
                                  f"expression ({err})") from None
        _number(patterns, pattern, path, 1)
    return {k: float(v) for k, v in patterns.items()}


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's per-module override: the first key that matches the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default
