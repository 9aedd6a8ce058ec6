"""Atomic, streaming output: sharded safetensors written tensor by tensor at fixed offsets.

The plan knows every output name, shape and dtype before the first tensor is merged, so the
shard layout and every header are fixed up front, the shard files are preallocated (a full disk
fails before any work), and each tensor's bytes go straight to their offset with ``pwrite``.
No shard is ever buffered in memory, and writes from several threads are safe.

Everything lands in a hidden temporary sibling of the output directory, which is renamed into
place only once complete (``atomic_output_dir``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from specmerge.errors import OutputError
from specmerge.io.checkpoint import INCOMPLETE_MARKER, ST_NAMES

log = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """'5GB' → 5·10⁹ bytes (decimal, as HF uses), '512MiB' → 512·2²⁰, 1000 → 1000."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"invalid size {size!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class _Slot:
    shard: int
    offset: int  # absolute offset in the shard file
    nbytes: int
    spec: OutTensor


def plan_shards(tensors: Sequence[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Greedy, order-preserving split into shards of at most ``max_bytes`` of tensor data.

    A tensor larger than ``max_bytes`` gets a shard of its own (as transformers does).
    """
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header_bytes(tensors: Sequence[OutTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """One safetensors file with a deterministic header (tensors in the order given, metadata
    in insertion order: the same inputs give the same bytes), created exclusively and fsynced."""
    specs = [OutTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    try:
        with open(path, "xb") as f:
            f.write(_header_bytes(specs, {"format": "pt", **(metadata or {})}))
            for t in tensors.values():
                f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                        .numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise _disk_error(err, path) from err


@dataclass(frozen=True)
class Region:
    """Where one planned tensor's bytes lie in its shard, so that row blocks of it can be written
    separately, from any thread (or process on the same file system): each ``write_rows`` opens
    the shard, writes the rows' bytes at their offset and closes it. Picklable."""

    name: str
    file: Path
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def write(self, tensor: torch.Tensor) -> None:
        """Write the whole tensor (any shape, a scalar too) in its planned dtype."""
        if tensor.dtype != self.dtype or tuple(tensor.shape) != self.shape:
            raise ValueError(f"writer: tensor {self.name!r} is {list(tensor.shape)} "
                             f"{tensor.dtype}, planned {list(self.shape)} {self.dtype}")
        self._put(0, tensor)

    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        """Write ``rows`` (rows ``start:start + len(rows)`` of the tensor, in its dtype)."""
        if (rows.dtype != self.dtype or tuple(rows.shape[1:]) != self.shape[1:]
                or not 0 <= start <= start + rows.shape[0] <= self.shape[0]):
            raise ValueError(f"writer: rows {start}:{start + rows.shape[0]} of {self.name!r} "
                             f"are {list(rows.shape)} {rows.dtype}, planned {list(self.shape)} "
                             f"{self.dtype}")
        self._put(start * self.row_bytes, rows)

    def _put(self, at: int, tensor: torch.Tensor) -> None:
        """``tensor``'s bytes at ``at`` bytes into the tensor's region."""
        if tensor.numel() == 0:
            return
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        try:
            fd = os.open(self.file, os.O_WRONLY)
        except OSError as err:
            raise _disk_error(err, self.file) from err
        try:
            _pwrite_all(fd, memoryview(data.numpy()), self.offset + at, self.file)
        finally:
            os.close(fd)


class ShardedWriter:
    """Writes a fixed set of tensors into preallocated safetensors shards in ``directory``."""

    def __init__(self, directory: Path, tensors: Sequence[OutTensor], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        metadata = {"format": "pt", **(metadata or {})}
        groups = plan_shards(tensors, max_shard_bytes)
        self.files = [self.directory / n for n in shard_names(len(groups))]
        self.slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self._written: set[str] = set()
        try:
            for i, (group, path) in enumerate(zip(groups, self.files, strict=True)):
                header = _header_bytes(group, metadata)
                total = len(header) + sum(t.nbytes for t in group)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self._fds.append(fd)
                _preallocate(fd, total, path)
                _pwrite_all(fd, header, 0, path)
                offset = len(header)
                for t in group:
                    self.slots[t.name] = _Slot(i, offset, t.nbytes, t)
                    offset += t.nbytes
        except BaseException:
            self.close()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.slots[name]
        spec = slot.spec
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"writer: tensor {name!r} is {list(tensor.shape)} {tensor.dtype}, "
                             f"planned {list(spec.shape)} {spec.dtype}")
        if slot.nbytes:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            _pwrite_all(self._fds[slot.shard], memoryview(data.numpy()), slot.offset,
                        self.files[slot.shard])
        self._written.add(name)

    def region(self, name: str) -> Region:
        """Where ``name``'s bytes go, for writing it by row blocks (then ``mark_written``)."""
        slot = self.slots[name]
        return Region(name, self.files[slot.shard], slot.offset, slot.spec.shape,
                      slot.spec.dtype)

    def mark_written(self, name: str) -> None:
        """Record that every row of ``name`` was written through its ``region``."""
        if name not in self.slots:
            raise KeyError(name)
        self._written.add(name)

    def finish(self) -> dict[str, str]:
        """Flush and close every shard; return the weight map (tensor name → shard file name)."""
        missing = [n for n in self.slots if n not in self._written]
        if missing:
            raise RuntimeError(f"writer: {len(missing)} tensors never written, e.g. {missing[0]!r}")
        start = time.perf_counter()
        for fd, path in zip(self._fds, self.files, strict=True):
            try:
                os.fsync(fd)
            except OSError as err:
                raise OutputError(f"{path}: cannot flush: {err.strerror}") from err
        log.info("fsync of %d shard file(s), %.0f MB: %.2f s", len(self.files),
                 sum(s.nbytes for s in self.slots.values()) / 1e6, time.perf_counter() - start)
        self.close()
        return {n: self.files[s.shard].name for n, s in self.slots.items()}

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def write_index(self, weight_map: dict[str, str]) -> None:
        """``model.safetensors.index.json``, written only when there is more than one shard."""
        if len(self.files) == 1:
            return
        total = sum(s.nbytes for s in self.slots.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_text(self.directory / "model.safetensors.index.json",
                   json.dumps(index, indent=2) + "\n")


def _disk_error(err: OSError, path: Path) -> OutputError:
    if err.errno == errno.ENOSPC:
        return OutputError(f"{path}: disk full (no space left on device); nothing was written "
                           f"to the output and the inputs are untouched")
    return OutputError(f"{path}: write failed: {err.strerror or err}")


def _preallocate(fd: int, size: int, path: Path) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            os.ftruncate(fd, size)  # filesystem without fallocate: sparse file
        else:
            raise _disk_error(err, path) from err


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int, path: Path) -> None:
    view = memoryview(data).cast("B")
    done = 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:done + (1 << 30)], offset + done)
    except OSError as err:
        raise _disk_error(err, path) from err


def write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise _disk_error(err, path) from err


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``path`` to write; on success it replaces ``path``
    in one rename, on failure it is removed. Readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path) as tmp:
        write_text(tmp, text)
    return Path(path)


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


Identity = tuple[int, int]  # (st_dev, st_ino): which directory was at OUT when a merge started


def output_identity(path: Path) -> Identity | None:
    """The (device, inode) of what is at ``path`` now, or None when nothing is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def output_path(out_dir: str | os.PathLike[str]) -> Path:
    """OUT as the user named it, made absolute: the parent is resolved, the last component is
    not, so a symbolic link at OUT stays the link (never its target; see ``check_output_path``).
    """
    p = Path(out_dir).expanduser()
    if p.name in ("", ".", ".."):
        return p.resolve()
    return p.absolute().parent.resolve() / p.name


# What a specmerge output holds: an HF or PEFT output its resolved recipe, an analyze report its
# page and data. ``--force`` replaces only a directory holding one of these sets.
OUTPUT_SIGNATURES = (("specmerge_recipe.yaml",), ("report.json", "index.html"))


def is_specmerge_output(path: Path) -> bool:
    return any(all((path / f).is_file() for f in sig) for sig in OUTPUT_SIGNATURES)


def check_output_path(out_dir: Path, inputs: Sequence[Path], force: bool) -> Identity | None:
    """Refuse an existing output without ``force``, and any overlap between output and inputs.

    OUT is the path the user named (``output_path``): a symbolic link there is refused, with
    or without ``force``, since replacing it would replace either the link or what it points
    to, and neither is a specmerge output. ``force`` replaces only an empty directory or a
    previous specmerge output (``OUTPUT_SIGNATURES``); anything else is refused with what is
    there named. Returns the identity of the existing OUT that ``force`` allows to be replaced
    (None when OUT does not exist): pass it to ``atomic_output_dir`` so that only that one is
    replaced.
    """
    if out_dir.is_symlink():
        raise OutputError(f"output {out_dir} is a symbolic link (to {os.readlink(out_dir)}); "
                          f"specmerge writes OUT at the path named and never replaces a link "
                          f"or its target: name the directory itself, or remove the link")
    for inp in inputs:
        # a directory input may not contain the output; a file input may not be the output
        if out_dir == inp or (inp.is_dir() and _is_within(out_dir, inp)):
            raise OutputError(f"output {out_dir} lies inside the input {inp}; "
                              f"choose a directory outside every input")
        if _is_within(inp, out_dir):
            raise OutputError(f"the input {inp} lies inside the output {out_dir}; refusing, since "
                              f"replacing the output would delete it")
    if out_dir.exists() and not force:
        raise OutputError(f"output {out_dir} already exists; pass --force (force=True) to "
                          f"replace it (the old one is then deleted)")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output {out_dir} exists and is not a directory")
    if out_dir.exists():
        held = sorted(p.name for p in out_dir.iterdir())
        if held and not is_specmerge_output(out_dir):
            shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
            raise OutputError(f"output {out_dir} is not a specmerge output (it holds {shown}); "
                              f"--force only replaces a previous specmerge output: name another "
                              f"directory, or empty this one yourself")
    check_creatable(out_dir)
    return output_identity(out_dir)


def check_creatable(out_dir: Path) -> None:
    """OUT can be written where it is named: the nearest existing directory above it is a
    directory, on a file system mounted read-write, that this process may write in. Checked
    before any tensor is read, so that the error names OUT rather than a hidden temporary."""
    above = out_dir.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    why = None
    if not above.is_dir():
        why = f"{above} is a file, not a directory"
    elif os.statvfs(above).f_flag & os.ST_RDONLY:
        why = f"{above} is on a read-only file system"
    elif not os.access(above, os.W_OK | os.X_OK):
        why = f"{above} is not writable (permission denied)"
    if why is not None:
        raise OutputError(f"output {out_dir} cannot be created: {why}")


AT_FDCWD, RENAME_NOREPLACE = -100, 1


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if anything is at ``dst``.

    Atomic with Linux's renameat2(RENAME_NOREPLACE). Where the OS or filesystem lacks it, a
    check then a rename: a race of microseconds instead of none; nothing is ever deleted.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST or err == errno.ENOTEMPTY:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Delete the partial directories of ``out_dir`` left by a process that is gone (kill -9, a
    crash, a power cut), as recorded in their marker on this host; return what was removed.
    Partials of live processes, of other hosts, or without a readable marker are left alone."""
    removed = []
    host = socket.gethostname()
    for d in sorted(out_dir.parent.glob(f".{out_dir.name}.partial-*")):
        if d.is_symlink() or not d.is_dir():  # never ours: specmerge writes directories
            continue
        try:
            owner = json.loads((d / INCOMPLETE_MARKER).read_text())
            pid, owner_host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if owner_host == host and not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            if d.exists():
                log.warning("could not remove %s, the unfinished output of an earlier run "
                            "(process %d, no longer running)", d, pid)
                continue
            log.warning("removed %s, the unfinished output of an earlier run (process %d, "
                        "no longer running)", d, pid)
            removed.append(d)
    return removed


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path, replace: Identity | None = None) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``out_dir``; claim ``out_dir`` with it on success.

    The temporary directory holds a marker naming this process and host until it is complete;
    on any exception (Ctrl-C, SIGTERM and SIGHUP included, see ``engine``) it is deleted, and
    partials left by dead processes are removed by the next run into the same OUT. The claim
    never replaces what the caller did not name: with ``replace`` None it fails if anything
    appeared at ``out_dir`` meanwhile (so of concurrent runs exactly one wins); with the
    identity of the directory that was there at the start, only that directory is replaced.
    Directories follow the umask.
    """
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    except OSError as err:  # check_creatable names the usual causes before any work
        raise OutputError(f"output {out_dir} cannot be created in {out_dir.parent}: "
                          f"{err.strerror or err}") from err
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        marker = {"pid": os.getpid(), "host": socket.gethostname(), "out": str(out_dir),
                  "note": "specmerge is still writing this directory; it is not a model"}
        write_text(tmp / INCOMPLETE_MARKER, json.dumps(marker) + "\n")
        yield tmp
        (tmp / INCOMPLETE_MARKER).unlink()
        _claim(tmp, out_dir, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _claim(tmp: Path, out_dir: Path, replace: Identity | None) -> None:
    appeared = OutputError(
        f"output {out_dir} appeared while this run was writing (another run or program created "
        f"it); it was left untouched and this run's output was discarded")
    old = None
    if replace is not None and output_identity(out_dir) is not None:
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        try:
            rename_noreplace(out_dir, old)
        except FileNotFoundError:
            old = None  # removed meanwhile: nothing to replace
        if old is not None and output_identity(old) != replace:
            rename_noreplace(old, out_dir)  # not the directory --force named: put it back
            raise appeared
    try:
        rename_noreplace(tmp, out_dir)
    except FileExistsError:
        if old is not None:
            raise OutputError(f"output {out_dir} appeared while this run replaced it; the "
                              f"old output is kept at {old}") from None
        raise appeared from None
    except BaseException:
        if old is not None:  # an error or a signal between the two renames: put the old back
            try:
                rename_noreplace(old, out_dir)
            except OSError:
                log.error("the previous output %s is kept at %s", out_dir, old)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
