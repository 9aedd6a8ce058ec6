"""Synthetic task vectors with a known structure, for examples, tests and benchmarks.

Each task vector is τ_i = S + T_i + E_i: a low-rank part S shared by every task, a low-rank
part T_i of its own, and dense Gaussian noise E_i. This is the structure SVC and the WUDI
family are designed around (shared directions inflate the merged spectrum).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ViT-B/32 image encoder: 12 blocks of q, k, v, out (768×768), fc1 (3072×768), fc2 (768×3072)
VIT_B32_BLOCK = (
    ("attn.q_proj", (768, 768)),
    ("attn.k_proj", (768, 768)),
    ("attn.v_proj", (768, 768)),
    ("attn.out_proj", (768, 768)),
    ("mlp.fc1", (3072, 768)),
    ("mlp.fc2", (768, 3072)),
)


def normal(*shape: int, generator: torch.Generator) -> Tensor:
    """float32 samples of N(0, 1) that are the same on every CPU.

    ``torch.randn`` is not: its vectorised kernels (AVX2, AVX-512) and its scalar one
    (``ATEN_CPU_CAPABILITY=default``, other processors) draw different numbers from one seed.
    ``torch.rand``'s uniforms agree, so this is Box–Muller on them, z = √(−2 ln(1 − u₁))
    cos(2π u₂), computed in float64 and rounded: a last-bit difference of a float64 ``log`` or
    ``cos`` between kernels changes a float32 sample with probability about 2⁻²⁹.
    """
    u = torch.rand(2, *shape, generator=generator, dtype=torch.float64)
    return (torch.log1p(-u[0]).mul_(-2).sqrt_() * torch.cos(2 * math.pi * u[1])).float()


def structured_task_vectors(
    shape: tuple[int, int],
    num_tasks: int,
    *,
    generator: torch.Generator,
    shared_rank: int = 8,
    task_rank: int = 8,
    scale: float = 1e-3,
    noise: float = 0.1,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """K task vectors of ``shape`` (out, in) = shared low-rank + task low-rank + noise.

    Each low-rank factor has entries N(0, 1/√rank), so every part has a comparable
    per-entry scale; ``noise`` is the noise-to-signal ratio and ``scale`` the overall size.
    The same seed gives the same values on every CPU (``normal``; the products are formed in
    float64 and rounded, so that no BLAS kernel's summation order shows).
    """
    m, n = shape

    def low_rank(r: int) -> Tensor:
        a = normal(m, r, generator=generator).double() / r**0.5
        b = normal(r, n, generator=generator).double()
        return (a @ b).float()

    shared = low_rank(shared_rank)
    out = []
    for _ in range(num_tasks):
        tau = shared + low_rank(task_rank) + noise * normal(m, n, generator=generator)
        out.append((scale * tau).to(dtype))
    return out


def vit_b32_layer_set(
    num_tasks: int = 8, *, blocks: int = 12, seed: int = 0, **kwargs: float
) -> dict[str, list[Tensor]]:
    """The ViT-B/32-shaped benchmark layer set: name → K synthetic task vectors."""
    gen = torch.Generator().manual_seed(seed)
    return {
        f"blocks.{b}.{name}": structured_task_vectors(shape, num_tasks, generator=gen, **kwargs)
        for b in range(blocks)
        for name, shape in VIT_B32_BLOCK
    }
