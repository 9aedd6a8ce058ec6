"""Subspace methods (TSV-M, Iso-C, Iso-CTS, STAR): reference values, identities, edge cases."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from specmerge.methods import get_method
from specmerge.methods.subspace import (
    iso_c,
    iso_cts,
    iso_cts_split,
    star,
    star_rank,
    tsv_from_triplets,
    tsv_m,
    tsv_rank,
)

ATOL = 1e-5


def rand_taus(k: int, shape: tuple[int, ...], seed: int = 0,
              dtype: torch.dtype = torch.float32) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(k)]


def orthogonal(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def orthogonal_experts(k: int, m: int, n: int, rank: int) -> list[Tensor]:
    """K experts with mutually orthogonal column and row spaces, each of the given rank."""
    q, p = orthogonal(m, 1), orthogonal(n, 2)
    out = []
    for j in range(k):
        cols = slice(j * rank, (j + 1) * rank)
        d = torch.arange(1, rank + 1, dtype=torch.float64) * (j + 1.5)
        out.append((q[:, cols] * d) @ p[:, cols].T)
    return out


def mean(taus: list[Tensor]) -> Tensor:
    return torch.stack(taus).mean(0)


# --------------------------------------------------------------------------------------- TSV-M

@pytest.mark.parametrize("shape", [(6, 6), (7, 4), (3, 8)])
def test_tsv_m_single_task_returns_it(shape: tuple[int, int]) -> None:
    (tau,) = rand_taus(1, shape)
    assert torch.allclose(tsv_m([tau]), tau, atol=ATOL)


def test_tsv_m_orthogonal_experts_is_their_sum() -> None:
    # 9×6, K = 3: k = ⌊6/3⌋ = 2 keeps each rank-2 expert whole; the concatenated bases are
    # already orthonormal, so the polar factors change nothing and τ = Σ τ_i.
    taus = orthogonal_experts(3, 9, 6, rank=2)
    assert torch.allclose(tsv_m(taus), sum(taus), atol=1e-10)
    assert torch.allclose(tsv_m(taus, scaling=0.5), 0.5 * sum(taus), atol=1e-10)


def official_tsv_m(taus: list[Tensor]) -> Tensor:
    """Transcription of the official TSV-M code (zero-padded sum_u/sum_s/sum_v)."""
    sv_reduction = 1 / len(taus)
    for i, vec in enumerate(taus):
        u, s, v = torch.linalg.svd(vec, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        k = int(s.shape[0] * sv_reduction)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k, :] = v[:k, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


@pytest.mark.parametrize(("k", "shape"), [(3, (9, 6)), (2, (7, 5)), (4, (5, 11))])
def test_tsv_m_matches_official_code(k: int, shape: tuple[int, int]) -> None:
    taus = rand_taus(k, shape, seed=3, dtype=torch.float64)
    assert torch.allclose(tsv_m(taus), official_tsv_m(taus), atol=1e-10)


def test_tsv_m_sign_flip_of_a_singular_pair_changes_nothing() -> None:
    taus = rand_taus(3, (8, 7), seed=4, dtype=torch.float64)
    k = tsv_rank(7, 3)
    triplets = []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        triplets.append((u[:, :k], s[:k], vh[:k]))
    ref = tsv_from_triplets(triplets)
    assert torch.allclose(ref, tsv_m(taus), atol=1e-10)
    flipped = []
    for i, (u, s, vh) in enumerate(triplets):
        sign = torch.ones(k, dtype=u.dtype)
        sign[i % k] = -1.0  # flip one pair (u_j, v_j) per task, a different j each time
        flipped.append((u * sign, s, sign[:, None] * vh))
    assert not torch.allclose(flipped[0][0], triplets[0][0])
    assert torch.allclose(tsv_from_triplets(flipped), ref, atol=1e-10)


def test_tsv_m_more_tasks_than_rank_keeps_one_triplet_each() -> None:
    # r = 2 < K = 3: k is raised from ⌊2/3⌋ = 0 to 1 instead of returning an all-zero update
    assert tsv_rank(2, 3) == 1
    taus = rand_taus(3, (2, 5), seed=5)
    out = tsv_m(taus)
    assert out.shape == (2, 5) and torch.isfinite(out).all() and out.norm() > 0


# ---------------------------------------------------------------------------------------- Iso-C

@pytest.mark.parametrize("shape", [(6, 6), (8, 5), (4, 7)])
def test_iso_c_flat_spectrum_on_singular_vectors_of_sum(shape: tuple[int, int]) -> None:
    taus = rand_taus(3, shape, seed=6, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    out = iso_c(taus)
    # Uᵀ out V = σ̄ I: singular values all equal to mean(σ), singular vectors those of Σ τ_i
    assert torch.allclose(u.T @ out @ vh.T, s.mean() * torch.eye(len(s), dtype=s.dtype),
                          atol=1e-10)
    assert torch.allclose(torch.linalg.svdvals(out), s.mean().expand(len(s)), atol=1e-10)
    assert torch.allclose(iso_c(taus, scaling=1.5), 1.5 * out, atol=1e-10)


# -------------------------------------------------------------------------------------- Iso-CTS

@pytest.mark.parametrize(
    ("r", "k", "fraction", "expected"),
    [
        (768, 4, 0.8, (616, 38)),  # c = 614, (768 − 614)/4 = 38.5 → 38 (half to even)
        (768, 8, 0.8, (616, 19)),  # c = 614, 154/8 = 19.25 → 19, t = 152
        (768, 3, 0.8, (615, 51)),  # c = 614, 154/3 = 51.33 → 51, t = 153
        (12, 3, 0.8, (9, 1)),      # c = 9, 3/3 = 1
        (10, 4, 0.5, (6, 1)),      # c = 5, 5/4 = 1.25 → 1
        (3, 8, 0.8, (3, 0)),       # small rank: c = 2, 1/8 → 0, no task-specific part
        (6, 4, 0.0, (2, 1)),       # c = 0, 6/4 = 1.5 → 2, t = 8 > 6: s clamped to ⌊6/4⌋ = 1
        (9, 1, 0.8, (7, 2)),       # K = 1: c = 7, s = 2
        (9, 3, 1.0, (9, 0)),       # fraction 1: everything common
    ],
)
def test_iso_cts_rank_split(r: int, k: int, fraction: float, expected: tuple[int, int]) -> None:
    assert iso_cts_split(r, k, fraction) == expected


@pytest.mark.parametrize("shape", [(6, 6), (8, 5), (4, 7)])
def test_iso_cts_with_full_common_fraction_is_iso_c(shape: tuple[int, int]) -> None:
    taus = rand_taus(3, shape, seed=7)
    assert torch.allclose(iso_cts(taus, common_fraction=1.0), iso_c(taus), atol=ATOL)


def test_iso_cts_single_task_and_small_rank_are_iso_c() -> None:
    (tau,) = rand_taus(1, (9, 9), seed=8)  # K = 1: common + residual triplets = SVD of τ
    assert torch.allclose(iso_cts([tau]), iso_c([tau]), atol=ATOL)
    taus = rand_taus(8, (3, 5), seed=9)  # r = 3, K = 8: s = 0
    assert torch.allclose(iso_cts(taus), iso_c(taus), atol=ATOL)


def official_iso_cts(taus: list[Tensor], fraction: float) -> Tensor:
    """Transcription of the official Iso-CTS code (square matrices, where shape[0] = r)."""
    n = taus[0].shape[0]
    k = len(taus)
    combined_w = sum(taus)
    common = int(n * fraction)
    common = n - round((n - common) / k) * k
    u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    per = int((n - common) / k)
    for i, w in enumerate(taus):
        u_ts, s_ts, v_ts = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        if i == 0:
            all_u, all_s, all_v = (torch.zeros_like(u_ts), torch.zeros_like(s_ts),
                                   torch.zeros_like(v_ts))
        all_u[:, i * per:(i + 1) * per] = u_ts[:, :per]
        all_s[i * per:(i + 1) * per] = s_ts[:per]
        all_v[i * per:(i + 1) * per, :] = v_ts[:per, :]
    all_u[:, k * per:k * per + common] = cu
    all_s[k * per:k * per + common] = cs
    all_v[k * per:k * per + common, :] = cv
    a, _, b = torch.linalg.svd(all_u, full_matrices=False)
    c, _, d = torch.linalg.svd(all_v, full_matrices=False)
    flat = torch.ones_like(all_s) * all_s.mean()
    return torch.linalg.multi_dot((a @ b, torch.diag(flat), c @ d))


@pytest.mark.parametrize(("k", "n", "fraction"), [(3, 12, 0.8), (4, 10, 0.5), (2, 9, 0.6)])
def test_iso_cts_matches_official_code(k: int, n: int, fraction: float) -> None:
    taus = rand_taus(k, (n, n), seed=10, dtype=torch.float64)
    assert iso_cts_split(n, k, fraction)[1] > 0  # a real task-specific part is exercised
    out = iso_cts(taus, common_fraction=fraction)
    assert torch.allclose(out, official_iso_cts(taus, fraction), atol=1e-10)
    # flat spectrum
    sv = torch.linalg.svdvals(out)
    assert torch.allclose(sv, sv.mean().expand(n), atol=1e-10)
    assert torch.allclose(iso_cts(taus, common_fraction=fraction, scaling=2.0), 2 * out,
                          atol=1e-10)


# ----------------------------------------------------------------------------------------- STAR

@pytest.mark.parametrize("shape", [(6, 6), (8, 5), (4, 3, 2)])
def test_star_eta_100_is_the_mean(shape: tuple[int, ...]) -> None:
    taus = rand_taus(3, shape, seed=11)
    out = star(taus, eta=100.0)
    assert out.shape == shape
    assert torch.allclose(out, mean(taus), atol=ATOL)


def test_star_hand_worked() -> None:
    # τ_1 = diag(3, 2, 1): Σσ = 6, cumsum/Σσ = (0.5, 0.833, 1).
    #   eta 40 → ρ = 1, kept σ = 3 · 6/3 = 6        → diag(6, 0, 0)
    #   eta 60 → ρ = 2, kept σ = (3, 2) · 6/5        → diag(3.6, 2.4, 0)
    # τ_2 = diag(0, 0, −4) (rank 1, σ = 4): any eta keeps it whole → diag(0, 0, −4)
    t1 = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    t2 = torch.diag(torch.tensor([0.0, 0.0, -4.0]))
    assert torch.allclose(star([t1, t2], eta=40), torch.diag(torch.tensor([3.0, 0.0, -2.0])),
                          atol=ATOL)
    assert torch.allclose(star([t1, t2], eta=60), torch.diag(torch.tensor([1.8, 1.2, -2.0])),
                          atol=ATOL)
    assert torch.allclose(star([t1]), torch.diag(torch.tensor([6.0, 0.0, 0.0])), atol=ATOL)


def test_star_rank_boundaries_and_nuclear_norm() -> None:
    s = torch.tensor([3.0, 2.0, 1.0])
    assert [star_rank(s, e) for e in (10, 50, 50.1, 83.4, 100)] == [1, 1, 2, 3, 3]
    (tau,) = rand_taus(1, (7, 5), seed=12, dtype=torch.float64)
    out = star([tau], eta=40)
    nuc = torch.linalg.matrix_norm
    assert torch.allclose(nuc(out, "nuc"), nuc(tau, "nuc"), atol=1e-10)
    assert int(torch.linalg.matrix_rank(out)) < 5
    zero = torch.zeros(4, 4)
    assert torch.equal(star([zero, zero]), zero)  # zero τ_i contributes zero, no NaN


# --------------------------------------------------------------------------- dtypes, validation

METHODS = [tsv_m, iso_c, iso_cts, star]


@pytest.mark.parametrize("fn", METHODS)
def test_float64_stays_float64(fn: Callable[..., Tensor]) -> None:
    taus = rand_taus(3, (9, 7), seed=13, dtype=torch.float64)
    out = fn(taus)
    assert out.dtype == torch.float64
    # same result as the float32 path, to float32 precision
    out32 = fn([t.float() for t in taus])
    assert torch.allclose(out, out32.double(), atol=1e-4)


@pytest.mark.parametrize("fn", METHODS)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_half_inputs_are_upcast(fn: Callable[..., Tensor], low: torch.dtype) -> None:
    taus = rand_taus(3, (9, 7), seed=14, dtype=low)
    out = fn(taus)
    assert out.dtype == torch.float32
    assert torch.allclose(out, fn([t.float() for t in taus]), atol=1e-6)


@pytest.mark.parametrize("fn", [tsv_m, iso_c, iso_cts])
def test_bad_inputs_are_rejected(fn: Callable[..., Tensor]) -> None:
    with pytest.raises(ValueError, match="2-D"):
        fn(rand_taus(2, (4,)))
    with pytest.raises(ValueError, match="shape"):
        fn([torch.zeros(3, 4), torch.zeros(4, 3)])
    with pytest.raises(ValueError, match="at least one"):
        fn([])


def test_registry_entries() -> None:
    for name, family in [("tsv_m", "subspace"), ("iso_c", "subspace"),
                         ("iso_cts", "subspace"), ("star", "subspace")]:
        m = get_method(name)
        assert m.family == family and m.matrix_only and "arXiv" in m.citation
    assert get_method("iso_cts").defaults() == {"common_fraction": 0.8, "scaling": 1.0}
    assert get_method("star").defaults() == {"eta": 40.0, "scaling": 1.0}
    with pytest.raises(ValueError, match="eta"):
        get_method("star").validate({"eta": 0})
    with pytest.raises(ValueError, match="common_fraction"):
        get_method("iso_cts").validate({"common_fraction": 1.5})


@pytest.mark.parametrize("fn", [tsv_m, iso_c, iso_cts])
@pytest.mark.parametrize("shape", [(12, 10), (10, 12)])
def test_exactly_low_rank_inputs_give_a_well_defined_merge(fn, shape) -> None:
    """LoRA-like τ_i = B_i A_i of rank 2: the official rules would also take (TSV-M) or flatten
    (Iso-C, Iso-CTS) null-space directions, which rounding moves freely. Below the numerical
    rank they are dropped, so float32 and float64 agree and the update stays in the τ_i's span."""
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(shape[0], 2, generator=g, dtype=torch.float64)
            @ torch.randn(2, shape[1], generator=g, dtype=torch.float64) for _ in range(2)]
    out64 = fn(taus)
    out32 = fn([t.float() for t in taus])
    assert float((out32.double() - out64).norm() / out64.norm()) < 1e-4
    rows = torch.linalg.qr(torch.cat([t.mT for t in taus], dim=1)).Q  # span of the rows
    assert float((out64 - out64 @ rows @ rows.mT).norm()) < 1e-8 * float(out64.norm())


def test_star_scaling_multiplies_the_mean() -> None:
    gen = torch.Generator().manual_seed(41)
    taus = [torch.randn(10, 7, generator=gen, dtype=torch.float64) for _ in range(3)]
    assert torch.equal(star(taus, scaling=1.0), star(taus))
    torch.testing.assert_close(star(taus, scaling=0.4), 0.4 * star(taus), rtol=1e-15, atol=0)


def test_a_tsv_rank_that_cannot_bind_is_said() -> None:
    from specmerge.methods.registry import UnboundRankWarning

    gen = torch.Generator().manual_seed(5)
    taus = [torch.randn(20, 2, generator=gen, dtype=torch.float64)
            @ torch.randn(2, 16, generator=gen, dtype=torch.float64) for _ in range(2)]
    with pytest.warns(UnboundRankWarning, match="k = ⌊r/K⌋ = 8 singular triplets, but task 1's "
                                                "update has rank 2"):
        tsv_m(taus)
