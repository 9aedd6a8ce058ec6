"""How far specmerge's and mergekit's slerp outputs are from slerp computed in float64.

slerp's output moves with Ω = arccos(â·b̂): one float32 rounding of cos Ω (about 6e-8) moves Ω by
6e-8 / sin Ω, and the output by about as much relative to its size, so two float32
implementations that sum the dot product in different orders cannot agree to 1 ulp on a
tensor of millions of entries. This script measures, per tensor, each tool's relative distance
‖out − ref‖ / ‖ref‖ from ``ref``, the same formula (mergekit 0.1.5's) in float64 on the same
inputs, and prints the largest and the median over tensors, as JSON::

    python benchmarks/peers/slerp_accuracy.py BASE EXPERT T OUT_A [OUT_B ...]
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def slerp64(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit 0.1.5's slerp (normalise, dot, lerp when |cos| > 0.9995), in float64."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = float(a.norm()), float(b.norm())
    cos = float((a / (na if na > 1e-8 else 1)) @ (b / (nb if nb > 1e-8 else 1)))
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    om = math.acos(cos)
    return math.sin((1 - t) * om) / math.sin(om) * a + math.sin(t * om) / math.sin(om) * b


def main() -> None:
    base, expert, t, *outs = sys.argv[1:]
    a, b = tensors(Path(base)), tensors(Path(expert))
    ref = {k: slerp64(a[k], b[k], float(t)) for k in a if a[k].is_floating_point()}
    report = {}
    for o in outs:
        got = tensors(Path(o))
        rel = [float((got[k].double().reshape(-1) - r).norm() / r.norm().clamp_min(1e-300))
               for k, r in ref.items()]
        report[o] = {"max_rel_to_float64": max(rel), "median_rel_to_float64":
                     statistics.median(rel), "tensors": len(rel)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
