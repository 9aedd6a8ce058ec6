"""SVC calibration: closed forms, a hand-worked example, invariants, dtypes, validation."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from specmerge.methods import get_method
from specmerge.methods.calibration import svc, svc_from_svd
from specmerge.methods.elementwise import task_arithmetic
from specmerge.methods.subspace import iso_c, iso_cts

F64 = torch.float64


def rand(shape: tuple[int, ...], seed: int, dtype: torch.dtype = F64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).to(dtype)


def orthogonal(n: int, seed: int) -> Tensor:
    q, _ = torch.linalg.qr(rand((n, n), seed))
    return q


def t(rows: list[list[float]]) -> Tensor:
    return torch.tensor(rows, dtype=F64)


def reference_svc(merged: Tensor, taus: list[Tensor], alpha: float) -> Tensor:
    """The corrected SVC rule written as plain loops over r and i, in float64."""
    u, sigma, vh = torch.linalg.svd(merged.double(), full_matrices=False)
    gamma = torch.empty_like(sigma)
    for r in range(len(sigma)):
        total = 0.0
        for tau in taus:
            a = u[:, r] @ tau.double()
            s = float(sigma[r] * (a @ vh[r]) / max(float(a @ a), 1e-12))
            total += max(alpha, s)
        gamma[r] = len(taus) / total
    return (u * (gamma * sigma)) @ vh


def responses(merged: Tensor, taus: list[Tensor]) -> Tensor:
    """s_i^r for every task i (rows) and rank r (columns), by loops."""
    u, sigma, vh = torch.linalg.svd(merged, full_matrices=False)
    out = torch.empty(len(taus), len(sigma), dtype=merged.dtype)
    for i, tau in enumerate(taus):
        for r in range(len(sigma)):
            a = u[:, r] @ tau
            out[i, r] = sigma[r] * (a @ vh[r]) / max(float(a @ a), 1e-12)
    return out


# ---------------------------------------------------------------------- reference values

def test_hand_worked_two_tasks_3x2() -> None:
    # τ_1 = [[3,0],[0,1],[0,0]], τ_2 = [[1,0],[0,−2],[0,0]], W_m = τ_1 + τ_2 = [[4,0],[0,−1],[0,0]]
    # SVD of W_m: σ = (4, 1), (u_1, v_1) = (e1, e1), (u_2, v_2) = (e2, −e2). K = 2, α = 1/K = 1/2.
    # r = 1: a_1 = u_1ᵀτ_1 = (3, 0) → s_1 = 4·3/9 = 4/3;  a_2 = (1, 0) → s_2 = 4·1/1 = 4
    #        γ_1 = 2 / (4/3 + 4) = 3/8,  γ_1 σ_1 = 3/2
    # r = 2: a_1 = (0, 1), ⟨a_1, v_2⟩ = −1 → s_1 = −1 → clipped to α = 1/2
    #        a_2 = (0, −2), ⟨a_2, v_2⟩ = 2 → s_2 = 1·2/4 = 1/2
    #        γ_2 = 2 / (1/2 + 1/2) = 2 (amplified),  γ_2 σ_2 = 2
    # W̃ = 3/2 e1e1ᵀ − 2 e2e2ᵀ
    t1, t2 = t([[3, 0], [0, 1], [0, 0]]), t([[1, 0], [0, -2], [0, 0]])
    out = svc(t1 + t2, [t1, t2])
    assert torch.allclose(out, t([[1.5, 0], [0, -2], [0, 0]]), atol=1e-12)
    # the same numbers at α = 1: r = 2 sums max(1, −1) + max(1, 1/2) = 2 → γ_2 = 1;
    # r = 1 is unchanged (both s > 1): W̃ = 3/2 e1e1ᵀ − e2e2ᵀ
    assert torch.allclose(svc(t1 + t2, [t1, t2], alpha=1.0), t([[1.5, 0], [0, -1], [0, 0]]),
                          atol=1e-12)


def test_right_space_reference() -> None:
    # τ_1 = [[1,0],[0,1],[0,0]], τ_2 = [[1,0],[0,−1],[0,1]], W_m = [[2,0],[0,0],[0,1]]:
    # σ = (2, 1), (u_1, v_1) = (e1, e1), (u_2, v_2) = (e3, e2). α = 1/2.
    # left:  r = 1: a_i = (1, 0), s_i = 2 → γ_1 = 2/4 = 1/2 → 1
    #        r = 2: a_1 = row 3 of τ_1 = 0 → s_1 = 0 → α;  a_2 = (0, 1) → s_2 = 1
    #               γ_2 = 2 / (1/2 + 1) = 4/3
    # right: b_i = τ_i v_r. r = 1: b_i = (1, 0, 0), s_i = 2·⟨e1, b_i⟩/1 = 2 → γ_1 = 1/2
    #        r = 2: b_1 = (0, 1, 0), ⟨e3, b_1⟩ = 0 → s_1 = 0 → α
    #               b_2 = (0, −1, 1), ⟨e3, b_2⟩ = 1, ‖b_2‖² = 2 → s_2 = 1/2
    #               γ_2 = 2 / (1/2 + 1/2) = 2
    t1, t2 = t([[1, 0], [0, 1], [0, 0]]), t([[1, 0], [0, -1], [0, 1]])
    left = svc(t1 + t2, [t1, t2], space="left")
    right = svc(t1 + t2, [t1, t2], space="right")
    assert torch.allclose(left, t([[1, 0], [0, 0], [0, 4 / 3]]), atol=1e-12)
    assert torch.allclose(right, t([[1, 0], [0, 0], [0, 2]]), atol=1e-12)
    # right space is left space on the transposes
    a, b = rand((5, 7), 1), rand((5, 7), 2)
    assert torch.allclose(svc(a + b, [a, b], space="right"), svc((a + b).T, [a.T, b.T]).T,
                          atol=1e-12)


def test_target_reference() -> None:
    # Same W_m as the hand-worked example; only s_target^r is used, η_r = max(s, α) if s > 0.
    # target 0: s = (4/3, −1) → η = (4/3, 1) → σ̃ = (3, 1) → W̃ = 3 e1e1ᵀ − e2e2ᵀ
    # target 1: s = (4, 1/2) → η = (4, 1/2) → σ̃ = (1, 2) → W̃ = e1e1ᵀ − 2 e2e2ᵀ
    # target 1, α = 0.8: η = (4, 0.8) → σ̃ = (1, 1.25)
    t1, t2 = t([[3, 0], [0, 1], [0, 0]]), t([[1, 0], [0, -2], [0, 0]])
    w = t1 + t2
    assert torch.allclose(svc(w, [t1, t2], target=0), t([[3, 0], [0, -1], [0, 0]]), atol=1e-12)
    assert torch.allclose(svc(w, [t1, t2], target=1), t([[1, 0], [0, -2], [0, 0]]), atol=1e-12)
    assert torch.allclose(svc(w, [t1, t2], target=1, alpha=0.8),
                          t([[1, 0], [0, -1.25], [0, 0]]), atol=1e-12)


def test_matches_loop_reference_on_generic_input() -> None:
    taus = [rand((7, 5), seed) for seed in range(3)]
    merged = task_arithmetic(taus, scaling=0.4)
    for alpha in (1 / 3, 0.05, 1.0):
        assert torch.allclose(svc(merged, taus, alpha=alpha),
                              reference_svc(merged, taus, alpha), atol=1e-10)
    # generic input really exercises the clipping: some responses are below α = 1/3
    assert (responses(merged, taus) < 1 / 3).any()


# ------------------------------------------------------------------------------ identities

@pytest.mark.parametrize(("lam", "k"), [(0.3, 4), (1.0, 3), (1 / 16, 4), (0.5, 2)])
def test_identical_experts_give_tau_back(lam: float, k: int) -> None:
    # every τ_i = τ: W_m = λKτ, s_i^r = λK for each i and r, γ_r = 1/(λK) when λK ≥ α = 1/K
    # ((λ, K) = (1/16, 4) is the boundary λK = α).
    tau = rand((6, 4), 3)
    merged = task_arithmetic([tau] * k, scaling=lam)
    assert torch.allclose(svc(merged, [tau] * k), tau, atol=1e-12)


def test_identical_experts_below_alpha_are_amplified_by_one_over_alpha() -> None:
    # λK = 0.2 < α = 0.5: every term is α, γ = 1/α, W̃ = λKτ/α = 0.4 τ
    tau = rand((6, 4), 4)
    merged = task_arithmetic([tau] * 2, scaling=0.1)
    assert torch.allclose(svc(merged, [tau] * 2, alpha=0.5), 0.4 * tau, atol=1e-12)


@pytest.mark.parametrize(("lam", "alpha"), [(0.2, None), (0.5, None), (0.5, 0.1), (2.0, 1.0)])
def test_orthogonal_experts_closed_form(lam: float, alpha: float | None) -> None:
    # 3 experts with mutually orthogonal row and column spaces (rank 2 each, 9×6).
    # Direction of task j: s_j = λ, s_i = 0 (i ≠ j) → γ = K / (max(λ, α) + (K − 1)α).
    k = 3
    q, p = orthogonal(9, 5), orthogonal(6, 6)
    taus = []
    for j in range(k):
        cols = slice(2 * j, 2 * j + 2)
        taus.append((q[:, cols] * torch.tensor([1.0 + j, 3.5 + 2 * j], dtype=F64)) @ p[:, cols].T)
    a = 1 / k if alpha is None else alpha
    gamma = k / (max(lam, a) + (k - 1) * a)
    merged = task_arithmetic(taus, scaling=lam)
    assert torch.allclose(svc(merged, taus, alpha=alpha), gamma * merged, atol=1e-12)


def test_invariant_to_lambda_when_every_response_exceeds_alpha() -> None:
    # Experts sharing singular vectors with positive, task-dependent weights, plus a small
    # generic perturbation; then s_i^r ∝ λ, γ_r ∝ 1/λ and γ_r σ_r does not depend on λ.
    u, v = orthogonal(6, 7)[:, :5], orthogonal(5, 8)
    taus = []
    for i in range(3):
        d = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=F64) * (1 + 0.3 * i) + 0.2 * i
        taus.append((u * d) @ v.T + 1e-3 * rand((6, 5), 20 + i))
    alpha = 0.05
    outs = []
    for lam in (0.3, 1.0, 2.5):
        merged = task_arithmetic(taus, scaling=lam)
        assert responses(merged, taus).min() > alpha  # the precondition
        outs.append(svc(merged, taus, alpha=alpha))
    assert torch.allclose(outs[0], outs[1], atol=1e-10)
    assert torch.allclose(outs[0], outs[2], atol=1e-10)
    # and it is not a trivial identity: λ matters once some response falls below α
    low = svc(task_arithmetic(taus, scaling=0.01), taus, alpha=alpha)
    assert not torch.allclose(low, outs[0], atol=1e-3)


def test_equivariant_under_orthogonal_maps() -> None:
    # SVC(Q W_m R, Q τ_i R) = Q SVC(W_m, τ_i) R for orthogonal Q, R
    taus = [rand((6, 4), 30 + i) for i in range(3)]
    merged = task_arithmetic(taus, scaling=0.3)
    q, r = orthogonal(6, 9), orthogonal(4, 10)
    out = svc(q @ merged @ r, [q @ x @ r for x in taus])
    assert torch.allclose(out, q @ svc(merged, taus) @ r, atol=1e-10)


def test_sign_flip_of_a_singular_pair_changes_nothing() -> None:
    taus = [rand((7, 5), 40 + i) for i in range(3)]
    for merged in (task_arithmetic(taus, scaling=0.3), iso_c(taus)):
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
        ref = svc_from_svd(u, s, vh, taus, alpha=1 / 3)
        sign = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=F64)
        flipped = svc_from_svd(u * sign, s, sign[:, None] * vh, taus, alpha=1 / 3)
        assert torch.allclose(flipped, ref, atol=1e-12)
        for target in (0, 2):
            assert torch.allclose(
                svc_from_svd(u * sign, s, sign[:, None] * vh, taus, alpha=0.2, target=target),
                svc_from_svd(u, s, vh, taus, alpha=0.2, target=target), atol=1e-12)


def test_nan_response_counts_as_alpha() -> None:
    # W_m = τ_1 gives s_1^r = σ_r σ_r / σ_r² = 1. τ_2 holds an inf: every a_2^r has a NaN or inf
    # entry and s_2^r is NaN, which counts as α = 1/2: γ = 2 / (1 + 1/2) = 4/3, W̃ = 4/3 τ_1.
    t1 = rand((5, 4), 50)
    t2 = torch.zeros(5, 4, dtype=F64)
    t2[1, 2] = float("inf")
    u, s, vh = torch.linalg.svd(t1, full_matrices=False)
    out = svc_from_svd(u, s, vh, [t1, t2], alpha=0.5)
    assert torch.allclose(out, 4 / 3 * t1, atol=1e-12)


# ------------------------------------------------------------------------- SVC after Iso

@pytest.mark.parametrize("base", [iso_c, iso_cts])
@pytest.mark.parametrize("shape", [(9, 6), (5, 8)])
def test_svc_after_iso_invariants(base: Callable[..., Tensor], shape: tuple[int, int]) -> None:
    # All σ of W_m are equal, so SVC's singular basis is arbitrary: only invariants are tested.
    k = 3
    taus = [rand(shape, 60 + i) for i in range(k)]
    merged = base(taus)
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    assert torch.allclose(s, s.mean().expand_as(s), atol=1e-10)  # isotropic indeed
    for alpha in (None, 0.5, 1.0):
        out = svc(merged, taus, alpha=alpha)
        # in the span of W_m: column space U and row space V
        assert torch.allclose(u @ (u.T @ out), out, atol=1e-10)
        assert torch.allclose((out @ vh.T) @ vh, out, atol=1e-10)
        # out = U' diag(γ σ̄) V'ᵀ with γ ∈ (0, 1/α]
        a = 1 / k if alpha is None else alpha
        gamma = torch.linalg.svdvals(out) / s.mean()
        assert gamma.min() > 0 and gamma.max() <= 1 / a + 1e-9


def test_svc_after_iso_c_depends_on_the_basis_choice() -> None:
    # The documented caveat: two valid SVDs of the isotropic W_m = σ̄ U Vᵀ (U, V rotated by the
    # same orthogonal Z) give different calibrations, each satisfying the invariants.
    taus = [rand((6, 6), 70 + i) for i in range(3)]
    merged = iso_c(taus)
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    z = orthogonal(6, 11)
    u2, vh2 = u @ z, z.T @ vh
    assert torch.allclose((u2 * s) @ vh2, merged, atol=1e-10)
    out1 = svc_from_svd(u, s, vh, taus, alpha=1 / 3)
    out2 = svc_from_svd(u2, s, vh2, taus, alpha=1 / 3)
    assert not torch.allclose(out1, out2, atol=1e-3)
    for out in (out1, out2):
        gamma = torch.linalg.svdvals(out) / s.mean()
        assert gamma.min() > 0 and gamma.max() <= 3 + 1e-9


# ------------------------------------------------------------------------ dtypes, validation

def test_float64_path() -> None:
    taus = [rand((8, 6), 80 + i) for i in range(3)]
    merged = task_arithmetic(taus, scaling=0.3)
    out = svc(merged, taus)
    assert out.dtype == F64
    assert torch.allclose(out, reference_svc(merged, taus, 1 / 3), atol=1e-12)
    # float32 is not good to 1e-12, so the tolerance above does test the float64 path
    out32 = svc(merged.float(), [x.float() for x in taus])
    assert out32.dtype == torch.float32
    assert torch.allclose(out32.double(), out, atol=1e-4)
    assert not torch.allclose(out32.double(), out, atol=1e-12, rtol=0)
    # one float64 input is enough to compute in float64
    assert svc(merged, [x.float() for x in taus]).dtype == F64


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_half_inputs_are_upcast(low: torch.dtype) -> None:
    taus = [rand((8, 6), 90 + i, low) for i in range(3)]
    merged = task_arithmetic(taus, scaling=0.3)  # stays in low precision
    assert merged.dtype == low
    out = svc(merged, taus)
    assert out.dtype == torch.float32
    ref = reference_svc(merged.double(), [x.double() for x in taus], 1 / 3)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_right_space_and_target_keep_dtype_and_layout() -> None:
    taus = [rand((5, 7), 100 + i, torch.bfloat16) for i in range(2)]
    out = svc(taus[0] + taus[1], taus, space="right", target=1)
    assert out.dtype == torch.float32 and out.shape == (5, 7) and out.is_contiguous()


def test_bad_inputs_are_rejected() -> None:
    a, b = rand((4, 3), 1), rand((4, 3), 2)
    with pytest.raises(ValueError, match="alpha"):
        svc(a, [a, b], alpha=0.0)
    with pytest.raises(ValueError, match="space"):
        svc(a, [a, b], space="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target"):
        svc(a, [a, b], target=2)
    with pytest.raises(ValueError, match="shape"):
        svc(a.T, [a, b])
    with pytest.raises(ValueError, match="at least one"):
        svc(a, [])
    with pytest.raises(ValueError, match="2-D"):
        svc(a[0], [a[0], b[0]])


def test_registry_entry() -> None:
    m = get_method("svc")
    assert m.is_calibration and m.matrix_only and "2602.05536" in m.citation
    assert m.defaults() == {"alpha": None, "space": "left", "target": None}
    assert "Iso-C" in m.notes
    assert m.validate({"alpha": 1, "space": "right", "target": 0}) == {
        "alpha": 1.0, "space": "right", "target": 0}
    for bad in ({"alpha": 0}, {"space": "up"}, {"target": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            m.validate(bad)


def test_svc_logs_gamma_at_debug(caplog) -> None:
    """γ = K / (1 + α) = 4/3 on W_m's 2 directions (α = 1/2); its 2 null directions (γ = 1/α)
    are left out of the log."""
    taus = [torch.zeros(5, 4, dtype=F64), torch.zeros(5, 4, dtype=F64)]
    taus[0][0, 0] = taus[1][1, 1] = 2.0  # two orthogonal rank-1 tasks
    with caplog.at_level(logging.INFO, logger="specmerge.methods.calibration"):
        svc(taus[0] + taus[1], taus)
    assert not caplog.records
    with caplog.at_level(logging.DEBUG, logger="specmerge.methods.calibration"):
        out = svc(taus[0] + taus[1], taus)
    (rec,) = caplog.records
    assert rec.levelno == logging.DEBUG
    assert "γ over the 2 directions of W_m (5 × 4): min 1.333, median 1.333, max 1.333" in \
        rec.getMessage()
    torch.testing.assert_close(out, (taus[0] + taus[1]) * 4 / 3)


def test_a_merge_logs_each_matrix_and_its_gamma_at_debug(toy_models, tmp_path, caplog) -> None:
    from conftest import recipe_for

    import specmerge

    recipe = recipe_for(toy_models, calibrate={"method": "svc"})
    with caplog.at_level(logging.DEBUG, logger="specmerge"):
        specmerge.merge(recipe, tmp_path / "o", progress=False)
    lines = [r.getMessage() for r in caplog.records]
    i = lines.index("model.layers.0.mlp.up_proj.weight: calibrating with svc")
    assert lines[i + 1].startswith("svc: γ over the 8 directions of W_m (12 × 8): min ")
    assert sum(m.startswith("svc: γ over") for m in lines) == 3  # one per matrix
