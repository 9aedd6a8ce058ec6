"""Interference methods: WUDI, its closed form, SWUDI and SWUDI-A.

Notation, for one matrix parameter with task vectors τ_i ∈ R^{m×n} (out × in), i = 1..K
(WUDI-Merging: Cheng et al., ICML 2025, arXiv 2503.08099):

    w_i  = 1 / max(‖τ_i‖_F², 1e-12)
    L(τ) = Σ_i w_i ‖(τ − τ_i) τ_iᵀ‖_F²          the data-free interference objective
    C    = Σ_i w_i τ_iᵀ τ_i                      n × n, PSD, trace C = K
    D    = Σ_i w_i τ_i τ_iᵀ τ_i                  m × n
    ∇L   = 2 (τ C − D)

The rows of τ_i stand in for the layer's inputs, so L measures how much the merged update
disturbs each task on its own input subspace. τ_0 is the starting point (Σ_i τ_i by default).

SWUDI (Wei et al., "Closed-Form Spectral Regularization for Multi-Task Model Merging", arXiv
2606.07289) reads gradient descent on L as a spectral filter. With C = Q Λ Qᵀ (λ floored at 1e-8),
every estimator here has the form

    τ̂ = τ_0 + (D − τ_0 C) Q diag(h / λ) Qᵀ

where h = 0 on the directions whose λ is rounding noise (λ ≤ λ_max · n · eps, ``significant``),
and otherwise a filter h ∈ [0, 1]: h = 1 gives the closed form D C⁺, h = 1 − (1 − 2ηλ)^T is T steps of
gradient descent with step η, h = 1 − exp(−t λ) is its continuous-time limit (t = 2ηT).

All functions take the K task vectors of one 2-D parameter and return the merged update τ (not
θ) in the compute dtype: float32, or float64 if any input is float64 (bf16/fp16 are upcast). They
run on the inputs' device. C and D are built one task at a time; no K-fold stack is ever held.

Factored task vectors (LoRA, ``LowRank``): the closed form, SWUDI and SWUDI-A run on the cores of
``specmerge.lowrank``: C lives in the row space of the stacked A_i and D, τ_0 and the update in
the span of the factors, so one eigendecomposition of a (Σ r_i)-sized C gives the dense result
exactly, returned factored. C's other n − q eigenvalues are 0, floored to 1e-8 as on the dense
path, and enter the rank rules; their directions add nothing (D − τ_0 C vanishes there).
Iterative WUDI (Adam is element-wise) densifies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from specmerge.linalg import prepare_task_vectors, sym_eigh, upcast
from specmerge.lowrank import Space, TaskVector, dense, embed
from specmerge.methods.elementwise import weight_average
from specmerge.methods.registry import Interval, Options, register, warn_unbound
from specmerge.methods.scale_rule import SCALING_AUTO_DOC, SCALING_OR_AUTO, Scaling, resolve_scaling

WEIGHT_FLOOR = 1e-12  # w_i = 1 / max(‖τ_i‖², WEIGHT_FLOOR); below it a task counts as zero
EIG_FLOOR = 1e-8  # eigenvalues of C are floored here before any division (official SWUDI code)
# The closed-form solvers form C and D, decompose C and apply the update in float64 whatever the
# compute dtype: C squares the τ_i's condition number, and the residual D − τ_0 C cancels (to 0
# at K = 1). The official code stays in float32: a documented deviation (docs/numerics.md).
CORE_DTYPE = torch.float64
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam defaults, as in the official WUDI code
ADAM_EPS = 1e-8

CITE_WUDI = ("Cheng et al., Whoever Started the Interference Should End It: Guiding Data-Free "
             "Model Merging via Task Vectors (WUDI-Merging), ICML 2025, arXiv 2503.08099")
CITE_SWUDI = ("Wei et al., Closed-Form Spectral Regularization for Multi-Task Model Merging "
              "(SWUDI), arXiv 2606.07289")

Init = Literal["sum", "mean", "zero"]


# ---------------------------------------------------------------------------------------------
# Pieces shared by the four methods
# ---------------------------------------------------------------------------------------------

def prepare(task_vectors: Sequence[TaskVector]) -> list[Tensor]:
    """The τ_i as K ≥ 1 same-shape dense 2-D matrices in the compute dtype."""
    return prepare_task_vectors([dense(t) for t in task_vectors], "interference methods",
                                matrix=True)


def _sq_norm(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t)) ** 2


def task_weights(taus: Sequence[Tensor]) -> list[float]:
    """w_i = 1 / max(‖τ_i‖_F², 1e-12) (arXiv 2503.08099)."""
    return [1.0 / max(_sq_norm(t), WEIGHT_FLOOR) for t in taus]


def negligible(taus: Sequence[Tensor]) -> bool:
    """True when every ‖τ_i‖_F² < 1e-12; the methods then return the mean of the τ_i."""
    return all(_sq_norm(t) < WEIGHT_FLOOR for t in taus)


def interference_gram(taus: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """C = Σ w_i τ_iᵀ τ_i (n × n) alone, for diagnostics that need no D, in ``dtype`` (default:
    the τ_i's; the methods use ``CORE_DTYPE``), each τ_i cast to it in turn."""
    n = taus[0].shape[1]
    c = taus[0].new_zeros(n, n, dtype=dtype or taus[0].dtype)
    for w, tau in zip(task_weights(taus), taus, strict=True):
        t = tau.to(c.dtype)
        c.addmm_(t.mT, t, alpha=w)
    return c


def interference_stats(taus: Sequence[Tensor],
                       dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """C = Σ w_i τ_iᵀ τ_i (n × n) and D = Σ w_i τ_i τ_iᵀ τ_i (m × n), one task at a time, in
    ``dtype`` (default: the τ_i's), each τ_i cast to it in turn.

    D_i is associated the cheaper way: τ_i G_i with G_i = τ_iᵀ τ_i reused from C when m ≥ n
    (m n² flops), (τ_i τ_iᵀ) τ_i when m < n (m² n flops). The temporaries are one cast τ_i and
    one n × n or m × m matrix; no K-fold stack is formed.
    """
    m, n = taus[0].shape
    dtype = dtype or taus[0].dtype
    c = taus[0].new_zeros(n, n, dtype=dtype)
    d = taus[0].new_zeros(m, n, dtype=dtype)
    for w, tau in zip(task_weights(taus), taus, strict=True):
        tau = tau.to(dtype)
        if m >= n:
            g = tau.mT @ tau
            c.add_(g, alpha=w)
            d.addmm_(tau, g, alpha=w)
        else:
            c.addmm_(tau.mT, tau, alpha=w)
            d.addmm_(tau @ tau.mT, tau, alpha=w)
    return c, d


def wudi_objective(task_vectors: Sequence[TaskVector], tau: Tensor) -> Tensor:
    """L(τ) = Σ_i w_i ‖(τ − τ_i) τ_iᵀ‖_F² (arXiv 2503.08099, eq. for the WUDI loss).

    Evaluated directly, one task at a time, in the compute dtype; returns a 0-d tensor.
    """
    taus = prepare(task_vectors)
    tau = upcast(tau, taus[0].dtype)
    total = tau.new_zeros(())
    for w, t in zip(task_weights(taus), taus, strict=True):
        total = total + w * ((tau - t) @ t.mT).square().sum()
    return total


def initial_tau(taus: Sequence[Tensor], init: str, dtype: torch.dtype | None = None) -> Tensor:
    """τ_0 in ``dtype`` (default: the τ_i's): Σ_i τ_i (``sum``, the official WUDI code), their
    mean (``mean``) or 0 (``zero``)."""
    dtype = dtype or taus[0].dtype
    if init == "zero":
        return torch.zeros_like(taus[0], dtype=dtype)
    if init == "mean":
        return weight_average(taus).to(dtype)
    total = torch.zeros_like(taus[0], dtype=dtype)
    for t in taus:
        total.add_(t)
    return total


def eigen(c: Tensor) -> tuple[Tensor, Tensor]:
    """C = Q diag(λ) Qᵀ with λ descending and floored at 1e-8 (official SWUDI code)."""
    lam, q = sym_eigh(c)
    return lam.clamp_min(EIG_FLOOR), q


def significant(lam: Tensor) -> int:
    """How many leading eigenvalues of C stand above rounding and above the floor: λ_j >
    max(λ_max · n · eps of C's dtype (the relative cutoff of ``pinv``), EIG_FLOOR). A floored
    eigenvalue is one of null(C) (C's own rounding noise there is ~eps · λ_max, far below the
    floor): dividing by the floor would lift that noise by 1 / EIG_FLOOR into the result (1e-8
    relative in float64, machine-dependent). λ descending; 0 for an all-zero C."""
    cutoff = max(float(lam[0]) * lam.numel() * torch.finfo(lam.dtype).eps, EIG_FLOOR)
    return int((lam > cutoff).sum())


def spectral_update(tau0: Tensor, c: Tensor, d: Tensor, q: Tensor, g: Tensor) -> Tensor:
    """τ̂ = τ_0 + (D − τ_0 C) Q_k diag(g) Q_kᵀ, for the k kept eigenvectors Q_k and g = h/λ.

    In place: D becomes the residual D − τ_0 C and τ_0 becomes τ̂ (both are the caller's
    temporaries), so the update holds one m × k matrix beyond them."""
    if q.shape[1] == 0:
        return tau0
    residual = d.addmm_(tau0, c, alpha=-1.0)  # D − τ_0 C = −∇L(τ_0) / 2
    return tau0.addmm_((residual @ q).mul_(g), q.mT)


def full_spectrum(lam: Tensor, space: Space) -> Tensor:
    """The n eigenvalues of the full C from those of its core (q of them, descending, floored):
    C's other n − q eigenvalues are 0, floored like the rest. Dense input: ``lam`` itself."""
    missing = space.shape[1] - lam.numel()
    return torch.cat([lam, lam.new_full((missing,), EIG_FLOOR)]) if missing > 0 else lam


def _filtered_solution(task_vectors: Sequence[TaskVector],
                       gain: Callable[[Tensor, tuple[int, int]], Tensor],
                       init: str, scaling: Scaling) -> TaskVector:
    """scaling · (τ_0 + (D − τ_0 C) Q_k diag(g) Q_kᵀ), where ``gain(λ, (m, n))`` returns g = h/λ
    for the k leading eigenvalues it keeps (λ descending, floored). The mean of the τ_i when
    every ‖τ_i‖² < 1e-12.

    C, D, the eigendecomposition and the update are computed in float64 (``CORE_DTYPE``) and
    cast back to the compute dtype, like ``wudi_closed_form``; see there and docs/numerics.md.
    """
    space, taus = embed(task_vectors, "interference methods")
    if negligible(taus):
        return space.lift(weight_average(taus))
    c, d = interference_stats(taus, CORE_DTYPE)
    lam, q = eigen(c)
    full = full_spectrum(lam, space)
    g = gain(full, space.shape)
    g = g[:min(significant(full), lam.numel())]  # below rounding (or on null(C)): keep τ_0
    update = spectral_update(initial_tau(taus, init, CORE_DTYPE), c, d, q[:, :g.numel()], g)
    low_rank = significant(full) < full.numel()
    return space.lift(update.mul_(resolve_scaling(scaling, update, taus, low_rank))
                      .to(taus[0].dtype))


def exp_filter(lam: Tensor, exp_time: float) -> Tensor:
    """h = 1 − exp(−t λ), the gradient-flow filter of SWUDI (arXiv 2606.07289)."""
    return -torch.expm1(-exp_time * lam)


def swudi_rank(n: int, rank_ratio: float) -> int:
    """k = max(1, ⌊n · rank_ratio + 0.999⌋), at most n: the official SWUDI count."""
    return min(n, max(1, math.floor(n * rank_ratio + 0.999)))


# ---------------------------------------------------------------------------------------------
# Rank rules of SWUDI-A: λ (eigenvalues of C, floored, descending), shape (m, n) → k
# ---------------------------------------------------------------------------------------------

RankRule = Callable[[Tensor, tuple[int, int]], int]


def _ceil(x: float) -> int:
    """⌈x⌉, forgiving a relative rounding error of 1e-9 (so exp(log 8) gives 8, not 9)."""
    return math.ceil(x - 1e-9 * abs(x))


def _participation_sqrt(lam: Tensor, shape: tuple[int, int]) -> int:
    """k = ⌈(Σ y)² / Σ y²⌉ with y = √λ (the singular values of the stacked √w_i τ_i)."""
    y = lam.sqrt()
    return _ceil(float(y.sum() ** 2 / y.square().sum()))


def _participation(lam: Tensor, shape: tuple[int, int]) -> int:
    """k = ⌈(Σ λ)² / Σ λ²⌉, the participation ratio."""
    return _ceil(float(lam.sum() ** 2 / lam.square().sum()))


def _entropy(lam: Tensor, shape: tuple[int, int]) -> int:
    """k = ⌈exp(−Σ p log p)⌉ with p = λ / Σ λ, the effective rank of Roy and Vetterli."""
    p = lam / lam.sum()
    return _ceil(math.exp(float(-(p * p.log()).sum())))


def _stable_rank(lam: Tensor, shape: tuple[int, int]) -> int:
    """k = ⌈Σ λ² / λ_max²⌉."""
    return _ceil(float(lam.square().sum() / lam.max() ** 2))


def gavish_donoho_threshold(shape: tuple[int, int]) -> float:
    """λ*/μ of the official SWUDI code's Gavish–Donoho variant, β = min(m, n) / max(m, n).

    μ = √((1 − β)² + β) if β < 0.9999 else √(2 + √3);
    λ* = √(2(β + 1) + 8β / ((β + 1) + √(β² + 14β + 1))).
    """
    m, n = shape
    beta = min(m, n) / max(m, n)
    mu = math.sqrt((1 - beta) ** 2 + beta) if beta < 0.9999 else math.sqrt(2 + math.sqrt(3))
    lam_star = math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(
        beta**2 + 14 * beta + 1)))
    return lam_star / mu


def _gavish_donoho(lam: Tensor, shape: tuple[int, int]) -> int:
    """k = #{j : y_j > (λ*/μ) · median(y)}, y = √λ, lower median for an even count."""
    y = lam.sqrt()
    median = y.sort().values[(y.numel() - 1) // 2]
    return int((y > gavish_donoho_threshold(shape) * median).sum())


def _energy(fraction: float) -> RankRule:
    def rule(lam: Tensor, shape: tuple[int, int]) -> int:
        """The smallest k whose top-k λ hold a fraction f of Σ λ."""
        total = lam.sum()
        reached = lam.cumsum(0) >= fraction * total * (1 - 1e-12)
        return int(reached.float().argmax()) + 1

    return rule


RANK_RULES: dict[str, RankRule] = {
    "participation_sqrt": _participation_sqrt,
    "participation": _participation,
    "entropy": _entropy,
    "stable_rank": _stable_rank,
    "gavish_donoho": _gavish_donoho,
}
RANK_RULE_CHOICES = (*RANK_RULES, "energy_*")


def get_rank_rule(name: str) -> RankRule:
    """The rule called ``name``: one of RANK_RULES, or ``energy_<f>`` with 0 < f ≤ 1."""
    if name in RANK_RULES:
        return RANK_RULES[name]
    if name.startswith("energy_"):
        try:
            fraction = float(name.removeprefix("energy_"))
        except ValueError:
            fraction = math.nan
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"swudi_a: rank_rule {name!r} must be energy_<f> with a number "
                             f"0 < f <= 1, e.g. energy_0.9")
        return _energy(fraction)
    raise ValueError(f"swudi_a: rank_rule must be one of {list(RANK_RULE_CHOICES)} "
                     f"(energy_<f> with 0 < f <= 1), got {name!r}")


class RankRuleName(Options):
    """A rank rule's name: one of RANK_RULES, or energy_<f> with a number 0 < f ≤ 1."""

    def is_satisfied_by(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        try:
            get_rank_rule(value)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return (f"one of {list(RANK_RULES)}, or energy_<f> with a number 0 < f <= 1 "
                f"(e.g. energy_0.9)")

    def invalid_values(self) -> list[object]:
        return ["energy_0", "energy_1.5", "energy_x", "foo", 3]


def select_rank(lam: Tensor, shape: tuple[int, int], rank_rule: str, min_rank: int = 1,
                max_rank_ratio: float = 1.0) -> int:
    """k_ℓ = rule(λ), clipped to [min_rank, round(max_rank_ratio · n)], then to n.

    λ must be descending and floored. The rule is evaluated in float64. When min_rank exceeds
    round(max_rank_ratio · n), min_rank wins; n is the hard cap.
    """
    n = lam.numel()
    k = get_rank_rule(rank_rule)(lam.double(), shape)
    k = max(min_rank, min(k, round(max_rank_ratio * n)))
    return min(k, n)


# ---------------------------------------------------------------------------------------------
# Optimisers for wudi, on the analytic gradient 2(τC − D)
# ---------------------------------------------------------------------------------------------

def adam_steps(tau: Tensor, c: Tensor, d: Tensor, iterations: int, lr: float) -> Tensor:
    """``iterations`` steps of Adam on L, in place, as torch.optim.Adam's single-tensor path.

    g = 2(τC − D); m ← lerp(m, g, 1 − β1); v ← β2 v + (1 − β2) g²;
    τ ← τ − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε), with β = (0.9, 0.999), ε = 1e-8.
    """
    beta1, beta2 = ADAM_BETAS
    grad, exp_avg, exp_avg_sq, denom = (torch.zeros_like(tau) for _ in range(4))
    for step in range(1, iterations + 1):
        torch.addmm(d, tau, c, beta=-2.0, alpha=2.0, out=grad)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        torch.sqrt(exp_avg_sq, out=denom).div_(bias_correction2_sqrt).add_(ADAM_EPS)
        tau.addcdiv_(exp_avg, denom, value=-step_size)
    return tau


def gradient_descent_steps(tau: Tensor, c: Tensor, d: Tensor, iterations: int,
                           lr: float) -> Tensor:
    """τ ← τ − lr · 2(τC − D), ``iterations`` times, in place."""
    grad = torch.empty_like(tau)
    for _ in range(iterations):
        torch.addmm(d, tau, c, beta=-2.0, alpha=2.0, out=grad)
        tau.sub_(grad, alpha=lr)
    return tau


_OPTIMIZERS = {"adam": adam_steps, "sgd": gradient_descent_steps}
_INIT_DOC = "τ_0: sum of the task vectors (official code), their mean, or zero"


# ---------------------------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------------------------

@register(
    "wudi",
    family="interference",
    summary="WUDI-Merging: Adam on the data-free interference loss Σ w_i ‖(τ − τ_i) τ_iᵀ‖², "
            "from τ_0 = Σ τ_i.",
    citation=CITE_WUDI,
    docs={
        "iterations": "number of optimiser steps per matrix (official code: 300; FusionBench 400)",
        "lr": "learning rate (official code: 1e-5)",
        "optimizer": "adam (torch defaults, official code) or sgd (plain gradient descent)",
        "init": _INIT_DOC,
        "scaling": SCALING_AUTO_DOC,
    },
    constraints={"iterations": Interval(int, 0, None, closed="left"),
                 "lr": Interval(float, 0, None, closed="neither"),
                 "scaling": SCALING_OR_AUTO},
    matrix_only=True,
    notes="Uses the analytic gradient 2(τC − D): one m×n×n product per step, not K.",
)
def wudi(task_vectors: Sequence[TaskVector], *, iterations: int = 300, lr: float = 1e-5,
         optimizer: Literal["adam", "sgd"] = "adam", init: Init = "sum",
         scaling: Scaling = 1.0) -> Tensor:
    """WUDI-Merging (Cheng et al., arXiv 2503.08099): minimise L(τ) = Σ_i w_i ‖(τ − τ_i) τ_iᵀ‖²
    by ``iterations`` steps of ``optimizer`` from τ_0, then multiply by ``scaling``.

    The gradient is computed analytically as ∇L = 2(τC − D), which is exactly autograd's gradient
    of L. Adam uses torch's defaults (β = (0.9, 0.999), ε = 1e-8, bias correction); with
    ``lr`` = 1e-5 and 300 steps these are the official code's settings. ``sgd`` is plain gradient
    descent, τ_T = τ_0 + (D − τ_0 C) Q diag(h/λ) Qᵀ with h = 1 − (1 − 2·lr·λ)^T.

    Degenerate inputs: if every ‖τ_i‖² < 1e-12 the mean of the τ_i is returned. K = 1 with
    ``init: sum`` starts at the minimiser τ_1, but Adam divides the gradient's rounding noise by
    ε = 1e-8 and so hovers within about ``lr`` of τ_1 per entry (torch.optim.Adam does the same;
    ``sgd`` stays put). A rank-deficient C leaves τ unchanged along null(C), where the gradient
    vanishes, so the result stays finite.
    """
    taus = prepare(task_vectors)
    if negligible(taus):
        return weight_average(taus)
    c, d = interference_stats(taus)
    tau = _OPTIMIZERS[optimizer](initial_tau(taus, init), c, d, iterations, lr)
    low_rank = scaling == "auto" and significant(eigen(c.to(CORE_DTYPE))[0]) < c.shape[0]
    return tau.mul_(resolve_scaling(scaling, tau, taus, low_rank))


@register(
    "wudi_closed_form",
    family="interference",
    summary="Exact minimiser of the WUDI loss, τ* = D C⁺ (data-free RegMean).",
    citation=CITE_WUDI + "; closed form as in " + CITE_SWUDI,
    docs={"scaling": "multiplies the result (1: the exact minimiser; validate it like task "
                     "arithmetic's λ on low-rank experts); " + SCALING_AUTO_DOC[23:]},
    constraints={"scaling": SCALING_OR_AUTO},
    matrix_only=True,
    factored=True,
    recorded_if_set=("scaling",),
    notes="SWUDI's paper reports it below iterative WUDI (82.33% vs 84.63% on ViT-B/32, 8 tasks).",
)
def wudi_closed_form(task_vectors: Sequence[TaskVector], *,
                     scaling: Scaling = 1.0) -> TaskVector:
    """τ* = D C⁺ = D Q_k diag(1 / λ_k) Q_kᵀ, the minimiser of the WUDI loss
    L(τ) = Σ_i w_i ‖(τ − τ_i) τ_iᵀ‖² (arXiv 2503.08099; the limit of SWUDI, arXiv 2606.07289,
    as exp_time → ∞ with rank_ratio 1).

    C⁺ keeps the k eigen-directions with λ > λ_max · n · eps of the compute dtype (``pinv``'s
    relative cutoff): below it an eigenvalue is rounding noise, and dividing by it (as the
    official code's absolute 1e-8 floor does) amplifies noise along null(C). So K = 1 gives τ_1
    (L(τ_1) = 0) to float32 precision on any shape, and a rank-deficient C (K·m < n) gives a
    result with no component on null(C). C squares the condition number of the τ_i, so C, D
    and the eigendecomposition are computed in float64 (cast back to the compute dtype): in
    float32 a well-posed K = 1 merge of a 512 × 512 task vector was 2 % off τ_1 even with the
    cutoff. If every ‖τ_i‖² < 1e-12 the mean of the τ_i is returned. ``scaling`` multiplies
    the result (1.0, the default, is the minimiser itself; specmerge's addition, so that the
    scale can be validated as the official code does for SWUDI).
    """
    space, taus = embed(task_vectors, "wudi_closed_form")
    if negligible(taus):
        return space.lift(weight_average(taus))
    c, d = interference_stats(taus, CORE_DTYPE)
    lam, q = eigen(c)
    full = full_spectrum(lam, space)
    k = min(significant(full), lam.numel())
    tau = (d @ q[:, :k]).div_(lam[:k]) @ q[:, :k].mT
    low_rank = significant(full) < full.numel()
    return space.lift(tau.mul_(resolve_scaling(scaling, tau, taus, low_rank)).to(taus[0].dtype))


@register(
    "swudi",
    family="interference",
    summary="SWUDI: WUDI's loss solved in closed form with an exponential spectral filter and "
            "top-k truncation, one eigendecomposition per matrix.",
    citation=CITE_SWUDI,
    docs={
        "rank_ratio": "fraction of C's eigen-directions kept, k = max(1, ⌊n·ratio + 0.999⌋) "
                      "(official code: 0.65)",
        "exp_time": "t of the filter h = 1 − exp(−tλ) (paper: 1300 for ViT-B/32, 1800 for B/16)",
        "init": _INIT_DOC,
        "scaling": SCALING_AUTO_DOC,
    },
    constraints={"rank_ratio": Interval(float, 0, 1, closed="right"),
                 "exp_time": Interval(float, 0, None, closed="left"),
                 "scaling": SCALING_OR_AUTO},
    matrix_only=True,
    factored=True,
)
def swudi(task_vectors: Sequence[TaskVector], *, rank_ratio: float = 0.65,
          exp_time: float = 1300.0, init: Init = "sum", scaling: Scaling = 1.0) -> TaskVector:
    """SWUDI (Wei et al., arXiv 2606.07289): with C = Q Λ Qᵀ, λ floored at 1e-8 and sorted
    descending,

        h_j = 1[j < k] · (1 − exp(−exp_time · λ_j)),   k = max(1, ⌊n · rank_ratio + 0.999⌋),
        τ̂   = scaling · (τ_0 + (D − τ_0 C) Q diag(h/λ) Qᵀ).

    This is gradient flow on the WUDI loss (arXiv 2503.08099) for time exp_time, restricted to
    the top-k eigen-directions of C; on discarded directions τ̂ keeps τ_0. Defaults follow the
    paper and its official code (rank_ratio 0.65, exp_time 1300 for ViT-B/32). The result is
    equivariant to scale: τ_i → cτ_i gives τ̂ → cτ̂, since C is invariant and D, τ_0 scale by c.
    exp_time = 0 returns τ_0; exp_time → ∞ with rank_ratio 1 gives ``wudi_closed_form``.

    Degenerate inputs: every ‖τ_i‖² < 1e-12 returns the mean of the τ_i; K = 1 with init sum
    returns τ_1 (D − τ_0 C = 0); on null(C) the gain h/λ is at most exp_time, so a
    rank-deficient C gives a finite result without the closed form's amplification.
    """

    def gain(lam: Tensor, shape: tuple[int, int]) -> Tensor:
        k, rank_c = swudi_rank(lam.numel(), rank_ratio), significant(lam)
        if k > rank_c:
            warn_unbound(f"swudi: rank_ratio {rank_ratio} keeps k = {k} of the {lam.numel()} "
                         f"eigen-directions of C, but C has rank {rank_c}, so the truncation "
                         f"cannot bind and SWUDI is the filtered closed form; for low-rank "
                         f"(LoRA) experts the official Qwen2-VL LoRA setting is rank_ratio "
                         f"0.01, exp_time 1300, scaling 1/K (parameters: {{preset: "
                         f"qwen2vl-lora}})")
        kept = lam[:k]
        return exp_filter(kept, exp_time).div_(kept)

    return _filtered_solution(task_vectors, gain, init, scaling)


@register(
    "swudi_a",
    family="interference",
    summary="SWUDI-A: the SWUDI estimator with a per-layer rank chosen by a rule on C's "
            "spectrum, and a hard (unfiltered) truncation by default.",
    citation=CITE_SWUDI,
    docs={
        "rank_rule": "how k is chosen from λ(C): participation_sqrt (official default), "
                     "participation, entropy, stable_rank, gavish_donoho, or energy_<f>",
        "min_rank": "lower clip of k",
        "max_rank_ratio": "upper clip of k, as round(max_rank_ratio · n)",
        "filter": "none: h = 1 on the top k (official default); exponential: h = 1 − exp(−tλ)",
        "exp_time": "t of the exponential filter, used only with filter: exponential",
        "init": _INIT_DOC,
        "scaling": SCALING_AUTO_DOC,
    },
    constraints={"rank_rule": RankRuleName(RANK_RULE_CHOICES),
                 "min_rank": Interval(int, 1, None, closed="left"),
                 "max_rank_ratio": Interval(float, 0, 1, closed="right"),
                 "exp_time": Interval(float, 0, None, closed="left"),
                 "scaling": SCALING_OR_AUTO},
    matrix_only=True,
    factored=True,
)
def swudi_a(task_vectors: Sequence[TaskVector], *, rank_rule: str = "participation_sqrt",
            min_rank: int = 1, max_rank_ratio: float = 1.0,
            filter: Literal["none", "exponential"] = "none", exp_time: float = 1300.0,
            init: Init = "sum", scaling: Scaling = 1.0) -> TaskVector:
    """SWUDI-A (Wei et al., arXiv 2606.07289): the SWUDI estimator

        τ̂ = scaling · (τ_0 + (D − τ_0 C) Q diag(h/λ) Qᵀ),   h_j = 1[j < k_ℓ] · f(λ_j),

    with f = 1 (``filter: none``) or f = 1 − exp(−exp_time · λ) (``exponential``), and a per-layer
    rank k_ℓ chosen from λ (eigenvalues of C, floored at 1e-8, descending; y = √λ) by
    ``rank_rule``, as in the official SWUDI code:

    - participation_sqrt: ⌈(Σ y)² / Σ y²⌉;   participation: ⌈(Σ λ)² / Σ λ²⌉;
    - entropy: ⌈exp(−Σ p log p)⌉, p = λ / Σ λ;   stable_rank: ⌈Σ λ² / λ_max²⌉;
    - gavish_donoho: #{y_j > (λ*/μ) · median(y)} (see ``gavish_donoho_threshold``);
    - energy_<f> (specmerge's addition): the smallest k with Σ_{j≤k} λ_j ≥ f Σ λ.

    k_ℓ is clipped to [min_rank, round(max_rank_ratio · n)] and to n. Scale-equivariant like
    ``swudi``. Degenerate inputs: every ‖τ_i‖² < 1e-12 returns the mean of the τ_i; K = 1 with
    init sum returns τ_1; with ``filter: none`` a rank-deficient C is safe as long as k_ℓ stays
    within its rank (the spectral rules count the floored null eigenvalues as nearly nothing).
    """
    def gain(lam: Tensor, shape: tuple[int, int]) -> Tensor:
        kept = lam[:select_rank(lam, shape, rank_rule, min_rank, max_rank_ratio)]
        return exp_filter(kept, exp_time).div_(kept) if filter == "exponential" else kept.reciprocal()

    return _filtered_solution(task_vectors, gain, init, scaling)
