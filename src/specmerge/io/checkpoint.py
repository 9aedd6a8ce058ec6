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
import stat
import struct
from collections.abc import Collection, Iterator, Mapping
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
    **{name: getattr(torch, attr) for name, attr in (("U16", "uint16"), ("U32", "uint32"),
                                                     ("U64", "uint64")) if hasattr(torch, attr)},
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100_000_000  # the safetensors library's limit
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INCOMPLETE_MARKER = "SPECMERGE_INCOMPLETE"  # written by io.writer into an unfinished output
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


class HeaderError(ValueError):
    """A safetensors header that the safetensors library would refuse."""


def _reject_constant(name: str) -> object:
    raise HeaderError(f"the JSON holds {name}, which JSON does not allow")


def _uint(x: object, what: str) -> int:
    # serde's usize: a JSON integer (not a float, not a bool) in [0, 2^64)
    if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 2**64:
        raise HeaderError(f"{what} must be a non-negative integer, got {str(x)[:40]!r}")
    return x


def _parse_int(token: str) -> int | float:
    # serde reads "-0" as a negative number, which no u64 field accepts; Python reads 0
    return -0.0 if token == "-0" else int(token)


ENTRY_FIELDS = ("dtype", "shape", "data_offsets")


def _no_duplicate_fields(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object as serde reads safetensors' header: a field of a tensor entry, or
    ``__metadata__``, given twice is an error; a string with a lone surrogate (which UTF-8
    cannot hold) is an error. Other repeated keys keep the last value, as serde's maps do."""
    keys = [k for k, _ in pairs]
    for k, v in pairs:
        for text in (k, v) if isinstance(v, str) else (k,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise HeaderError(f"the header holds a lone surrogate in {text[:40]!r}, which "
                                  f"UTF-8 cannot encode") from None
    is_entry = set(keys) & set(ENTRY_FIELDS)
    for field in (ENTRY_FIELDS if is_entry else ("__metadata__",)):
        if keys.count(field) > 1:
            raise HeaderError(f"duplicate field {field!r} in the header")
    return dict(pairs)


def parse_safetensors_header(raw: bytes, data_size: int) -> tuple[dict[str, tuple[str, tuple[
        int, ...], int, int]], dict[str, str]]:
    """Validate a safetensors header as the safetensors library does; return, per tensor in
    header order, (dtype name, shape, begin, end) relative to the data section, and the metadata.

    The rules (safetensors 0.4–0.8, ``Metadata::validate``): the header is a UTF-8 JSON object;
    ``__metadata__`` is null or maps strings to strings; every other value is an object with a
    known ``dtype``, a ``shape`` of non-negative integers and two non-negative integer
    ``data_offsets``; sorted by offsets, the ranges start at 0, are contiguous, each holds
    exactly numel × itemsize bytes, and the last ends where the file ends. Raises HeaderError.
    """
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int,
                            object_pairs_hook=_no_duplicate_fields)
    except UnicodeDecodeError as err:
        raise HeaderError("the header is not UTF-8") from err
    except json.JSONDecodeError as err:
        raise HeaderError(f"the header is not valid JSON ({err.msg} at byte {err.pos})") from err
    if not isinstance(header, dict):
        raise HeaderError(f"the header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise HeaderError("__metadata__ must map strings to strings")
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, entry in header.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise HeaderError(f"{where}: expected an object with dtype, shape and data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise HeaderError(f"{where}: unknown or unsupported dtype {str(dtype)[:40]!r} "
                              f"(supported: {', '.join(ST_DTYPES)})")
        if not isinstance(shape, list):
            raise HeaderError(f"{where}: shape must be a list of integers")
        dims = tuple(_uint(d, f"{where}: a dimension of shape") for d in shape)
        numel = 1
        for d in dims:  # as safetensors multiplies, left to right, each product checked
            numel *= d
            if numel >= 2**64:
                raise HeaderError(f"{where}: the product of shape {list(dims)} overflows 64 bits")
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise HeaderError(f"{where}: data_offsets must be two integers [begin, end]")
        begin, end = (_uint(o, f"{where}: data_offsets") for o in offsets)
        tensors[name] = (dtype, dims, begin, end)
    start = 0
    ordered = sorted(tensors.items(), key=lambda kv: kv[1][2:])
    for name, (dtype, dims, begin, end) in ordered:
        if begin != start or end < begin:
            problem = "overlaps another tensor" if begin < start else "leaves a gap before it"
            raise HeaderError(f"tensor {name!r}: data_offsets [{begin}, {end}] {problem} or are "
                              f"out of order (expected it to begin at {start})")
        expected = math.prod(dims) * ST_DTYPES[dtype].itemsize
        if end - begin != expected:
            raise HeaderError(f"tensor {name!r} has {end - begin} bytes, expected {expected} for "
                              f"shape {list(dims)} {dtype}")
        start = end
    if start > data_size:
        name, (_, _, _, end) = next(kv for kv in ordered if kv[1][3] > data_size)
        raise HeaderError(f"truncated: tensor {name!r} ends at byte {end} of the data but the "
                          f"file holds {data_size} bytes of data")
    if start < data_size:
        raise HeaderError(f"{data_size - start} bytes after the last tensor that no tensor "
                          f"covers")
    return tensors, {str(k): v for k, v in meta.items()}


def require_regular_file(path: Path) -> None:
    """Refuse, before any ``open``, a weight file that is a FIFO, socket or device: opening a
    FIFO blocks until something writes to it, so a merge would hang with no output."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: file not found") from err
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror}") from err
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if
                stat.S_ISSOCK(mode) else "a directory" if stat.S_ISDIR(mode) else "a device")
        raise CheckpointError(f"{path}: is {kind}, not a regular file; a checkpoint's weights "
                              f"must be a file")


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate a safetensors header (see ``parse_safetensors_header``)."""
    require_regular_file(path)
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
    data_start = 8 + hlen
    try:
        tensors, meta = parse_safetensors_header(raw, size - data_start)
    except HeaderError as err:
        what = "" if str(err).startswith("truncated") else "not a valid safetensors file: "
        raise CheckpointError(f"{path}: {what}{err}") from err
    infos = {name: TensorInfo(name, dims, ST_DTYPES[dtype], path, data_start + begin,
                              end - begin)
             for name, (dtype, dims, begin, end) in tensors.items()}
    return infos, meta


def read_tensor_bytes(info: TensorInfo, start: int = 0, stop: int | None = None, *,
                      into: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Read one safetensors tensor, or its rows ``start:stop`` (the first dimension), with a
    positioned read of exactly those bytes (no mmap): a row block of a row-major tensor is one
    contiguous byte range. ``into``: a one-element list holding a reusable uint8 buffer (made
    on first use, grown if too small); the result is then a view of it, valid until the next
    read into it."""
    rows = info.shape[0] if info.shape else 1
    stop = rows if stop is None else stop
    if not 0 <= start <= stop <= rows:
        raise ValueError(f"rows {start}:{stop} out of range for tensor {info.name!r} "
                         f"({rows} rows)")
    row_bytes = info.nbytes // rows if rows else 0
    shape = (stop - start, *info.shape[1:]) if info.shape else info.shape
    nbytes = (stop - start) * row_bytes
    if nbytes == 0:
        return torch.empty(shape, dtype=info.dtype)
    offset = info.offset + start * row_bytes
    if into is None:
        buf = torch.empty(nbytes, dtype=torch.uint8)  # not zero-filled: every byte is read
    else:
        if not into or into[0].numel() < nbytes:
            into[:] = [torch.empty(nbytes, dtype=torch.uint8)]
        buf = into[0][:nbytes]
    view = memoryview(buf.numpy())
    try:
        fd = os.open(info.file, os.O_RDONLY)
    except OSError as err:
        raise CheckpointError(f"{info.file}: cannot open: {err.strerror or err}") from err
    try:
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CheckpointError(
                    f"{info.file}: truncated while reading tensor {info.name!r} "
                    f"({start * row_bytes + done} of {info.nbytes} bytes)")
            done += n
    except OSError as err:
        raise CheckpointError(
            f"{info.file}: read error on tensor {info.name!r}: {err.strerror or err}") from err
    finally:
        os.close(fd)
    return buf.view(info.dtype).reshape(shape)


def _torch_load(path: Path) -> Mapping[str, torch.Tensor]:
    """Load a ``.bin``/``.pt`` state dict safely (weights only), memory-mapped where possible."""
    require_regular_file(path)
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
        if self.path.is_dir() and (self.path / INCOMPLETE_MARKER).exists():
            raise CheckpointError(f"{self.path}: an unfinished specmerge output (it holds "
                                  f"{INCOMPLETE_MARKER}: a merge was interrupted while writing "
                                  f"it, so its weights are partly zero); not a usable model")
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
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise CheckpointError(f"{index}: not a valid shard index ({err})") from err
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            found = "no 'weight_map'" if weight_map is None else (
                f"a 'weight_map' that is a JSON {type(weight_map).__name__}")
            raise CheckpointError(f"{index}: not a valid shard index: expected an object with a "
                                  f"'weight_map' mapping tensor names to shard files, found "
                                  f"{found}")
        bad = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise CheckpointError(f"{index}: weight_map[{bad!r}] must be a shard file name, got "
                                  f"{str(weight_map[bad])[:80]!r}")
        for shard in sorted(set(weight_map.values())):
            # a plain file name: no directory part, so nothing outside the checkpoint directory
            # is read (a shard that is a symlink, as in the HF cache, is the user's own link)
            if shard in ("", ".", "..") or "/" in shard or "\\" in shard or os.sep in shard:
                raise CheckpointError(f"{index}: shard {shard!r} is not a file name in "
                                      f"{index.parent}; refusing to read outside the checkpoint "
                                      f"directory")
            f = index.parent / shard
            if not f.is_file():
                raise CheckpointError(f"{index}: shard {shard} is missing from {index.parent}")
            self._add_file(f)
        for name, shard in weight_map.items():
            info = self.infos.get(name)
            if info is None or info.file.name != Path(shard).name:
                raise CheckpointError(f"{index}: lists tensor {name!r} in {shard} but that "
                                      f"shard does not hold it")

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
        return self._torch_shard(info.file)[info.name].clone()

    def can_read_rows(self, name: str) -> bool:
        """Whether ``read_rows`` reads only the rows asked for (safetensors, at least 1-D)."""
        info = self.infos.get(name)
        return info is not None and info.offset >= 0 and len(info.shape) >= 1

    def read_rows(self, name: str, start: int, stop: int, *,
                  into: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of one tensor (its first dimension), a private copy (with
        ``into``, a view of that reusable buffer: see ``read_tensor_bytes``). Reads only those
        bytes from a safetensors file; a ``.bin`` tensor is sliced after loading."""
        info = self.infos.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        if info.offset >= 0:
            return read_tensor_bytes(info, start, stop, into=into)
        return self._torch_shard(info.file)[info.name][start:stop].clone()

    def alias(self, name: str, target: str) -> None:
        """Read ``name`` as ``target`` (a tied weight that this checkpoint does not store)."""
        self.infos[name] = self.infos[target]

    def drop(self, name: str) -> None:
        """Leave out ``name`` (a stored copy of a tied weight that the base does not store)."""
        del self.infos[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def num_params(self) -> int:
        return sum(i.numel for i in self.infos.values())


def check_compatible(base: Checkpoint, expert: Checkpoint,
                     other_shape: Collection[str] = ()) -> None:
    """Every expert holds exactly the base's tensor names and shapes, with compatible dtypes.

    Floating tensors may differ in float dtype (they are upcast anyway); non-floating ones must
    match exactly. ``other_shape`` names tensors whose shape the caller reconciles (added
    tokens). The first mismatch is named, with the expert's file, expected and found.
    """
    for name, b in base.infos.items():
        e = expert.infos.get(name)
        if e is not None and name in other_shape:
            continue
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
