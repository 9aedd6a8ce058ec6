"""Mutated safetensors headers: specmerge accepts a file exactly when the safetensors library
does, and then reads the same bytes (hypothesis, 2,000 mutations of a real header)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from specmerge.errors import CheckpointError
from specmerge.io.checkpoint import ST_DTYPES, Checkpoint

TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b.bias": torch.arange(5, dtype=torch.bfloat16),
    "c.ids": torch.arange(3, dtype=torch.int64),
    "d.mask": torch.tensor([True, False, True]),
    "e.empty": torch.zeros(0, 4, dtype=torch.float16),
    "f.scalar": torch.tensor(2.5, dtype=torch.float64),
}
BLOB = save(TENSORS, metadata={"format": "pt"})
HLEN = struct.unpack("<Q", BLOB[:8])[0]
HEADER: dict[str, Any] = json.loads(BLOB[8:8 + HLEN])
DATA = BLOB[8 + HLEN:]
NAMES = [n for n in HEADER if n != "__metadata__"]

ints = st.integers(min_value=-20, max_value=len(DATA) + 20)
json_values = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False, width=32),
                        st.text(max_size=4), st.lists(ints, max_size=3))
dtypes = st.sampled_from([*ST_DTYPES, "f32", "F128", "X"]) | json_values


@st.composite
def mutation(draw: st.DrawFn) -> tuple[dict[str, Any], bytes, int | None, bytes]:
    """A mutated (header, data, header-length override, raw-JSON suffix)."""
    header = json.loads(json.dumps(HEADER))
    data = DATA
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(NAMES))
        kind = draw(st.sampled_from([
            "offsets", "shift", "swap", "begin", "end", "shape", "dim", "dtype", "drop_field",
            "extra_field", "drop_tensor", "duplicate", "data", "meta", "entry", "reorder"]))
        entry = header.get(name)
        if not isinstance(entry, dict):
            continue
        offs = entry.get("data_offsets")
        pair = isinstance(offs, list) and len(offs) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offs)
        if kind in ("shift", "begin", "end") and not pair:
            continue
        if kind == "offsets":
            entry["data_offsets"] = draw(st.lists(ints, min_size=0, max_size=3) | json_values)
        elif kind == "shift":
            k = draw(st.integers(-16, 16))
            entry["data_offsets"] = [o + k for o in entry["data_offsets"]]
        elif kind == "swap":
            other = header.get(draw(st.sampled_from(NAMES)))
            if isinstance(other, dict) and isinstance(other.get("data_offsets"), list):
                entry["data_offsets"] = list(other["data_offsets"])
        elif kind in ("begin", "end"):
            entry["data_offsets"][0 if kind == "begin" else 1] = draw(ints)
        elif kind == "shape":
            entry["shape"] = draw(st.lists(st.integers(-2, 13), max_size=3) | json_values)
        elif kind == "dim" and isinstance(entry.get("shape"), list) and entry["shape"]:
            entry["shape"][draw(st.integers(0, len(entry["shape"]) - 1))] = draw(
                st.integers(-1, 13) | json_values)
        elif kind == "dtype":
            entry["dtype"] = draw(dtypes)
        elif kind == "drop_field":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif kind == "extra_field":
            entry[draw(st.sampled_from(["x", "dtype2"]))] = draw(json_values)
        elif kind == "drop_tensor":
            header.pop(name)
        elif kind == "duplicate":
            header[name + ".copy"] = dict(entry)
        elif kind == "data":
            n = draw(st.integers(-9, 9))
            data = data[:n] if n < 0 else data + bytes(n)
        elif kind == "meta":
            header["__metadata__"] = draw(json_values | st.dictionaries(
                st.text(max_size=3), st.text(max_size=3) | ints, max_size=2))
        elif kind == "entry":
            header[name] = draw(json_values)
        elif kind == "reorder":
            header = dict(reversed(list(header.items())))
    hlen = draw(st.none() | st.integers(-8, 8))
    suffix = draw(st.sampled_from([b"", b" ", b"  \n", b"\x00", b"}", b"x"]))
    return header, data, hlen, suffix


def _write(path: Path, header: dict[str, Any], data: bytes, hlen_delta: int | None,
           suffix: bytes) -> None:
    raw = json.dumps(header).encode() + suffix
    n = max(0, len(raw) + (hlen_delta or 0))
    path.write_bytes(struct.pack("<Q", n) + raw + data)


def _theirs(path: Path) -> dict[str, bytes] | None:
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k).reshape(-1).view(torch.uint8).numpy().tobytes()
                    for k in f.keys()}
    except Exception:  # noqa: BLE001 - any refusal counts
        return None


def _ours(path: Path) -> dict[str, bytes] | None:
    try:
        ck = Checkpoint(path)
        return {k: ck.read(k).reshape(-1).view(torch.uint8).numpy().tobytes() for k in ck}
    except CheckpointError:
        return None


@settings(max_examples=2000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=mutation())
def test_accepts_exactly_what_safetensors_accepts(tmp_path: Path, case) -> None:
    path = tmp_path / "m.safetensors"
    _write(path, *case)
    theirs, ours = _theirs(path), _ours(path)
    event("both accept" if theirs is not None else "both refuse")
    assert (ours is None) == (theirs is None), (case, "ours" if ours else "theirs", "accepted")
    if ours is not None:
        assert ours == theirs


def test_the_unmutated_header_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(BLOB)
    assert _ours(path) == _theirs(path) is not None


def _raw_case(path: Path, header_text: str, data: bytes) -> None:
    raw = header_text.encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


ENTRY = '"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'
RAW_CASES = {
    "duplicate field in an entry": '{"a": {' + ENTRY + ', "dtype": "F32"}}',
    "duplicate __metadata__": '{"__metadata__": {}, "__metadata__": {}, "a": {' + ENTRY + '}}',
    "lone surrogate": '{"__metadata__": {"k": "\\ud800"}, "a": {' + ENTRY + '}}',
    "lone surrogate in a name": '{"a\\udc00": {' + ENTRY + '}}',
    "-0 as an offset": '{"a": {"dtype": "F32", "shape": [2], "data_offsets": [-0, 8]}}',
    "dimension product over u64": '{"a": {"dtype": "F32", "shape": [4294967296, 4294967296, 0],'
                                  ' "data_offsets": [0, 0]}, "b": {"dtype": "F32", "shape": [2],'
                                  ' "data_offsets": [0, 8]}}',
    "plain (accepted)": '{"a": {' + ENTRY + '}}',
    "repeated metadata key (accepted)": '{"__metadata__": {"k": "1", "k": "2"}, "a": {' + ENTRY
                                        + '}}',
}


@pytest.mark.parametrize("name", RAW_CASES)
def test_raw_headers_as_safetensors_reads_them(tmp_path: Path, name: str) -> None:
    """Header variants that JSON-level fuzzing cannot write: each is accepted by us exactly
    when ``safe_open`` accepts it."""
    path = tmp_path / "m.safetensors"
    _raw_case(path, RAW_CASES[name], b"\x00" * 8)
    theirs, ours = _theirs(path), _ours(path)
    assert (ours is None) == (theirs is None), f"{name}: {'ours' if ours else 'theirs'} accepted"
    assert ours == theirs
