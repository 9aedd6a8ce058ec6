"""Prefetch (issue #13, item 2): the row-block loop reads ahead on a reader thread and writes
behind on a writer thread, and nothing else changes.

- The bytes: prefetch on or off, any block size, for task arithmetic, TIES (per-tensor and
  global statistics), DARE and a matrix method's fallback; the reads and writes did run on the
  threads.
- The errors: a NaN in a later block of expert 2, a file truncated under a running merge, a full
  disk in a later block's write, and a failing method, give the error of the serial loop, and
  Ctrl-C, SIGTERM and SIGHUP still remove the partial output.
- The threads: none is left alive after a merge, whether it succeeded or failed.
- The helpers (``specmerge.overlap``): the bound on what is read ahead and queued behind, and
  the order in which errors surface.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import specmerge
import specmerge.engine.update as engine
import specmerge.io.checkpoint as checkpoint
import specmerge.io.writer as writer
from specmerge.errors import CheckpointError, Interrupted, NonFiniteError, OutputError
from specmerge.examples import llama_shape_for, write_example_models
from specmerge.io.checkpoint import TensorInfo
from specmerge.overlap import read_ahead, write_behind
from specmerge.sources import CheckpointSource
from tests.conftest import tree_hash

EMBED = "model.embed_tokens.weight"  # 40 rows of 32: one row per block at block_size 1
THREADS = ("specmerge-read", "specmerge-write")

CASES: list[tuple[str, dict[str, Any]]] = [
    ("task_arithmetic", {}),
    ("ties", {}),
    ("ties", {"parameters": {"trim_scope": "global", "aggregate": "sum"}}),
    ("dare", {"seed": 7, "out_dtype": "bfloat16"}),
    ("tsv_m", {"scope": {"fallback": "task_arithmetic"}}),
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("overlap")
    write_example_models(root, llama_shape_for(1, vocab=40, hidden=32), 3, dtype="bfloat16",
                         seed=5, progress=False)
    return root


def _recipe(root: Path, method: str = "task_arithmetic", expert_2: Path | None = None,
            **extra: Any) -> dict[str, Any]:
    experts = [root / "expert_1", expert_2 or root / "expert_2", root / "expert_3"]
    return {"base_model": str(root / "base"), "models": [str(e) for e in experts],
            "merge_method": method, **extra}


def _ours() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREADS)]


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    """Every test here ends with no reader or writer thread alive."""
    assert not _ours()
    yield
    assert not _ours(), _ours()


def _merge(recipe: dict[str, Any], out: Path, **kw: Any) -> str:
    specmerge.merge(recipe, out, shard_size="20KB", progress=False, **kw)
    return tree_hash(out)


@pytest.mark.parametrize(("method", "extra"), CASES,
                         ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_prefetch_and_block_size_do_not_change_bytes(synthetic: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     method: str, extra: dict[str, Any]) -> None:
    recipe = _recipe(synthetic, method, **extra)
    whole = _merge(recipe, tmp_path / "whole", prefetch=False)  # 8MiB: every tensor whole
    seen: dict[str, set[str]] = {"read": set(), "write": set(), "maths": set()}
    read, write = CheckpointSource.read_rows, writer.Region.write_rows
    convert = CheckpointSource.rows_to_task_vectors

    def spy_read(self: CheckpointSource, *args: Any, **kw: Any) -> Any:
        seen["read"].add(threading.current_thread().name)
        return read(self, *args, **kw)

    def spy_convert(self: CheckpointSource, *args: Any, **kw: Any) -> Any:
        seen["maths"].add(threading.current_thread().name)
        return convert(self, *args, **kw)

    def spy_write(self: writer.Region, start: int, rows: torch.Tensor) -> None:
        seen["write"].add(threading.current_thread().name)
        write(self, start, rows)

    monkeypatch.setattr(CheckpointSource, "read_rows", spy_read)
    monkeypatch.setattr(CheckpointSource, "rows_to_task_vectors", spy_convert)
    monkeypatch.setattr(writer.Region, "write_rows", spy_write)
    for block in (1, "1KiB", "4KiB"):
        for prefetch in (True, False):
            seen = {"read": set(), "write": set(), "maths": set()}
            out = tmp_path / f"rows-{block}-{prefetch}"
            assert _merge(recipe, out, block_size=block, prefetch=prefetch) == whole
            shutil.rmtree(out)
            if prefetch:  # the blocks were read and written on the threads, and only there
                assert seen == {"read": {"specmerge-read"}, "write": {"specmerge-write"},
                                "maths": {"MainThread"}}
            else:
                assert seen == {"read": {"MainThread"}, "write": {"MainThread"},
                                "maths": {"MainThread"}}
    assert _merge(recipe, tmp_path / "w2", block_size="1KiB", workers=2) == whole


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_float32_inputs_too(tmp_path: Path, method: str) -> None:
    """Inputs already in the compute dtype: the read buffers are the blocks themselves, which
    the merging thread must copy out of before the reader reuses them."""
    root = tmp_path / "models"
    write_example_models(root, llama_shape_for(1, vocab=40, hidden=32), 3, dtype="float32",
                         seed=6, progress=False)
    recipe = _recipe(root, method)
    whole = _merge(recipe, tmp_path / "whole", prefetch=False)
    for block in (1, "1KiB"):
        for prefetch in (True, False):
            assert _merge(recipe, tmp_path / f"{block}-{prefetch}", block_size=block,
                          prefetch=prefetch) == whole


def _poisoned(root: Path, tmp: Path, name: str, value: float) -> Path:
    """A copy of expert_2 whose last entry of ``name`` is ``value``: a NaN in its last block."""
    dst = tmp / "bad"
    shutil.copytree(root / "expert_2", dst)
    for f in sorted(dst.glob("*.safetensors")):
        sd = load_file(str(f))
        if name in sd:
            sd[name] = sd[name].clone()
            sd[name].view(-1)[-1] = value
            save_file(sd, str(f), metadata={"format": "pt"})
            return dst
    raise AssertionError(name)


def _error(fn: Callable[[], Any]) -> BaseException:
    with pytest.raises(BaseException) as info:
        fn()
    return info.value


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare"])
def test_nan_in_a_later_block_of_expert_2_is_the_same_error(synthetic: Path, tmp_path: Path,
                                                             method: str) -> None:
    bad = _poisoned(synthetic, tmp_path, EMBED, math.nan)
    recipe = _recipe(synthetic, method, expert_2=bad)
    errors = [_error(lambda p=p: specmerge.merge(recipe, tmp_path / "out", block_size=1,
                                                 prefetch=p, progress=False))
              for p in (True, False)]
    assert [type(e) for e in errors] == [NonFiniteError] * 2
    assert str(errors[0]) == str(errors[1])
    assert f"bad/model.safetensors: tensor '{EMBED}' holds 1 NaN/Inf" in str(errors[0])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_file_truncated_under_the_merge_is_the_same_error(synthetic: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """expert_2's shard loses its bytes past the embedding's 20th row once the merge has read
    the first rows: the read of a later block fails, on the reader thread with prefetch."""
    real = checkpoint.read_tensor_bytes
    cut: dict[str, Any] = {}

    def truncating(info: TensorInfo, start: int = 0, stop: int | None = None,
                   **kw: Any) -> torch.Tensor:
        if info.name == EMBED and "bad" in info.file.parts and start >= 10 and not cut:
            cut["size"] = info.offset + info.nbytes // 2
            os.truncate(info.file, cut["size"])
        return real(info, start, stop, **kw)

    monkeypatch.setattr(checkpoint, "read_tensor_bytes", truncating)
    errors = []
    for prefetch in (True, False):
        cut.clear()
        shutil.rmtree(tmp_path / "bad", ignore_errors=True)
        shutil.copytree(synthetic / "expert_2", tmp_path / "bad")
        recipe = _recipe(synthetic, expert_2=tmp_path / "bad")
        errors.append(_error(lambda r=recipe, p=prefetch: specmerge.merge(
            r, tmp_path / "out", block_size=1, prefetch=p, progress=False)))
        assert cut and not (tmp_path / "out").exists()
    assert [type(e) for e in errors] == [CheckpointError] * 2
    assert str(errors[0]) == str(errors[1])
    assert f"truncated while reading tensor '{EMBED}' (1280 of 2560 bytes)" in str(errors[0])


def test_a_full_disk_in_a_later_block_is_the_same_error(synthetic: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The 10th write of a row block finds the disk full (on the writer thread with prefetch),
    while the later blocks' reads and maths go on: the error names the shard file."""
    real = os.pwrite
    calls = {"n": 0}

    def full(fd: int, data: Any, offset: int) -> int:
        if threading.current_thread().name in ("specmerge-write", "MainThread") and len(
                data) == 64:  # a row of the bf16 embedding: 32 entries
            calls["n"] += 1
            if calls["n"] >= 10:
                raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    errors = []
    for prefetch in (True, False):
        calls["n"] = 0
        errors.append(_error(lambda p=prefetch: specmerge.merge(
            _recipe(synthetic), tmp_path / "out", block_size=1, prefetch=p, progress=False)))
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    assert [type(e) for e in errors] == [OutputError] * 2
    on, off = (re.sub(r"\.partial-[^/]+/", ".partial-*/", str(e)) for e in errors)
    assert on == off
    assert ".out.partial-*/model.safetensors: disk full" in on


def test_a_later_write_failure_comes_before_a_later_compute_failure(
        synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block 5's write fails (slowly, so the writer is still at it) while block 6's maths
    fails: the serial loop would have stopped at the write, and so does the overlapped one."""
    real_write = writer.Region.write_rows
    real_update = engine.merged_update
    blocks = {"written": 0, "merged": 0}

    def failing_write(self: writer.Region, start: int, rows: torch.Tensor) -> None:
        if self.name == EMBED:
            blocks["written"] += 1
            if blocks["written"] == 5:
                time.sleep(0.2)
                raise OutputError(f"{self.file}: write failed: simulated")
        real_write(self, start, rows)

    def failing_update(entry: Any, *args: Any) -> Any:
        if entry.name == EMBED:
            blocks["merged"] += 1
            if blocks["merged"] == 6:
                raise RuntimeError("simulated failure of the maths")
        return real_update(entry, *args)

    monkeypatch.setattr(writer.Region, "write_rows", failing_write)
    monkeypatch.setattr(engine, "merged_update", failing_update)
    for prefetch in (True, False):
        blocks.update(written=0, merged=0)
        with pytest.raises(OutputError, match="write failed: simulated"):
            specmerge.merge(_recipe(synthetic), tmp_path / "out", block_size=1,
                            prefetch=prefetch, progress=False)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, Interrupted])
def test_ctrl_c_and_sigterm_in_a_later_block_clean_up(synthetic: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     interrupt: type[BaseException]) -> None:
    """A Ctrl-C (or SIGTERM's ``Interrupted``) while a block is merged stops the merge with that
    same exception, never a writer's error, and removes the partial output."""
    real = engine.merged_update
    calls = {"n": 0}

    def stop(entry: Any, *args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt if interrupt is KeyboardInterrupt else Interrupted(
                signal.SIGTERM)
        return real(entry, *args)

    monkeypatch.setattr(engine, "merged_update", stop)
    with pytest.raises(interrupt):
        specmerge.merge(_recipe(synthetic), tmp_path / "out", block_size=1, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_real_signal_while_blocks_stream_cleans_up(tmp_path: Path, sig: int) -> None:
    """The CLI merges a model in rows of 64 bytes with prefetch; SIGTERM or Ctrl-C arrives while
    the main thread waits on the reader or the writer: the partial output is removed."""
    root = tmp_path / "models"
    write_example_models(root, llama_shape_for(1, vocab=32000, hidden=32), 2, dtype="bfloat16",
                         progress=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base_model: {root / 'base'}\nmodels: [{root / 'expert_1'}, "
                      f"{root / 'expert_2'}]\nmerge_method: task_arithmetic\n")
    out = tmp_path / "out"
    # SIGINT's default action in the child: a pytest-xdist worker ignores SIGINT, and an
    # ignored signal stays ignored across exec (the merge then never saw the Ctrl-C)
    proc = subprocess.Popen([sys.executable, "-m", "specmerge.cli", "merge", "--quiet",
                             "--block-size", "1", str(recipe), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)  # well inside the 32000 blocks of the embedding
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the merge finished before the signal; make it longer"
    assert "Traceback" not in err or sig == signal.SIGINT, err
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + sig and "interrupted by SIGTERM" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


# ---------------------------------------------------------------------------------------------
# The helpers
# ---------------------------------------------------------------------------------------------

def test_read_ahead_holds_at_most_depth_results_beyond_the_current_one() -> None:
    alive: set[int] = set()
    most = {"n": 0}
    lock = threading.Lock()

    class Block:
        def __init__(self, i: int):
            self.i = i
            with lock:
                alive.add(i)
                most["n"] = max(most["n"], len(alive))

        def close(self) -> None:
            with lock:
                alive.discard(self.i)

    for depth in (0, 1, 2):
        most["n"] = 0
        with read_ahead(Block, range(20), depth) as blocks:
            got = []
            for b in blocks:
                time.sleep(0.002)  # the reader gets ahead as far as it may
                got.append(b.i)
                b.close()
        assert got == list(range(20))
        assert most["n"] == depth + 1, (depth, most)


def test_read_ahead_raises_a_readers_error_at_its_item_and_stops_the_reader() -> None:
    def read(i: int) -> int:
        if i == 3:
            raise CheckpointError(f"item {i}")
        return i

    got = []
    with pytest.raises(CheckpointError, match="item 3"), read_ahead(read, range(10), 1) as it:
        for i in it:
            got.append(i)
    assert got == [0, 1, 2]
    read_count = {"n": 0}

    def counted(i: int) -> int:
        read_count["n"] += 1
        return i

    with pytest.raises(ValueError, match="caller"), read_ahead(counted, range(100), 1) as it:
        for i in it:
            if i == 2:
                raise ValueError("caller")
    assert read_count["n"] <= 4  # items 0..2 and at most one read ahead


def test_write_behind_keeps_the_order_bound_and_first_error() -> None:
    done: list[int] = []
    queued = {"most": 0}

    def write(i: int) -> None:
        time.sleep(0.001)
        done.append(i)

    with write_behind(write, 1) as submit:
        for i in range(30):
            submit(i)
            queued["most"] = max(queued["most"], i + 1 - len(done))
    assert done == list(range(30))
    assert queued["most"] == 1  # handed over once the one before it is written

    def failing(i: int) -> None:
        if i >= 4:
            raise OutputError(f"disk full at {i}")
        done.append(i)

    done.clear()
    with pytest.raises(OutputError, match="disk full at 4"), write_behind(failing, 1) as submit:
        for i in range(30):
            submit(i)
    assert done == [0, 1, 2, 3]
    with pytest.raises(OutputError, match="disk full at 4"), write_behind(failing, 1) as submit:
        for i in range(5):
            submit(i)  # the last write fails after the last submit: raised on leaving
    with pytest.raises(OutputError, match="disk full at 4"), write_behind(failing, 1) as submit:
        for i in range(5):
            submit(i)
        time.sleep(0.05)
        raise ValueError("a later failure of the caller")  # serially, the write failed first
    for stop in (KeyboardInterrupt(), Interrupted(signal.SIGTERM)):
        with pytest.raises(type(stop)), write_behind(failing, 1) as submit:
            for i in range(5):
                submit(i)
            time.sleep(0.05)
            raise stop  # Ctrl-C and SIGTERM are never replaced by a writer's error
