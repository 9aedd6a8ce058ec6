"""Tests of the interference family: WUDI, its closed form, SWUDI, SWUDI-A.

References are computed here from the definitions (naive stacks, torch.linalg.eigh, autograd,
torch.optim.Adam), never by calling the helpers under test. Shapes are tiny; float64 is used
wherever an identity is checked to rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from specmerge.methods import get_method
from specmerge.methods.interference import (
    RANK_RULES,
    gavish_donoho_threshold,
    get_rank_rule,
    interference_stats,
    select_rank,
    swudi,
    swudi_a,
    swudi_rank,
    wudi,
    wudi_closed_form,
    wudi_objective,
)
from specmerge.synthetic import structured_task_vectors

F64 = torch.float64


def make_taus(m: int, n: int, k: int, seed: int = 0, dtype: torch.dtype = F64) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(m, n, generator=gen, dtype=F64).to(dtype) for _ in range(k)]


def ref_stats(taus: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """C, D and the weights straight from the definitions, with a K-fold stack."""
    t = torch.stack(taus)
    w = 1.0 / t.square().sum(dim=(1, 2))
    c = (w[:, None, None] * t.mT @ t).sum(0)
    d = (w[:, None, None] * t @ t.mT @ t).sum(0)
    return c, d, w


def ref_loss(tau: Tensor, taus: list[Tensor]) -> Tensor:
    """L(τ) = Σ_i ‖(τ − τ_i) τ_iᵀ‖² / ‖τ_i‖², written as the WUDI paper writes it."""
    return sum(((tau - t) @ t.mT).square().sum() / t.square().sum() for t in taus)


def ref_filtered(taus: list[Tensor], h_of_lam) -> Tensor:  # noqa: ANN001
    """τ_0 + (D − τ_0 C) Q diag(h/λ) Qᵀ with τ_0 = Σ τ_i, from torch.linalg.eigh directly."""
    c, d, _ = ref_stats(taus)
    lam, q = torch.linalg.eigh(c)
    tau0 = sum(taus)
    return tau0 + (d - tau0 @ c) @ q @ torch.diag(h_of_lam(lam) / lam) @ q.mT


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# C, D and the objective
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(9, 6), (6, 9)])  # both associations of D (m ≥ n, m < n)
def test_stats_match_definitions_and_trace_c_is_k(shape: tuple[int, int]) -> None:
    taus = make_taus(*shape, k=4)
    taus[1] = taus[1] * 1e3  # weights must undo the scale
    c, d = interference_stats(taus)
    c_ref, d_ref, _ = ref_stats(taus)
    torch.testing.assert_close(c, c_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(d, d_ref, rtol=1e-12, atol=0)
    assert float(torch.trace(c)) == pytest.approx(4.0, rel=1e-12)
    assert torch.linalg.eigvalsh(c).min() > -1e-12  # PSD


def test_objective_and_its_analytic_gradient() -> None:
    taus = make_taus(7, 5, k=3)
    tau = make_taus(7, 5, k=1, seed=1)[0].requires_grad_(True)
    loss = ref_loss(tau, taus)
    loss.backward()
    assert float(wudi_objective(taus, tau.detach())) == pytest.approx(loss.item(), rel=1e-12)
    c, d = interference_stats(taus)
    torch.testing.assert_close(2 * (tau.detach() @ c - d), tau.grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# wudi: the optimiser trajectories
# ---------------------------------------------------------------------------------------------

def autograd_adam(taus: list[Tensor], lr: float, iterations: int) -> Tensor:
    tau = sum(taus).clone().requires_grad_(True)
    opt = torch.optim.Adam([tau], lr=lr)
    for _ in range(iterations):
        opt.zero_grad()
        ref_loss(tau, taus).backward()
        opt.step()
    return tau.detach()


@pytest.mark.parametrize(("lr", "iterations"), [(1e-5, 300), (3e-2, 60)])
def test_wudi_adam_equals_autograd_adam(lr: float, iterations: int) -> None:
    taus = make_taus(8, 6, k=3, seed=2)
    tau0 = sum(taus)
    ours = wudi(taus, lr=lr, iterations=iterations)
    ref = autograd_adam(taus, lr, iterations)
    # compare the displacement from τ_0, so the check is not swamped by τ_0 itself
    assert float((ref - tau0).norm()) > 0.1 * lr * iterations
    assert rel(ours - tau0, ref - tau0) < 1e-6


def test_wudi_lowers_the_objective_with_official_defaults() -> None:
    gen = torch.Generator().manual_seed(3)
    taus = structured_task_vectors((48, 32), 4, generator=gen, shared_rank=4, task_rank=4)
    tau0 = sum(taus)
    merged = wudi(taus)
    assert merged.dtype == torch.float32
    assert float(wudi_objective(taus, merged)) < 0.9 * float(wudi_objective(taus, tau0))


def test_wudi_sgd_is_the_polynomial_spectral_filter_exactly() -> None:
    taus = make_taus(10, 7, k=3, seed=4)
    c, _, _ = ref_stats(taus)
    eta, steps = 0.2 / float(torch.linalg.eigvalsh(c).max()), 25
    ours = wudi(taus, optimizer="sgd", lr=eta, iterations=steps)
    ref = ref_filtered(taus, lambda lam: 1 - (1 - 2 * eta * lam) ** steps)
    tau0 = sum(taus)
    assert rel(ours - tau0, ref - tau0) < 1e-10


def test_wudi_sgd_matches_swudi_gradient_flow_to_second_order() -> None:
    taus = make_taus(10, 7, k=3, seed=5)
    c, _, _ = ref_stats(taus)
    # T fixed, η → 0: per eigenvalue the filters differ by e^{−2ηTλ} (2η²λ²T + O(η³)), so the
    # error is O(η²); 2ηTλ_max ≤ 0.08 keeps the e^{−2ηTλ} factor near 1 and the ratio near 4
    eta0, steps = 0.002 / float(torch.linalg.eigvalsh(c).max()), 20
    errors = []
    for eta in (eta0, eta0 / 2, eta0 / 4):
        gd = wudi(taus, optimizer="sgd", lr=eta, iterations=steps)
        flow = swudi(taus, rank_ratio=1.0, exp_time=2 * eta * steps)
        errors.append(float((gd - flow).norm()))
        # small compared with the distance moved
        assert errors[-1] < 1e-2 * float((flow - sum(taus)).norm())
    # halving η quarters the error
    for big, small in zip(errors, errors[1:], strict=False):
        assert 3.5 < big / small < 4.5


# ---------------------------------------------------------------------------------------------
# Closed form and the limits of the SWUDI filter
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(9, 6), (5, 8)])  # m > n, and m < n with K·m ≥ n
def test_closed_form_minimises_the_objective(shape: tuple[int, int]) -> None:
    taus = make_taus(*shape, k=3, seed=6)
    star = wudi_closed_form(taus).requires_grad_(True)
    loss = ref_loss(star, taus)
    loss.backward()
    _, d, _ = ref_stats(taus)
    assert float(star.grad.norm()) < 1e-10 * float(d.norm())
    for seed in range(3):
        bump = 1e-3 * make_taus(*shape, k=1, seed=10 + seed)[0]
        assert float(ref_loss(star.detach() + bump, taus)) > loss.item()


@pytest.mark.parametrize("shape", [(9, 6), (5, 8)])
def test_swudi_full_rank_infinite_time_is_the_closed_form(shape: tuple[int, int]) -> None:
    taus = make_taus(*shape, k=3, seed=7)
    closed = wudi_closed_form(taus)
    assert rel(swudi(taus, rank_ratio=1.0, exp_time=1e12), closed) < 1e-10
    taus32 = [t.float() for t in taus]
    assert rel(swudi(taus32, rank_ratio=1.0, exp_time=1e12), wudi_closed_form(taus32)) < 1e-4


@pytest.mark.parametrize("init", ["sum", "mean", "zero"])
def test_swudi_zero_time_returns_tau0(init: str) -> None:
    taus = make_taus(6, 5, k=3, seed=8)
    tau0 = {"sum": sum(taus), "mean": sum(taus) / 3, "zero": torch.zeros(6, 5, dtype=F64)}[init]
    assert torch.equal(swudi(taus, exp_time=0.0, init=init), tau0)
    assert float((swudi(taus, exp_time=1e-9, init=init) - tau0).norm()) < 1e-7
    assert torch.equal(swudi_a(taus, filter="exponential", exp_time=0.0, init=init), tau0)


def test_swudi_keeps_tau0_on_discarded_directions() -> None:
    taus = make_taus(8, 10, k=3, seed=9)
    c, _, _ = ref_stats(taus)
    _, q = torch.linalg.eigh(c)  # ascending: the first 3 columns are the discarded ones
    out = swudi(taus, rank_ratio=0.65)  # k = ⌊10 · 0.65 + 0.999⌋ = 7 kept, 3 discarded
    torch.testing.assert_close(out @ q[:, :3], sum(taus) @ q[:, :3], rtol=1e-10, atol=1e-12)
    assert rel(out @ q[:, 3:], sum(taus) @ q[:, 3:]) > 1e-3


def test_swudi_rank_is_the_official_count() -> None:
    assert swudi_rank(10, 0.65) == 7  # ⌊6.5 + 0.999⌋
    assert swudi_rank(768, 0.65) == 500  # ⌊499.2 + 0.999⌋
    assert swudi_rank(10, 1.0) == 10  # ⌊10.999⌋
    assert swudi_rank(10, 0.01) == 1  # ⌊0.1 + 0.999⌋ = 1
    assert swudi_rank(3, 1e-9) == 1  # max(1, ⌊0.999⌋ = 0)


@pytest.mark.parametrize("method", ["swudi", "swudi_a", "swudi_a_exp", "wudi_closed_form"])
@pytest.mark.parametrize("scale", [7.3, 1e-3])
def test_scale_equivariance(method: str, scale: float) -> None:
    fn = {
        "swudi": swudi,
        "swudi_a": swudi_a,
        "swudi_a_exp": lambda t: swudi_a(t, filter="exponential", rank_rule="entropy"),
        "wudi_closed_form": wudi_closed_form,
    }[method]
    taus = make_taus(9, 7, k=3, seed=11)
    base = fn(taus)
    scaled = fn([scale * t for t in taus])
    assert rel(scaled, scale * base) < 1e-10


# ---------------------------------------------------------------------------------------------
# Rank rules of SWUDI-A on fixed spectra; every expected k is worked out by hand
# ---------------------------------------------------------------------------------------------

FLAT = [1.0] * 8
# flat, n = 8, y = 1:
#   participation_sqrt (Σy)²/Σy² = 64/8 = 8;  participation (Σλ)²/Σλ² = 64/8 = 8;
#   entropy p = 1/8, exp(log 8) = 8;  stable_rank Σλ²/λmax² = 8/1 = 8;
#   gavish_donoho, shape (8, 8), β = 1: μ = √(2+√3) = 1.93185, λ* = √(4 + 8/6) = 2.30940,
#     threshold 1.19543 · median 1 → no y = 1 exceeds it → k = 0 (clipped to min_rank 1);
#   energy_0.5: cumsum 1, 2, 3, 4 ≥ 4 → 4;  energy_0.3: ≥ 2.4 → 3;  energy_1: → 8.
POWER = [16.0, 4.0, 1.0, 0.25]
# power law λ_j = 4^{2−j}, n = 4, y = 4, 2, 1, 0.5, Σy = 7.5, Σλ = 21.25, Σλ² = 273.0625:
#   participation_sqrt 56.25 / 21.25 = 2.647 → 3;  participation 451.5625 / 273.0625 = 1.654 → 2;
#   entropy p = .7529, .1882, .0471, .0118: H = .2137 + .3144 + .1438 + .0523 = .7241,
#     exp(H) = 2.063 → 3;
#   stable_rank 273.0625 / 256 = 1.067 → 2;
#   gavish_donoho, shape (4, 4): lower median of (.5, 1, 2, 4) is 1, threshold 1.195 →
#     y ∈ {4, 2} → 2;
#   energy_0.75: 15.94 ≤ 16 → 1;  energy_0.9: 19.125 → cumsum 16, 20 → 2.
SPIKE = [9.0] + [1.0] * 7
# spike plus noise, n = 8, y = 3, 1 × 7, Σy = 10, Σλ = 16, Σλ² = 88:
#   participation_sqrt 100 / 16 = 6.25 → 7;  participation 256 / 88 = 2.909 → 3;
#   entropy −(9/16 ln 9/16 + 7/16 ln 1/16) = .3236 + 1.2130 = 1.5367, exp = 4.649 → 5;
#   stable_rank 88 / 81 = 1.086 → 2;
#   gavish_donoho, shape (8, 32), β = 1/4: μ = √(.5625 + .25) = .90139,
#     λ* = √(2.5 + 2 / (1.25 + √4.5625)) = √(2.5 + 2/3.3860) = 1.75803, threshold 1.95036 ·
#     median 1 → only y = 3 → 1;
#   energy_0.5: 9 ≥ 8 → 1;  energy_0.8: 12.8 → cumsum 9, 10, 11, 12, 13 → 5.
GD_MEDIAN = [16.0, 1.69, 1.0, 0.25]
# y = 4, 1.3, 1, .5, shape (4, 4): the lower median is 1 → threshold 1.195 → {4, 1.3} → 2
# (the averaged median 1.15 would give threshold 1.375 and k = 1).

RULE_CASES = [
    (FLAT, (8, 8), {"participation_sqrt": 8, "participation": 8, "entropy": 8,
                    "stable_rank": 8, "gavish_donoho": 0, "energy_0.5": 4, "energy_0.3": 3,
                    "energy_1": 8}),
    (POWER, (4, 4), {"participation_sqrt": 3, "participation": 2, "entropy": 3,
                     "stable_rank": 2, "gavish_donoho": 2, "energy_0.75": 1,
                     "energy_0.9": 2}),
    (SPIKE, (8, 32), {"participation_sqrt": 7, "participation": 3, "entropy": 5,
                      "stable_rank": 2, "gavish_donoho": 1, "energy_0.5": 1, "energy_0.8": 5}),
    (GD_MEDIAN, (4, 4), {"gavish_donoho": 2}),
]


@pytest.mark.parametrize(("spectrum", "shape", "expected"), RULE_CASES,
                         ids=["flat", "power_law", "spike_noise", "gd_lower_median"])
def test_rank_rules_on_hand_computed_spectra(spectrum: list[float], shape: tuple[int, int],
                                             expected: dict[str, int]) -> None:
    lam = torch.tensor(spectrum, dtype=F64)
    got = {name: get_rank_rule(name)(lam, shape) for name in expected}
    assert got == expected
    if spectrum is not GD_MEDIAN:
        assert set(RANK_RULES) <= set(expected)  # every named rule is covered on this spectrum


def test_gavish_donoho_thresholds_by_hand() -> None:
    assert gavish_donoho_threshold((8, 8)) == pytest.approx(2.309401 / 1.931852, rel=1e-6)
    assert gavish_donoho_threshold((32, 8)) == pytest.approx(1.758029 / 0.901388, rel=1e-6)


def test_rank_clipping() -> None:
    spike = torch.tensor(SPIKE, dtype=F64)
    flat = torch.tensor(FLAT, dtype=F64)
    assert select_rank(flat, (8, 8), "gavish_donoho") == 1  # 0 → min_rank 1
    assert select_rank(spike, (8, 32), "participation", min_rank=4) == 4  # 3 → 4
    assert select_rank(spike, (8, 32), "participation_sqrt", max_rank_ratio=0.25) == 2  # 7 → 2
    assert select_rank(spike, (8, 32), "participation_sqrt", max_rank_ratio=0.9) == 7  # cap 7
    # min_rank wins over max_rank_ratio; n stays the hard cap
    assert select_rank(spike, (8, 32), "participation", min_rank=5, max_rank_ratio=0.25) == 5
    assert select_rank(spike, (8, 32), "participation", min_rank=50) == 8


@pytest.mark.parametrize(("rule", "k"), [("participation_sqrt", 3), ("energy_0.75", 1),
                                         ("participation", 2)])
def test_swudi_a_end_to_end_is_truncated_svd(rule: str, k: int) -> None:
    # K = 1, τ = U diag(σ) Vᵀ with σ² ∝ POWER: C = V diag(σ²/Σσ²) Vᵀ has the POWER spectrum
    # up to scale (every rule is scale-free), and with init zero τ̂ = D Q_k Λ_k⁻¹ Q_kᵀ = τ V_k V_kᵀ.
    gen = torch.Generator().manual_seed(12)
    u, _ = torch.linalg.qr(torch.randn(6, 4, generator=gen, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=F64))
    sigma = torch.tensor(POWER, dtype=F64).sqrt()
    tau = u @ torch.diag(sigma) @ v.mT
    expected = u[:, :k] @ torch.diag(sigma[:k]) @ v[:, :k].mT
    torch.testing.assert_close(swudi_a([tau], rank_rule=rule, init="zero"), expected,
                               rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Validation at the door, and the registry
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["energy_0", "energy_1.5", "energy_x", "energy_", "foo"])
def test_bad_rank_rules_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="rank_rule"):
        swudi_a(make_taus(4, 3, k=2), rank_rule=bad)


def test_bad_parameters_are_refused() -> None:
    taus = make_taus(4, 3, k=2)
    with pytest.raises(ValueError, match="optimizer"):
        wudi(taus, optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank_ratio"):
        swudi(taus, rank_ratio=0.0)
    with pytest.raises(ValueError, match="init"):
        swudi(taus, init="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D"):
        swudi([torch.zeros(3)])
    with pytest.raises(ValueError, match="shape"):
        wudi_closed_form([torch.zeros(3, 2), torch.zeros(2, 3)])


def test_registry_entries() -> None:
    expected = {
        "wudi": {"iterations": 300, "lr": 1e-5, "optimizer": "adam", "init": "sum",
                 "scaling": 1.0},
        "wudi_closed_form": {"scaling": 1.0},
        "swudi": {"rank_ratio": 0.65, "exp_time": 1300.0, "init": "sum", "scaling": 1.0},
        "swudi_a": {"rank_rule": "participation_sqrt", "min_rank": 1, "max_rank_ratio": 1.0,
                    "filter": "none", "exp_time": 1300.0, "init": "sum", "scaling": 1.0},
    }
    for name, defaults in expected.items():
        method = get_method(name)
        assert method.family == "interference" and method.matrix_only
        assert method.defaults() == defaults
    swudi_a_method = get_method("swudi_a")
    assert swudi_a_method.validate({"rank_rule": "energy_0.9"})["rank_rule"] == "energy_0.9"
    with pytest.raises(ValueError, match="rank_rule"):
        swudi_a_method.validate({"rank_rule": "entropy2"})


# ---------------------------------------------------------------------------------------------
# Degenerate inputs
# ---------------------------------------------------------------------------------------------

ALL = {
    "wudi": wudi,
    "wudi_closed_form": wudi_closed_form,
    "swudi": swudi,
    "swudi_a": swudi_a,
}


@pytest.mark.parametrize("name", list(ALL))
def test_negligible_task_vectors_give_their_mean(name: str) -> None:
    zeros = [torch.zeros(5, 4) for _ in range(3)]
    assert torch.equal(ALL[name](zeros), torch.zeros(5, 4))
    tiny = make_taus(5, 4, k=3, seed=13, dtype=torch.float32)
    tiny = [1e-8 * t for t in tiny]  # ‖τ_i‖² ≈ 2e-15 < 1e-12
    torch.testing.assert_close(ALL[name](tiny), sum(tiny) / 3, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("shape", [(9, 4), (4, 9)])
def test_single_expert_returns_it(name: str, shape: tuple[int, int]) -> None:
    (tau,) = make_taus(*shape, k=1, seed=14)
    out = ALL[name]([tau])
    if name == "wudi":
        # Adam starts at the minimiser, but rounding in its gradient (≈ 1e-16) is divided by
        # eps = 1e-8; it then hovers within about lr = 1e-5 of τ_1 per entry, as torch's does
        assert float((out - tau).abs().max()) < 10 * 1e-5
    else:
        # L(τ_1) = 0: the filtered estimators return τ_1 (the closed form up to its 1e-8 floor)
        assert rel(out, tau) < 1e-8


@pytest.mark.parametrize("name", list(ALL))
def test_rank_deficient_c(name: str) -> None:
    # K·m = 6 < n = 10: C has rank 6; min L = 0, and the exact minimiser lies in range(C)
    taus = make_taus(3, 10, k=2, seed=15)
    c, _, _ = ref_stats(taus)
    lam, q = torch.linalg.eigh(c)
    null = q[:, lam < 1e-10]
    assert null.shape[1] == 4
    out = ALL[name](taus)
    assert torch.isfinite(out).all()
    if name in ("wudi_closed_form", "swudi_a"):  # swudi_a: participation_sqrt k ≤ rank C
        assert float(wudi_objective(taus, out)) < 1e-12
        assert float((out @ null).norm()) < 1e-6 * float(out.norm())
    # float32: finite whatever the floor does to rounding noise on null(C)
    assert torch.isfinite(ALL[name]([t.float() for t in taus])).all()


def test_half_precision_inputs_are_upcast() -> None:
    taus = [t.to(torch.bfloat16) for t in make_taus(6, 5, k=3, seed=16, dtype=torch.float32)]
    for fn in ALL.values():
        out = fn(taus)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(48, 48), (64, 160), (160, 64), (7, 7)])
def test_closed_form_k1_returns_tau_in_float32(shape: tuple[int, int]) -> None:
    # gap 7: the absolute 1e-8 floor divided rounding noise along C's near-null directions
    # (9-29 % error on square matrices, 265 % on 64 × 160); the relative cutoff removes it.
    # K = 1: τ* = D C⁺ = τ exactly (D − τ C = 0). In float32 arithmetic C = wτᵀτ and the residual
    # D − τ_0 C carry rounding of eps32 · ‖C‖, which C⁺ amplifies by κ(C) = κ(τ)²: the error
    # is about n · eps32 · κ(τ)² (3.8e-4 for SWUDI on the 7 × 7 case, κ(τ)² = 877, on an Intel
    # CPU; 2e-5 on an AMD EPYC). The solvers form C, D and the update in float64, so the bound
    # is the same with eps64, plus the final rounding to float32 (half an ulp an entry).
    tau = make_taus(*shape, k=1, seed=21, dtype=torch.float32)[0]
    s = torch.linalg.svdvals(tau.double())
    kappa = float(s[0] / s[-1])
    bound = (torch.finfo(torch.float32).eps
             + max(shape) * torch.finfo(torch.float64).eps * kappa**2)
    assert rel(wudi_closed_form([tau]), tau) <= bound
    # and the SWUDI limit keeps matching the closed form under the same cutoff
    assert rel(swudi([tau], rank_ratio=1.0, exp_time=1e12), wudi_closed_form([tau])) <= bound
    assert rel(swudi_a([tau], rank_rule="energy_1.0"), tau) <= bound


def test_closed_form_scaling_multiplies_the_minimiser() -> None:
    taus = make_taus(12, 9, k=3, seed=31, dtype=torch.float64)
    exact = wudi_closed_form(taus)
    assert torch.equal(wudi_closed_form(taus, scaling=1.0), exact)
    torch.testing.assert_close(wudi_closed_form(taus, scaling=0.3), 0.3 * exact, rtol=1e-15,
                               atol=0)


def test_a_rank_ratio_that_cannot_bind_is_said_with_the_numbers() -> None:
    from specmerge.lowrank import LowRank
    from specmerge.methods.registry import UnboundRankWarning

    gen = torch.Generator().manual_seed(3)
    taus = [LowRank(torch.randn(40, 2, generator=gen, dtype=torch.float64),
                    torch.randn(2, 30, generator=gen, dtype=torch.float64), 1.0) for _ in range(3)]
    with pytest.warns(UnboundRankWarning, match=r"keeps k = 20 of the 30 eigen-directions of C, "
                                                r"but C has rank 6.*rank_ratio 0.01"):
        swudi(taus)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnboundRankWarning)
        swudi(taus, rank_ratio=0.1)  # k = 3 <= 6: binds, nothing said
        swudi(make_taus(12, 9, k=3, seed=2, dtype=torch.float64))  # dense, full rank
