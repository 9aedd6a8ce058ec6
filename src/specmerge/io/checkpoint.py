"""Lazy checkpoint reading: HF directories, sharded or single safetensors, ``.bin``/``.pt``.

safetensors files are read one tensor at a time with positioned reads of exactly that tensor's
bytes (no mmap), so reading a model never maps it whole into memory and peak RSS stays at the
tensors in flight. ``.bin``/``.pt`` files go through ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from threading import Lock

import torch

from specmerge.errors import CheckpointError, IncompatibleCheckpointError

log = logging.getLogger(__name__)

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. ``offset`` is the absolute byte offset (safetensors only)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = -1
    nbytes: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: tensor table and ``__metadata__``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER or hlen + 8 > size:
                raise CheckpointError(
                    f"{path}: not a safetensors file or truncated (header claims {hlen} bytes, "
                    f"file has {size})")
            raw = f.read(hlen)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + hlen
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = ST_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from err
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} has {end - begin} bytes, expected {expected} for "
                f"shape {list(shape)} {entry['dtype']}")
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file "
                f"has {size} bytes")
        infos[name] = TensorInfo(name, shape, dtype, path, data_start + begin, expected)
    return infos, {str(k): str(v) for k, v in meta.items()}


def read_tensor_bytes(info: TensorInfo) -> torch.Tensor:
    """Read exactly one safetensors tensor with a positioned read (no mmap)."""
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    buf = bytearray(info.nbytes)
    view = memoryview(buf)
    try:
        fd = os.open(info.file, os.O_RDONLY)
    except OSError as err:
        raise CheckpointError(f"{info.file}: cannot open: {err.strerror or err}") from err
    try:
        done = 0
        while done < info.nbytes:
            n = os.preadv(fd, [view[done:]], info.offset + done)
            if n == 0:
                raise CheckpointError(
                    f"{info.file}: truncated while reading tensor {info.name!r} "
                    f"({done} of {info.nbytes} bytes)")
            done += n
    except OSError as err:
        raise CheckpointError(
            f"{info.file}: read error on tensor {info.name!r}: {err.strerror or err}") from err
    finally:
        os.close(fd)
    return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)


def _torch_load(path: Path) -> Mapping[str, torch.Tensor]:
    """Load a ``.bin``/``.pt`` state dict safely (weights only), memory-mapped where possible."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err) and "zip" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: file not found") from err
    except Exception as err:  # torch raises many types for corrupt/unsafe pickles
        raise CheckpointError(f"{path}: not a loadable PyTorch state dict: {err}") from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise CheckpointError(f"{path}: holds no tensors")
    return out


class Checkpoint:
    """A read-only, lazily loaded checkpoint. ``infos`` lists every tensor before any is read."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser().resolve()
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        self.files: list[Path] = []
        self.metadata: dict[str, str] = {}
        self.infos: dict[str, TensorInfo] = {}
        self._torch_cache: dict[Path, Mapping[str, torch.Tensor]] = {}
        self._lock = Lock()
        self._discover()

    def __getstate__(self) -> dict[str, object]:
        # picklable for backends that ship a job to another process: no lock, no loaded shards
        state = dict(self.__dict__)
        del state["_lock"], state["_torch_cache"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._torch_cache = {}
        self._lock = Lock()

    @property
    def config_dir(self) -> Path | None:
        """The HF directory holding config/tokenizer files, when the input is a directory."""
        return self.path if self.path.is_dir() else None

    def _discover(self) -> None:
        p = self.path
        if p.is_file():
            self._add_file(p)
            return
        for index_name in INDEX_FILES:
            index = p / index_name
            if index.is_file():
                self._add_index(index)
                return
        for name in WEIGHT_FILES:
            if (p / name).is_file():
                self._add_file(p / name)
                return
        candidates = sorted(p.glob("*.safetensors")) or sorted(
            [*p.glob("*.bin"), *p.glob("*.pt"), *p.glob("*.pth")])
        if len(candidates) == 1:
            self._add_file(candidates[0])
            return
        found = ", ".join(c.name for c in candidates) or "nothing"
        raise CheckpointError(
            f"{p}: no checkpoint found (expected model.safetensors, sharded model-*.safetensors "
            f"with model.safetensors.index.json, or pytorch_model*.bin; found {found})")

    def _add_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid shard index ({err})") from err
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            f = index.parent / shard
            if not f.is_file():
                raise CheckpointError(f"{index}: shard {shard} is missing from {index.parent}")
            self._add_file(f)
        missing = sorted(set(weight_map) - set(self.infos))
        if missing:
            raise CheckpointError(
                f"{index}: lists tensor {missing[0]!r} but its shard does not hold it")

    def _add_file(self, f: Path) -> None:
        self.files.append(f)
        if f.suffix == ".safetensors":
            infos, meta = read_safetensors_header(f)
            self.metadata.update(meta)
        elif f.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            sd = self._torch_shard(f)
            infos = {k: TensorInfo(k, tuple(v.shape), v.dtype, f) for k, v in sd.items()}
        else:
            raise CheckpointError(
                f"{f}: unsupported file type {f.suffix!r} (expected .safetensors, .bin or .pt)")
        for name in infos:
            if name in self.infos:
                raise CheckpointError(f"{f}: tensor {name!r} also appears in "
                                      f"{self.infos[name].file}")
        self.infos.update(infos)

    def _torch_shard(self, f: Path) -> Mapping[str, torch.Tensor]:
        with self._lock:
            if f not in self._torch_cache:
                self._torch_cache[f] = _torch_load(f)
            return self._torch_cache[f]

    def names(self) -> list[str]:
        return list(self.infos)

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor into memory (a private copy, safe to modify in place)."""
        info = self.infos.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        if info.offset >= 0:
            return read_tensor_bytes(info)
        return self._torch_shard(info.file)[name].clone()

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def num_params(self) -> int:
        return sum(i.numel for i in self.infos.values())


def check_compatible(base: Checkpoint, expert: Checkpoint) -> None:
    """Every expert holds exactly the base's tensor names and shapes, with compatible dtypes.

    Floating tensors may differ in float dtype (they are upcast anyway); non-floating ones must
    match exactly. The first mismatch is named, with the expert's file, expected and found.
    """
    for name, b in base.infos.items():
        e = expert.infos.get(name)
        if e is None:
            raise IncompatibleCheckpointError(
                f"{expert.path}: tensor {name!r} is missing (the base {base.path} has it, "
                f"shape {list(b.shape)})")
        if e.shape != b.shape:
            raise IncompatibleCheckpointError(
                f"{e.file}: tensor {name!r} has shape {list(e.shape)}, expected {list(b.shape)} "
                f"as in the base")
        if b.dtype.is_floating_point != e.dtype.is_floating_point or (
            not b.dtype.is_floating_point and b.dtype != e.dtype
        ):
            raise IncompatibleCheckpointError(
                f"{e.file}: tensor {name!r} has dtype {e.dtype}, expected {b.dtype} as in the base")
    extra = [n for n in expert.infos if n not in base.infos]
    if extra:
        raise IncompatibleCheckpointError(
            f"{expert.infos[extra[0]].file}: tensor {extra[0]!r} is not in the base {base.path}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
