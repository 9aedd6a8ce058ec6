"""mergekit 0.1.5's spherical methods: the Karcher mean, NuSLERP and Multi-SLERP.

Each is the formula of mergekit 0.1.5 (arcee-ai/mergekit, ``mergekit/merge_methods/karcher.py``,
``nuslerp.py`` and ``multislerp.py``), written again on specmerge's terms: the function takes
the task vectors τ_i = θ_i − θ0 and θ0 as ``base`` and returns the merged update τ (the engine
adds θ0). Parameters keep mergekit's names, defaults and meaning; mergekit requires the
per-model ``weight`` of NuSLERP and Multi-SLERP and has no default: 1 here.

mergekit runs NuSLERP and Multi-SLERP either around a base (the τ_i are interpolated) or, in a
recipe without ``base_model``, on the weights themselves. specmerge always has a base: the
second case is ``base_weight`` set, where θ0 (the recipe's first model) is one of the
interpolated models, with that weight. The Karcher mean always averages every model, the base
included, as mergekit's does (its base is one more input). All three need whole tensors: their
norms and angles are over the whole flattened tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from specmerge.methods.registry import Interval, register
from specmerge.methods.weightspace import WHOLE_TENSOR, _work_dtype

BASE_WEIGHT_DOC = ("null: θ0 is the origin and the task vectors are interpolated (mergekit with "
                   "base_model); a number: θ0 is itself one of the interpolated models, with "
                   "this weight (mergekit without base_model: its first model is the base)")


def _points(task_vectors: Sequence[Tensor], base: Tensor, weights: Sequence[float] | None,
            base_weight: float | None) -> tuple[list[Tensor], list[float], Tensor | None]:
    """The interpolated points, their weights and the origin to subtract at the end (None: the
    points are the τ_i themselves)."""
    dtype = _work_dtype(base)
    ws = [1.0] * len(task_vectors) if weights is None else [float(w) for w in weights]
    taus = [t.to(dtype) for t in task_vectors]
    if base_weight is None:
        return taus, ws, None
    theta0 = base.to(dtype)
    return [theta0, *(theta0 + t for t in taus)], [float(base_weight), *ws], theta0


# ---------------------------------------------------------------------------------------------
# Karcher mean
# ---------------------------------------------------------------------------------------------

def karcher_mean(points: Sequence[Tensor], *, max_iter: int, tol: float) -> Tensor:
    """The Karcher (Riemannian) mean of the directions of ``points`` on the unit sphere, scaled
    by their mean norm, with equal weights (mergekit 0.1.5's ``karcher_merge_tensors``):

        r_i = ‖x_i‖, u_i = x_i / r_i (0 where r_i = 0); V = {i : r_i > tol}, a_i = 1/|V| on V
        μ = normalise(Σ a_i u_i)  (u_first of V when that sum's norm < tol)
        repeat ≤ max_iter:  θ_i = arccos clamp(μ·u_i, −1, 1)
            g = Σ_{i: θ_i ≥ tol} a_i θ_i / sin θ_i · (u_i − (μ·u_i) μ)   (the log map's mean)
            stop when ‖g‖ < tol; μ ← normalise(cos‖g‖ μ + sin‖g‖ g / ‖g‖)  (the exp map)
        result = (Σ_i r_i / N) μ   (every point's norm, N = len(points)).
    Every norm ≤ tol gives 0.
    """
    if len(points) == 1:
        return points[0]
    shape = points[0].shape
    flat = [p.reshape(-1) for p in points]
    norms = [torch.linalg.vector_norm(x) for x in flat]
    units = [torch.zeros_like(x) if float(r) == 0 else x / r for x, r in zip(flat, norms, strict=True)]
    valid = [i for i, r in enumerate(norms) if float(r) > tol]
    if not valid:
        return torch.zeros_like(points[0])
    alpha = 1.0 / len(points)
    total = sum([alpha] * len(valid))
    a = alpha / total
    us = [units[i] for i in valid]
    mean = torch.zeros_like(us[0])
    for u in us:
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = us[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in us:
            dot = torch.dot(mean, u).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        step = torch.linalg.vector_norm(tangent)
        if float(step) < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    scale = sum(alpha * r for r in norms)
    return (scale * mean).reshape(shape)


@register(
    "karcher",
    family="elementwise",
    summary="Karcher mean of the models' directions on the unit sphere (base included), "
            "scaled by their mean norm.",
    citation="Karcher, Riemannian center of mass and mollifier smoothing, Comm. Pure Appl. "
             "Math. 1977; arXiv 2603.04972 (mergekit's reference); as in mergekit 0.1.5 "
             "(mergekit/merge_methods/karcher.py)",
    docs={"max_iter": "most fixed-point iterations of the Riemannian mean",
          "tol": "stop when the mean's tangent step is shorter; norms and angles below it count "
                 "as zero"},
    constraints={"max_iter": Interval(int, 0, None), "tol": Interval(float, 0, None)},
    uses_base=True,
    notes="Every model takes part with weight 1/(K + 1), θ0 too: mergekit's karcher averages "
          "all its inputs, the base model among them. " + WHOLE_TENSOR + ": norms and angles "
          "are over the whole flattened tensor.",
)
def karcher(task_vectors: Sequence[Tensor], *, base: Tensor, max_iter: int = 10,
            tol: float = 1e-5) -> Tensor:
    """Karcher mean (Karcher 1977; arXiv 2603.04972; mergekit 0.1.5) of θ0, θ_1 = θ0 + τ_1, …, θ_K
    (``karcher_mean``); returns τ = mean − θ0. Float32 (float64 for float64 inputs)."""
    dtype = _work_dtype(base)
    theta0 = base.to(dtype)
    points = [theta0, *(theta0 + t.to(dtype) for t in task_vectors)]
    out = karcher_mean(points, max_iter=max_iter, tol=tol) - theta0
    return out.to(task_vectors[0].dtype)


# ---------------------------------------------------------------------------------------------
# NuSLERP
# ---------------------------------------------------------------------------------------------

def nuslerp_pair(t: float, v0: Tensor, v1: Tensor, *, dim: int, flatten: bool,
                 eps: float = 1e-8) -> Tensor:
    """SLERP of v0 (t = 0) and v1 (t = 1) along ``dim`` (each vector along it separately), or of
    the whole flattened tensors with ``flatten`` (mergekit 0.1.5's ``nuslerp``):

        û = u / max(‖u‖, 1e-7),  cos Ω = clamp(v̂0·v̂1, −1, 1)
        1 − cos² Ω ≤ eps²: (1 − t) v0 + t v1  (collinear)
        otherwise: (sin((1 − t) Ω) v0 + sin(t Ω) v1) / sin Ω.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps ** 2
    omega = torch.acos(torch.where(collinear, 0, cos))
    out = (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)
    out = torch.where(collinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def _two_points(params: Mapping[str, Any], weights: Sequence[float]) -> None:
    want = 2 if params.get("base_weight") is None else 1
    if len(weights) != want:
        where = ("with base_weight null (the base is the origin) it takes exactly two other "
                 "models" if want == 2 else "with base_weight set (the base is the first "
                 "model) it takes exactly one other model")
        raise ValueError(f"nuslerp interpolates two models: {where}; got {len(weights)} "
                         f"expert(s)")


@register(
    "nuslerp",
    family="elementwise",
    summary="SLERP of two models at t = w_2 / (w_1 + w_2): of their task vectors around θ0, "
            "or of θ0 and one model (base_weight); flattened, per row or per column.",
    citation="Shoemake, SIGGRAPH 1985; NuSLERP as in mergekit 0.1.5 "
             "(mergekit/merge_methods/nuslerp.py)",
    docs={"base_weight": BASE_WEIGHT_DOC,
          "nuslerp_row_wise": "interpolate the vectors along the first axis (columns of an "
                              "(out, in) weight) instead of the last; without nuslerp_flatten",
          "nuslerp_flatten": "interpolate the whole flattened tensors (mergekit's default)"},
    uses_weights=True,
    uses_base=True,
    check=_two_points,
    notes="t = w_2 / (w_1 + w_2), 0.5 where |w_1 + w_2| < 1e-6; per-model weights default to "
          "1 (mergekit requires them). " + WHOLE_TENSOR + ": angles over the whole tensor, or "
          "per column; rows (nuslerp_flatten false) are merged whole too.",
)
def nuslerp(task_vectors: Sequence[Tensor], *, base: Tensor,
            weights: Sequence[float] | None = None, base_weight: float | None = None,
            nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True) -> Tensor:
    """NuSLERP (mergekit 0.1.5): with base_weight null, τ = ``nuslerp_pair``(t, τ_1, τ_2);
    with base_weight w_1, τ = ``nuslerp_pair``(t, θ0, θ0 + τ_1) − θ0. t = w_2 / (w_1 + w_2)
    (0.5 when |w_1 + w_2| < 1e-6); dim 0 with ``nuslerp_row_wise``, else the last."""
    points, ws, origin = _points(task_vectors, base, weights, base_weight)
    if len(points) != 2:
        raise ValueError(f"nuslerp interpolates exactly two models, got {len(points)} (see "
                         f"base_weight)")
    total = ws[0] + ws[1]
    t = 0.5 if abs(total) < 1e-6 else ws[1] / total
    out = nuslerp_pair(t, points[0], points[1], dim=0 if nuslerp_row_wise else -1,
                       flatten=nuslerp_flatten)
    if origin is not None:
        out = out - origin
    return out.to(task_vectors[0].dtype)


# ---------------------------------------------------------------------------------------------
# Multi-SLERP
# ---------------------------------------------------------------------------------------------

def _weights_not_zero(params: Mapping[str, Any], weights: Sequence[float]) -> None:
    base_weight = params.get("base_weight")
    total = sum(weights) + (0.0 if base_weight is None else float(base_weight))
    if params.get("normalize_weights", True) and total == 0:
        raise ValueError("multislerp: the weights sum to zero, so normalize_weights cannot "
                         "divide by their sum")


@register(
    "multislerp",
    family="elementwise",
    summary="Barycentric SLERP of K models: weighted mean of the unit task vectors in the "
            "tangent space at their mean direction, mapped back, scaled by the mean norm.",
    citation="Goddard, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea); as "
             "in mergekit 0.1.5 (mergekit/merge_methods/multislerp.py)",
    docs={"base_weight": BASE_WEIGHT_DOC,
          "normalize_weights": "divide the weights by their sum",
          "eps": "added to norms before dividing by them"},
    constraints={"eps": Interval(float, 0, None)},
    uses_weights=True,
    uses_base=True,
    check=_weights_not_zero,
    notes="Per-model weights default to 1 (mergekit requires them). One interpolated model "
          "is returned as it is. " + WHOLE_TENSOR + ": norms and the mean direction are over "
          "the whole flattened tensor.",
)
def multislerp(task_vectors: Sequence[Tensor], *, base: Tensor,
               weights: Sequence[float] | None = None, base_weight: float | None = None,
               normalize_weights: bool = True, eps: float = 1e-8) -> Tensor:
    """Multi-SLERP of the points x_i (the τ_i, or θ0 and the θ_i with ``base_weight``), weights
    w_i (÷ Σ w with ``normalize_weights``), as mergekit 0.1.5 computes it:

        r_i = ‖x_i‖, u_i = x_i / (r_i + eps),  m = Σ w_i u_i,  μ = m / ‖m‖
        g = Σ w_i (u_i − (u_i·μ) μ),  ‖g‖' = ‖g‖ + eps
        x = (Σ w_i r_i) (cos ‖g‖' μ + sin ‖g‖' g / ‖g‖')
    When ‖m‖ < eps: two points give w_1 x_1 + w_2 x_2; more are an error (antipodal points
    whose weights balance). Returns x (or x − θ0 with ``base_weight``).
    """
    points, ws, origin = _points(task_vectors, base, weights, base_weight)
    if len(points) == 1:
        return task_vectors[0]
    x = torch.stack(points).reshape(len(points), -1)
    w = torch.tensor(ws, dtype=x.dtype, device=x.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(x, dim=-1, keepdim=True)
    units = x / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(points) != 2:
            raise ValueError("multislerp: the weighted mean of the unit vectors is zero "
                             "(antipodal models whose weights balance); change the weights")
        out = x[0] * w[0] + x[1] * w[1]
    else:
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        g = (tangents * w.view(-1, 1)).sum(0)
        g_norm = torch.norm(g) + eps
        out = mean * torch.cos(g_norm) + g * (torch.sin(g_norm) / g_norm)
        out = out * (norms.squeeze(-1) * w).sum()
    out = out.reshape(points[0].shape)
    if origin is not None:
        out = out - origin
    return out.to(task_vectors[0].dtype)

