"""Finiteness and the compute dtype: the one-pass NaN/Inf check every input and output goes
through, its error, and the move of a stored tensor to the device in the compute dtype."""

from __future__ import annotations

import torch
from torch import Tensor

from specmerge.errors import NonFiniteError

# the dtype of the one-pass sum that proves a tensor finite (half types summed in float32)
SUM_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
              torch.float32: torch.float32, torch.float64: torch.float64}


def count_nonfinite(t: Tensor) -> int:
    """How many NaN/Inf entries ``t`` holds (0 for a non-floating tensor).

    One reduction decides the common case: a NaN or ±Inf entry makes the sum NaN or ±Inf
    (IEEE addition propagates them in any order), so a finite sum proves every entry finite.
    A non-finite sum (a NaN/Inf, or finite entries whose sum overflows) is counted exactly."""
    if not t.is_floating_point():
        return 0
    if t.dtype in SUM_DTYPES and bool(torch.isfinite(t.sum(dtype=SUM_DTYPES[t.dtype]))):
        return 0
    return int((~torch.isfinite(t)).sum())


def nonfinite_error(what: str, bad: int) -> NonFiniteError:
    return NonFiniteError(f"{what} holds {bad} NaN/Inf value(s); pass --allow-nonfinite "
                          f"(allow_nonfinite=True) to merge anyway")


def to_compute(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``t`` on the device, then in the compute dtype: a bf16/fp16 input crosses to a GPU in its
    own (half-size) dtype and is upcast there. The same values as ``t.to(device, dtype)``."""
    return t.to(device).to(dtype)


def check_finite(t: Tensor, what: str, allow: bool) -> None:
    """Raise NonFiniteError naming ``what`` if ``t`` holds NaN/Inf (unless ``allow``)."""
    if not allow:
        bad = count_nonfinite(t)
        if bad:
            raise nonfinite_error(what, bad)
