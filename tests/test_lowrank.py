"""Factored task vectors (LoRA): every method ± SVC gives the same merged update on factored τ
as on the densified τ, and the factored methods really stay factored."""

from __future__ import annotations

import pytest
import torch
from conftest import accepts_experts

from specmerge.engine import merged_update
from specmerge.lowrank import LowRank, dense, embed, factored_svd, truncate
from specmerge.methods.calibration import canonical_basis, clusters, svc
from specmerge.methods.interference import swudi_a
from specmerge.methods.registry import all_methods, get_method
from specmerge.methods.subspace import iso_c
from specmerge.plan import PlanEntry

# methods of task vectors alone that take 3 to 7 experts (slerp and nearswap read the base and
# take one expert; passthrough copies: their tests are in test_mergekit_methods, test_slices)
METHODS = [m.name for m in all_methods() if not m.is_calibration and not m.uses_base
           and all(accepts_experts(m.name, k) for k in (3, 5))]
FACTORED = {m.name for m in all_methods() if m.factored}
# (m, n, r, K): m < n and m > n, with r·K below and above min(m, n)
SHAPES = [(24, 40, 3, 3), (40, 24, 3, 3), (24, 40, 7, 5), (40, 24, 7, 5)]
TOL = {torch.float64: 1e-5, torch.float32: 1e-4}
PARAMS = {"wudi": {"iterations": 5}, "swudi": {"exp_time": 20.0}}


def adapters(m: int, n: int, r: int, k: int, dtype: torch.dtype, seed: int = 0) -> list[LowRank]:
    g = torch.Generator().manual_seed(seed)
    return [LowRank(torch.randn(m, r, generator=g, dtype=dtype),
                    torch.randn(r, n, generator=g, dtype=dtype) / n**0.5, 0.5 + i)
            for i in range(k)]


def entry(method: str, k: int, shape: tuple[int, int]) -> PlanEntry:
    kwargs = dict(get_method(method).defaults(), **PARAMS.get(method, {}))
    if get_method(method).uses_weights:
        kwargs["weights"] = [1.0] * k
    if get_method(method).uses_densities:
        kwargs["densities"] = [1.0] * k
    seeds = tuple(range(k)) if get_method(method).uses_rng else ()
    return PlanEntry("w", shape, torch.float32, "method", True, True, method, kwargs, seeds)


def rel(a, b) -> float:
    a, b = dense(a).double(), dense(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", METHODS)
def test_factored_equals_dense(method: str, shape, dtype) -> None:
    m, n, r, k = shape
    taus = adapters(m, n, r, k, dtype)
    e = entry(method, k, (m, n))
    for calibration in (None, ("svc", {})):
        got = merged_update(e, taus, calibration, {})
        want = merged_update(e, [t.dense() for t in taus], calibration, {})
        assert isinstance(want, torch.Tensor)
        assert isinstance(got, LowRank) == (method in FACTORED), (method, type(got))
        if method in FACTORED:
            assert got.rank <= min(m, n) + r * k
        assert rel(got, want) < TOL[dtype], (method, calibration, rel(got, want))


def test_factored_methods_are_the_spectral_ones() -> None:
    assert FACTORED == {"weight_average", "task_arithmetic", "tsv_m", "iso_c", "iso_cts", "star",
                        "wudi_closed_form", "swudi", "swudi_a", "svc"}


def test_embed_cores_reconstruct_each_task_vector() -> None:
    taus = adapters(30, 20, 4, 3, torch.float64)
    space, cores = embed(taus, "test")
    assert space.factored and space.shape == (30, 20)
    assert cores[0].shape == (12, 12)
    for t, c in zip(taus, cores, strict=True):
        assert torch.allclose(dense(space.lift(c)), t.dense(), atol=1e-12)


def test_rank_rule_sees_the_null_eigenvalues_of_the_full_gram() -> None:
    # participation_sqrt counts √λ of all n eigenvalues, the n − q floored ones included: without
    # them the factored rank would differ from the dense one (here n = 400, q = 6)
    taus = adapters(50, 400, 2, 3, torch.float64, seed=3)
    got, want = swudi_a(taus), swudi_a([t.dense() for t in taus])
    assert rel(got, want) < 1e-8


def test_svc_after_iso_c_is_a_function_of_its_inputs() -> None:
    taus = [t.dense() for t in adapters(20, 30, 20, 3, torch.float64, seed=5)]
    merged = iso_c(taus)
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    assert clusters(s, (20, 30)) == [(0, 20)]  # Iso-C's spectrum is flat
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    a = canonical_basis(u, s, vh, taus)
    b = canonical_basis(u @ q, s, q.mT @ vh, taus)  # another SVD of the same matrix

    def pairs(u: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:  # u_j v_jᵀ: sign-free
        return torch.einsum("mj,jn->jmn", u, vh)

    assert torch.allclose(pairs(a[0], a[2]), pairs(b[0], b[2]), atol=1e-10)
    assert torch.allclose(a[1], b[1], atol=1e-12)
    # the canonical basis is Iso-C's own: the singular vectors of Σ τ_i
    u_sum = torch.linalg.svd(sum(taus), full_matrices=False)[0]
    assert torch.allclose((a[0].mT @ u_sum).abs(), torch.eye(20, dtype=torch.float64),
                          atol=1e-8)
    assert rel(svc(merged, taus), svc(merged.clone(), taus)) == 0.0


@pytest.mark.parametrize("base", ["iso_c", "iso_cts"])
def test_svc_canonical_basis_keeps_the_merged_update(base: str) -> None:
    """With α huge every γ_r = 1/α: SVC must return W_m / α, whatever basis it picked inside
    the flat spectrum (a rotation of only one side would change W_m)."""
    taus = [t.dense() for t in adapters(20, 30, 20, 3, torch.float64, seed=7)]
    merged = get_method(base).fn(taus)
    out = svc(merged, taus, alpha=1e6) * 1e6
    assert rel(out, merged) < 1e-12
    factored = adapters(20, 30, 20, 3, torch.float64, seed=7)
    assert rel(svc(get_method(base).fn(factored), factored, alpha=1e6), merged / 1e6) < 1e-10


def test_distinct_singular_values_form_no_cluster() -> None:
    s = torch.tensor([3.0, 2.0, 2.0 * (1 - 1e-6), 1.0], dtype=torch.float64)
    assert clusters(s, (4, 4)) == []
    s32 = torch.tensor([3.0, 2.0, 2.0 - 1e-6, 1.0])  # equal to float32 rounding
    assert clusters(s32, (4, 4)) == [(1, 3)]


def test_factored_svd_and_truncation() -> None:
    t = adapters(60, 50, 5, 1, torch.float64)[0]
    u, s, vh = factored_svd(t)
    assert s.shape == (5,)
    assert torch.allclose((u * s) @ vh, t.dense(), atol=1e-12)
    exact = torch.linalg.svdvals(t.dense())
    assert torch.allclose(s, exact[:5], rtol=1e-10)
    b, a, err = truncate(t, 3)
    assert b.shape == (60, 3) and a.shape == (3, 50)
    best = float((exact[3:].square().sum() / exact.square().sum()).sqrt())
    assert err == pytest.approx(best, rel=1e-9)
    assert rel(b @ a, t.dense()) == pytest.approx(best, rel=1e-6)
    b, a, err = truncate(t, 16)  # more than its rank: exact, at its rank
    assert b.shape == (60, 5) and err < 1e-12


def test_zero_rank_and_mixed_inputs() -> None:
    zero = LowRank(torch.zeros(8, 0), torch.zeros(0, 6))
    assert torch.equal(zero.dense(), torch.zeros(8, 6))
    taus = [*adapters(8, 6, 2, 2, torch.float32), zero]
    for name in sorted(FACTORED - {"svc"}):
        fn = get_method(name).fn
        got = fn(taus)
        want = fn([t.dense() for t in taus])
        assert rel(got, want) < 1e-4, name
    mixed = [taus[0], taus[1].dense()]  # a full expert beside an adapter: densified
    assert isinstance(get_method("tsv_m").fn(mixed), torch.Tensor)
    with pytest.raises(ValueError, match="do not multiply"):
        LowRank(torch.zeros(3, 2), torch.zeros(3, 4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wide_svd_is_taken_on_the_transpose(dtype, monkeypatch) -> None:
    """thin_svd decomposes a wide matrix as its transpose (LAPACK is slower on the wide layout)
    and returns the same thin SVD: reconstruction, singular values, orthonormal factors."""
    from specmerge import linalg

    a = torch.randn(30, 70, dtype=dtype)
    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda x, **kw: calls.append(tuple(x.shape))
                        or real(x, **kw))
    u, s, vh = linalg.thin_svd(a)
    assert calls == [(70, 30)]  # never the wide layout
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert u.shape == (30, 30) and vh.shape == (30, 70)
    assert torch.allclose((u * s) @ vh, a, atol=tol * 10)
    assert torch.allclose(s, real(a, full_matrices=False)[1], atol=tol * 10)
    assert torch.allclose(u.mT @ u, torch.eye(30, dtype=dtype), atol=tol)
    assert torch.allclose(vh @ vh.mT, torch.eye(30, dtype=dtype), atol=tol)
