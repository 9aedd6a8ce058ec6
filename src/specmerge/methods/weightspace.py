"""mergekit 0.1.5's own methods: SLERP, NearSwap, Model Stock, DELLA and SCE.

Each is the formula of mergekit 0.1.5 (arcee-ai/mergekit, ``mergekit/merge_methods/<name>.py``
and ``mergekit/sparsify.py``), written again on specmerge's terms: the function takes the task
vectors τ_i = θ_i − θ0 and returns the merged update τ (the engine adds θ0). Methods that are
weight-space operations (SLERP) take θ0 as ``base``. Parameters keep mergekit's names,
defaults and meaning; where mergekit requires a value and has no default, the default here is
said in the method's notes. The methods that need a whole tensor (a norm, a rank or a top-k over
it) say so in their notes; NearSwap streams in row blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from specmerge.methods.elementwise import _l1_rescaled, _weights, gta
from specmerge.methods.registry import Interval, register

WHOLE_TENSOR = "Needs whole tensors (not streamed in row blocks)"


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _one_expert(name: str) -> Callable[[Mapping[str, Any], Sequence[float]], None]:
    def check(params: Mapping[str, Any], weights: Sequence[float]) -> None:
        if len(weights) != 1:
            raise ValueError(f"{name} takes the base and exactly one other model; got "
                             f"{len(weights)} experts")
    return check


@register(
    "slerp",
    family="elementwise",
    summary="Spherical interpolation from θ0 (t = 0) to the one expert θ1 (t = 1), "
            "on each tensor flattened.",
    citation="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985; as in "
             "mergekit 0.1.5 (mergekit/merge_methods/slerp.py)",
    docs={"t": "interpolation factor: 0 gives the base model, 1 the other model"},
    uses_base=True,
    check=_one_expert("slerp"),
    notes="mergekit requires t and has no default; 0.5 here. mergekit's base_model is the t = 0 "
          "end. " + WHOLE_TENSOR + ": the angle is that of the whole flattened tensors.",
)
def slerp(task_vectors: Sequence[Tensor], *, base: Tensor, t: float = 0.5) -> Tensor:
    """SLERP of the flattened tensors a = θ0 and b = θ1 = θ0 + τ_1 (mergekit 0.1.5):

        â = a / ‖a‖, b̂ = b / ‖b‖ (a norm ≤ 1e-8 is taken as 1),  cos Ω = clamp(â·b̂, −1, 1)
        |cos Ω| > 0.9995: slerp = (1 − t) a + t b  (near-collinear: linear interpolation)
        otherwise:        slerp = sin((1 − t) Ω) / sin Ω · a + sin(t Ω) / sin Ω · b
    and returns τ = slerp − θ0. Computed in float32 (float64 for float64 inputs).
    """
    if len(task_vectors) != 1:
        raise ValueError(f"slerp takes exactly one task vector, got {len(task_vectors)}")
    dtype = _work_dtype(base)
    a = base.to(dtype).reshape(-1)
    b = a + task_vectors[0].to(dtype).reshape(-1)
    if a.numel() == 0:
        return torch.zeros_like(task_vectors[0])
    # ‖x‖ as the square root of a (cascade) sum of squares: torch's float32 vector_norm of a
    # multi-million-entry CPU tensor is off by ~1e-4 relative (a 4.1M-entry embedding: 40.48217
    # for 40.48575), which moved Ω and the output by 3e-5 relative from mergekit's chunked norms
    norm_a, norm_b = a.square().sum().sqrt(), b.square().sum().sqrt()
    norm_a = torch.where(norm_a > 1e-8, norm_a, 1)
    norm_b = torch.where(norm_b > 1e-8, norm_b, 1)
    cos = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if cos.abs() > 0.9995:
        coef_a, coef_b = 1 - t, t
    else:
        omega = torch.acos(cos)
        coef_a = torch.sin((1 - t) * omega) / torch.sin(omega)
        coef_b = torch.sin(t * omega) / torch.sin(omega)
    out = coef_a * a + coef_b * b - a
    return out.reshape(task_vectors[0].shape).to(task_vectors[0].dtype)


@register(
    "nearswap",
    family="elementwise",
    summary="Take the expert's value where it is near the base: θ0 + w ⊙ τ with "
            "w = clamp(t / |τ|, 0, 1).",
    citation="alchemonaut, QuartetAnemoi-70B-t0.0001 (huggingface.co/alchemonaut); as in "
             "mergekit 0.1.5 (mergekit/merge_methods/nearswap.py)",
    docs={"t": "sameness threshold: entries that differ by at most t take the expert's value, "
               "others move t towards it"},
    constraints={"t": Interval(float, 0, None, closed="left")},
    rowwise=True,
    propagates_nonfinite=True,
    check=_one_expert("nearswap"),
    notes="mergekit requires t and has no default; 0.0001 here, the value of the model that "
          "introduced it. Streams in row blocks.",
)
def nearswap(task_vectors: Sequence[Tensor], *, t: float = 0.0001) -> Tensor:
    """NearSwap of θ0 and θ1 = θ0 + τ_1 (mergekit 0.1.5):

        w = clamp(t / max(|θ0 − θ1|, 1e-6), 0, 1),  θ = w θ1 + (1 − w) θ0,  so τ = w ⊙ τ_1.
    """
    if len(task_vectors) != 1:
        raise ValueError(f"nearswap takes exactly one task vector, got {len(task_vectors)}")
    tau = task_vectors[0]
    return (t / tau.abs().clamp(min=1e-6)).clamp(0, 1) * tau


def _two_experts_at_least(params: Mapping[str, Any], weights: Sequence[float]) -> None:
    if len(weights) < 2:
        raise ValueError(f"model_stock needs the base and at least two other models; got "
                         f"{len(weights)} expert(s)")


@register(
    "model_stock",
    family="elementwise",
    summary="θ0 + t · mean τ_i, t = K cos θ / (1 + (K − 1) cos θ), cos θ the mean pairwise "
            "cosine of the τ_i.",
    citation="Jang et al., Model Stock, ECCV 2024, arXiv 2403.19522; as in mergekit 0.1.5 "
             "(mergekit/merge_methods/model_stock.py)",
    docs={"filter_wise": "one t per row (along the last axis) instead of one per tensor"},
    check=_two_experts_at_least,
    notes=WHOLE_TENSOR + ": the cosines are over the whole tensor (or whole rows).",
)
def model_stock(task_vectors: Sequence[Tensor], *, filter_wise: bool = False) -> Tensor:
    """Model Stock (arXiv 2403.19522) as mergekit 0.1.5 computes it, K = len(task_vectors):

        cos θ = mean over pairs i < j of clamp(τ_i·τ_j / max(‖τ_i‖‖τ_j‖, 1e-6), −1, 1)
        t = K cos θ / (1 + (K − 1) cos θ)  (t = 0 where |1 + (K − 1) cos θ| < 1e-6)
        θ = t · mean θ_i + (1 − t) θ0, so τ = t · mean τ_i.
    The dot products run over the flattened tensor, or with ``filter_wise`` over the last axis
    (a 1-D tensor is one row).
    """
    k = len(task_vectors)
    if k < 2:
        raise ValueError(f"model_stock needs at least two task vectors, got {k}")
    shape = task_vectors[0].shape
    if filter_wise:
        taus = [t if t.dim() > 1 else t.unsqueeze(0) for t in task_vectors]
    else:
        taus = [t.reshape(-1) for t in task_vectors]
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = torch.norm(taus[i], dim=-1) * torch.norm(taus[j], dim=-1)
            cosines.append(((taus[i] * taus[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, k * cos / torch.where(singular, 1.0, denominator))
    return (t * (sum(taus) / k)).reshape(shape)


# ---------------------------------------------------------------------------------------------
# DELLA: magnitude-ranked random pruning inside generalized task arithmetic
# ---------------------------------------------------------------------------------------------

def della_magprune(tau: Tensor, density: float, epsilon: float, *, rescale: bool,
                   generator: torch.Generator | None = None) -> Tensor:
    """MagPrune (DELLA, arXiv 2406.11617) as in mergekit 0.1.5's ``sparsify.della_magprune``.

    Per row (axis 1; a 1-D τ is one row) the entries are ranked by |τ|, r = 1..n, and entry j
    is kept with probability p_j = (ρ − ε) + 2ε (r_j − 1) / (n − 1), ρ = ``density``: the larger
    the magnitude, the likelier it stays. Draws are ``torch.bernoulli`` on the CPU from
    ``generator``. ``rescale`` scales the kept entries back to τ's L1 norm (the whole
    tensor's, as mergekit does). ρ ≥ 1 returns τ; ρ ≤ 0 returns 0.
    """
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: density ± epsilon must lie in (0, 1), got density "
                         f"{density} and epsilon {epsilon}")
    work = tau.float() if tau.dtype in (torch.float16, torch.bfloat16) else tau
    rows = work if work.dim() >= 2 else work.unsqueeze(0)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(work.dtype)  # r − 1, in 0..n−1
    n = rows.shape[1]
    rank_norm = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
    probs = (density - epsilon) + rank_norm.clamp(0, 1) * (2 * epsilon)
    mask = torch.bernoulli(probs.cpu(), generator=generator).to(work.device, work.dtype)
    kept = (rows * mask).reshape(tau.shape)
    out = _l1_rescaled(work, kept) if rescale else kept
    return out.to(tau.dtype)


def _della(task_vectors: Sequence[Tensor], weights: Sequence[float] | None,
           densities: Sequence[float] | None, generators: Sequence[torch.Generator] | None,
           epsilon: float, consensus: str, normalize: bool, rescale: bool,
           scaling: float) -> Tensor:
    ds = [1.0] * len(task_vectors) if densities is None else [float(d) for d in densities]
    gens = list(generators) if generators is not None else [None] * len(task_vectors)
    pruned = [della_magprune(t, d, epsilon, rescale=rescale, generator=g)
              for t, d, g in zip(task_vectors, ds, gens, strict=True)]
    return gta(pruned, weights=_weights(task_vectors, weights), consensus=consensus,
               normalize=normalize, scaling=scaling)


DELLA_DOCS = {
    "epsilon": "ε: the keep probabilities spread over [density − ε, density + ε] by magnitude "
               "rank",
    "normalize": "divide by Σ w_i over the kept (and, for della, agreeing) entries",
    "rescale": "scale each pruned τ_i back to its L1 norm",
    "scaling": "λ applied to the merged update (mergekit's lambda)",
}
DELLA_NOTES = (" Per-model weight and density as in mergekit (mergekit requires the weight; "
               "1 here). The masks come from specmerge's per-parameter seeds (torch.bernoulli on "
               "a seeded CPU generator per expert), so they differ from mergekit's global RNG "
               "(same distribution). " + WHOLE_TENSOR + ": ranks per row, L1 rescale over the "
               "tensor.")


DELLA_REGISTRATION: dict[str, Any] = {
    "citation": "Deep et al., DELLA-Merging, arXiv 2406.11617; as in mergekit 0.1.5 "
                "(mergekit/merge_methods/registry.py, generalized_task_arithmetic.py, "
                "sparsify.py)",
    "docs": DELLA_DOCS, "constraints": {"epsilon": Interval(float, 0, 1, closed="left")},
    "uses_weights": True, "uses_densities": True, "uses_rng": True}


@register(
    "della",
    family="elementwise",
    summary="DELLA-TIES: MagPrune each τ_i (keep probability rising with magnitude rank), "
            "rescale, weight, elect signs, normalise, scale.",
    **DELLA_REGISTRATION,
    notes="mergekit's della: sign consensus (sum), normalize and rescale on." + DELLA_NOTES,
)
def della(task_vectors: Sequence[Tensor], *, weights: Sequence[float] | None = None,
          densities: Sequence[float] | None = None,
          generators: Sequence[torch.Generator] | None = None, epsilon: float = 0.15,
          normalize: bool = True, rescale: bool = True, scaling: float = 1.0) -> Tensor:
    """DELLA with TIES's sign election (arXiv 2406.11617, mergekit 0.1.5):

        δ_i = w_i · MagPrune(τ_i; ρ_i, ε)   (``della_magprune``, L1-rescaled with ``rescale``)
        s = sign(Σ δ_i) (≥ 0 counts as +),  m_i = [sign δ_i = s]
        τ = λ Σ m_i δ_i / Σ m_i w_i  (the division with ``normalize``; a zero divisor → 1).
    """
    return _della(task_vectors, weights, densities, generators, epsilon, "sum", normalize,
                  rescale, scaling)


@register(
    "della_linear",
    family="elementwise",
    summary="DELLA without sign election: MagPrune each τ_i, rescale, weight, sum, scale.",
    **DELLA_REGISTRATION,
    notes="mergekit's della_linear: no consensus, normalize off, rescale on." + DELLA_NOTES,
)
def della_linear(task_vectors: Sequence[Tensor], *, weights: Sequence[float] | None = None,
                 densities: Sequence[float] | None = None,
                 generators: Sequence[torch.Generator] | None = None, epsilon: float = 0.15,
                 normalize: bool = False, rescale: bool = True, scaling: float = 1.0) -> Tensor:
    """DELLA, linear (arXiv 2406.11617, mergekit 0.1.5): τ = λ Σ δ_i, / Σ w_i with
    ``normalize`` (|Σ w_i| < 1e-8 → 1), δ_i = w_i · MagPrune(τ_i; ρ_i, ε)."""
    return _della(task_vectors, weights, densities, generators, epsilon, "none", normalize,
                  rescale, scaling)


@register(
    "sce",
    family="elementwise",
    summary="SCE: keep the entries of highest variance across experts, weight each τ_i by its "
            "mean square, erase minority signs, normalise.",
    citation="Wan et al., FuseChat (SCE), arXiv 2408.07990; as in mergekit 0.1.5 "
             "(mergekit/merge_methods/sce.py)",
    docs={"select_topk": "share of the entries kept: those with the largest variance across "
                         "the task vectors (1 keeps all)"},
    notes="mergekit's int8_mask (a memory option with no effect on the result) is accepted by "
          "the mergekit reader and dropped. Per-model weights are not used, as in mergekit. "
          + WHOLE_TENSOR + ": the top-k and the weights are over the whole tensor.",
)
def sce(task_vectors: Sequence[Tensor], *, select_topk: float = 1.0) -> Tensor:
    """SCE (arXiv 2408.07990) as mergekit 0.1.5 computes it:

        Select: with select_topk < 1, keep the k = ⌊select_topk · #{v > 0}⌋ entries of largest
                v = Var_i(τ_i) (population variance; select_topk ≤ 0 keeps none);
        Calculate: w_i = mean(τ_i²) / Σ_j mean(τ_j²)  (1/K when |Σ_j mean(τ_j²)| < 1e-6);
        Erase: m_i = [sign τ_i = s], s = sign(Σ τ_i) (≥ 0 counts as +);
        τ = Σ w_i m_i τ_i / max(Σ w_i m_i, 1e-6).
    """
    taus = torch.stack(list(task_vectors))
    if select_topk < 1:
        if select_topk <= 0:
            taus = torch.zeros_like(taus)
        else:
            var = taus.var(dim=0, unbiased=False)
            k = int(int(torch.count_nonzero(var)) * select_topk)
            mask = torch.zeros(var.numel(), dtype=taus.dtype, device=taus.device)
            if k:
                mask[torch.topk(var.reshape(-1), k).indices] = 1
            taus = taus * mask.reshape(var.shape)
    elected = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0).to(taus.dtype)
    agree = (taus.sign() == elected).to(taus.dtype)
    energy = taus.square().reshape(taus.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    w = torch.full_like(energy, 1 / len(energy)) if abs(total) < 1e-6 else energy / total
    w = w.reshape(-1, *([1] * (taus.dim() - 1))) * agree
    return (taus * w).sum(dim=0) / w.sum(dim=0).clamp(min=1e-6)

