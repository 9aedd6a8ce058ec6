"""Output agreement of two checkpoint directories, tensor by tensor (benchmarks/peers/).

``compare_dirs`` reads both in row chunks and gives, per tensor and worst over tensors: the max
ulp distance (same dtypes), the max |a − b| in ulps of the tensor's largest |b| (``scaled_ulp``),
the relative difference ‖a − b‖ / ‖b‖ and the entries that differ. Used by run.py and
mergekit_parity.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


def tensor_files(d: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({n: f for n in fh.keys()})
    return out


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Float bits as integers that order like the floats (adjacent floats differ by 1)."""
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.float64: torch.int64}[x.dtype]
    i = x.view(ints).to(torch.int64)
    low = -(1 << (ints.itemsize * 8 - 1))
    return torch.where(i < 0, low - i, i)


def compare_dirs(ours: Path, theirs: Path) -> dict[str, Any]:
    """Per tensor in row chunks: the max ulp distance (same dtypes only), the max |a − b| in
    ulps of the tensor's largest |b| (``scaled_ulp``: rounding at the operands' scale, which the
    ulp distance of an entry near 0 exaggerates), the relative difference ‖a − b‖ / ‖b‖ and
    the entries that differ; the worst over tensors, and each tensor's in ``per_tensor``."""
    a_files, b_files = tensor_files(ours), tensor_files(theirs)
    res: dict[str, Any] = {"max_ulp": 0, "max_ulp_tensor": "", "max_rel": 0.0,
                           "max_rel_tensor": "", "differing": 0, "entries": 0, "scaled_ulp": 0.0,
                           "over_1_ulp": 0, "tensors_over_1_ulp": 0,
                           "missing": sorted(set(a_files) ^ set(b_files)), "per_tensor": {}}
    for name in sorted(set(a_files) & set(b_files)):
        with safe_open(str(a_files[name]), "pt") as fa, safe_open(str(b_files[name]), "pt") as fb:
            sa, sb = fa.get_slice(name), fb.get_slice(name)
            shape = sa.get_shape()
            rows = shape[0] if shape else 1
            step = max(1, (1 << 23) // max(1, int(torch.Size(shape[1:]).numel())))
            diff2 = ref2 = big = worst = 0.0
            ulp = 0
            for lo in range(0, rows, step):
                a = sa[lo:lo + step] if shape else fa.get_tensor(name)
                b = sb[lo:lo + step] if shape else fb.get_tensor(name)
                if a.dtype == b.dtype:
                    dist = (_ordered(a) - _ordered(b)).abs()
                    ulp = max(ulp, int(dist.max()))
                    res["over_1_ulp"] += int((dist > 1).sum())
                else:
                    ulp = -1
                res["differing"] += int((a != b).sum())
                res["entries"] += a.numel()
                a64, b64 = a.double(), b.double()
                diff2 += float((a64 - b64).square().sum())
                ref2 += float(b64.square().sum())
                big = max(big, float(b64.abs().max()))
                worst = max(worst, float((a64 - b64).abs().max()))
        rel = (diff2 / ref2) ** 0.5 if ref2 > 0 else float(diff2 > 0)
        top = torch.tensor(big, dtype=b.dtype)
        spacing = float(torch.nextafter(top, torch.tensor(float("inf"), dtype=b.dtype)) - top)
        scaled = worst / spacing if spacing > 0 else 0.0
        res["scaled_ulp"] = max(res["scaled_ulp"], scaled)
        res["per_tensor"][name] = {"ulp": ulp, "rel": rel, "scaled_ulp": scaled}
        if ulp < 0 or ulp > res["max_ulp"] or res["max_ulp"] < 0:
            res["max_ulp"], res["max_ulp_tensor"] = ulp, name
        res["tensors_over_1_ulp"] += ulp > 1
        if rel > res["max_rel"]:
            res["max_rel"], res["max_rel_tensor"] = rel, name
    return res
