"""A counter-based random stream: uniform numbers as a pure function of (key, element index).

DARE's masks must not depend on how a tensor is cut into blocks, nor on the device or the
order of the work. A counter-based generator gives that by construction: the number for element
j of a stream is a hash of (key, j), so any block of elements is drawn by itself. The key is the
engine's per-(recipe seed, parameter, expert) seed (``specmerge.plan.parameter_seed``).

The hash is splitmix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
OOPSLA 2014): z = key + (j + 1)·γ mod 2⁶⁴, then its finaliser; the top 24 bits give a float32
in [0, 1). It runs in torch int64 arithmetic, which wraps modulo 2⁶⁴; logical right shifts are
arithmetic shifts masked to the bits that remain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK = 1 << 15  # elements hashed at once: the int64 temporaries (256 kB) stay in cache


def _signed(x: int) -> int:
    """A 64-bit constant as torch's int64 holds it (two's complement)."""
    return x - (1 << 64) if x >= 1 << 63 else x


GAMMA = _signed(0x9E3779B97F4A7C15)
MIX1 = _signed(0xBF58476D1CE4E5B9)
MIX2 = _signed(0x94D049BB133111EB)


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> s).bitwise_and_((1 << (64 - s)) - 1)


def splitmix64(key: int, start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """The splitmix64 outputs for indices start, …, start + count − 1 of stream ``key``, as
    int64 bit patterns (in-place arithmetic on one buffer and one temporary)."""
    z = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    z.mul_(GAMMA).add_(_signed(key % (1 << 64)))
    z.bitwise_xor_(_shr(z, 30)).mul_(MIX1)
    z.bitwise_xor_(_shr(z, 27)).mul_(MIX2)
    return z.bitwise_xor_(_shr(z, 31))


def uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """Float32 numbers in [0, 1), a multiple of 2⁻²⁴ each, for indices start … start+count−1."""
    out = torch.empty(count, dtype=torch.float32, device=device)
    for lo in range(0, count, CHUNK):
        n = min(CHUNK, count - lo)
        z = splitmix64(key, start + lo, n, device)
        out[lo:lo + n] = _shr(z, 40)
    return out.mul_(2.0 ** -24)


@dataclass(frozen=True)
class CounterRNG:
    """One expert's stream for one parameter, positioned at element ``offset`` (the first
    element of the block a method is given)."""

    key: int
    offset: int = 0

    def uniform(self, start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
        """The numbers of this block's elements start … start+count−1 (flat, row-major)."""
        return uniform(self.key, self.offset + start, count, device)


def reference_splitmix64(key: int, index: int) -> int:
    """Plain-Python splitmix64 of element ``index`` (unsigned), to check the tensor version."""
    mask = (1 << 64) - 1
    z = (key + (index + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)
