"""Element-wise methods: hand-computed references and identities."""

from __future__ import annotations

import pytest
import torch

from specmerge.methods.elementwise import (
    dare,
    kth_smallest_abs,
    task_arithmetic,
    ties,
    trim_rank,
    weight_average,
)
from specmerge.methods.registry import get_method
from specmerge.methods.rng import CounterRNG

# A 3×3, 3-task TIES case worked by hand. density 0.4: ⌊9·0.4⌋ = 3, so t_i is the
# (9 − 3) = 6th smallest |τ_i| and the top 4 magnitudes survive.
TAU1 = [[5.0, -1.0, 2.0], [0.5, -3.0, 0.1], [4.0, 0.2, -0.3]]  # t=2: keeps 5, 2, -3, 4
TAU2 = [[-2.0, 3.0, 0.4], [1.0, -5.0, 0.6], [-6.0, 0.7, 0.8]]  # t=2: keeps -2, 3, -5, -6
TAU3 = [[1.0, -4.0, 0.9], [0.3, 2.0, -7.0], [0.25, 5.0, 0.15]]  # t=2: keeps -4, 2, -7, 5
# Σ trimmed = [[3, -1, 2], [0, -6, -7], [-2, 5, 0]]; signs [[+,-,+],[0,-,-],[-,+,0]];
# Σ signs = -1, so the two zeros elect -1.
# Kept (agreeing) entries: (0,0) 5 | (0,1) -4 | (0,2) 2 | (1,0) none | (1,1) -3,-5 |
# (1,2) -7 | (2,0) -6 | (2,1) 5 | (2,2) none.
TIES_MEAN = [[5.0, -4.0, 2.0], [0.0, -4.0, -7.0], [-6.0, 5.0, 0.0]]
TIES_SUM = [[5.0, -4.0, 2.0], [0.0, -8.0, -7.0], [-6.0, 5.0, 0.0]]


def taus3() -> list[torch.Tensor]:
    return [torch.tensor(t) for t in (TAU1, TAU2, TAU3)]


def test_ties_hand_example_mean_and_sum() -> None:
    assert torch.equal(ties(taus3(), density=0.4), torch.tensor(TIES_MEAN))
    assert torch.equal(ties(taus3(), density=0.4, aggregate="sum"), torch.tensor(TIES_SUM))
    assert torch.equal(ties(taus3(), density=0.4, aggregate="sum", scaling=0.5),
                       0.5 * torch.tensor(TIES_SUM))


def test_ties_trim_matches_kthvalue() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for density in (0.01, 0.2, 0.5, 0.9):
        k = trim_rank(x.numel(), density)
        assert kth_smallest_abs(x, k) == x.abs().kthvalue(k).values
        kept = (x.abs() >= kth_smallest_abs(x, k)).sum()
        assert kept == int(1000 * density) + 1  # distinct magnitudes: ⌊d·density⌋ + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_selection_is_exact_with_ties_zeros_and_chunks(dtype, monkeypatch) -> None:
    import specmerge.methods.elementwise as ew

    monkeypatch.setattr(ew, "CHUNK", 7)  # many chunks, ragged last one
    g = torch.Generator().manual_seed(3)
    x = torch.randn(257, generator=g, dtype=dtype)
    x[:40] = 0.0
    x[40:60] = -0.0
    x[60:90] = 1.25  # repeated magnitudes
    x[90:100] = -1.25
    x[100] = 1e-30  # subnormal-adjacent tiny values
    for k in (1, 39, 40, 60, 61, 90, 101, 200, 257):
        assert kth_smallest_abs(x, k) == x.abs().kthvalue(k).values.item(), k
    with pytest.raises(ValueError):
        kth_smallest_abs(x, 0)


def test_ties_density_one_sum_equals_task_arithmetic_when_signs_agree() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.rand(5, 7, generator=g) + 0.1
    taus = [base * (torch.rand(5, 7, generator=g) + 0.5) for _ in range(3)]  # all > 0
    got = ties(taus, density=1.0, aggregate="sum", scaling=0.3)
    torch.testing.assert_close(got, task_arithmetic(taus, scaling=0.3), rtol=1e-6, atol=0)
    neg = [-t for t in taus]
    torch.testing.assert_close(ties(neg, density=1.0, aggregate="sum"), sum(neg))


def test_ties_global_requires_thresholds() -> None:
    with pytest.raises(ValueError, match="global"):
        ties(taus3(), trim_scope="global")
    # explicit thresholds are used as given
    out = ties(taus3(), thresholds=[2.0, 2.0, 2.0])
    assert torch.equal(out, torch.tensor(TIES_MEAN))


def test_weight_average_equals_task_arithmetic_with_one_over_k() -> None:
    taus = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    torch.testing.assert_close(weight_average(taus), task_arithmetic(taus, scaling=1 / 5))
    # weighted mean by hand
    w = [1.0, 2.0, 0.0, 0.0, 1.0]
    torch.testing.assert_close(weight_average(taus, weights=w),
                               (taus[0] + 2 * taus[1] + taus[4]) / 4)


def test_task_arithmetic_hand_values() -> None:
    taus = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])]
    assert torch.equal(task_arithmetic(taus), torch.tensor([0.3 * 4.0, 0.3 * 2.0]))
    assert torch.equal(task_arithmetic(taus, weights=[2.0, 1.0], scaling=1.0),
                       torch.tensor([5.0, 0.0]))


def test_dare_drop_zero_equals_task_arithmetic() -> None:
    taus = [torch.randn(6, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    torch.testing.assert_close(dare(taus, drop_rate=0.0, scaling=0.3),
                               task_arithmetic(taus, scaling=0.3))


def test_dare_entries_are_dropped_or_rescaled() -> None:
    tau = torch.full((200, 200), 2.0)
    gens = [CounterRNG(7)]
    out = dare([tau], generators=gens, drop_rate=0.75, scaling=1.0)
    values = set(out.unique().tolist())
    assert values == {0.0, 8.0}  # kept entries are 2 / (1 − 0.75)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.25) < 0.01  # 40k Bernoulli(0.25) draws: sd ≈ 0.002


def test_dare_is_deterministic_per_generator_seed() -> None:
    taus = [torch.randn(30, 30, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def run(seed: int) -> torch.Tensor:
        return dare(taus, generators=[CounterRNG(seed + i) for i in range(2)])

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_registry_defaults_and_validation() -> None:
    assert get_method("task_arithmetic").defaults() == {"scaling": 0.3}
    assert get_method("ties").defaults() == {"density": 0.2, "aggregate": "mean",
                                             "scaling": 1.0, "trim_scope": "tensor",
                                             "trim_count": "official"}
    assert get_method("dare").defaults() == {"drop_rate": 0.5, "scaling": 0.3}
    with pytest.raises(ValueError, match=r"allowed: \['drop_rate', 'scaling'\]"):
        get_method("dare").validate({"p": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        get_method("dare").validate({"drop_rate": 1.0})
    with pytest.raises(ValueError, match="one of"):
        get_method("ties").validate({"aggregate": "median"})
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")


def _ties_official(taus: list[torch.Tensor], density: float, aggregate: str) -> torch.Tensor:
    """Direct transcription of the official TIES rules on a stacked (K, d) matrix."""
    m = torch.stack([t.reshape(-1) for t in taus])
    k = m.shape[1] - int(m.shape[1] * density)
    kth = m.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = m * (m.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    out = sel.sum(0)
    if aggregate == "mean":
        out = out / (sel != 0).sum(0).float().clamp(min=1)
    return out.reshape(taus[0].shape)


@pytest.mark.parametrize("chunk", [13, 1 << 22])
@pytest.mark.parametrize("seed", range(6))
def test_ties_matches_official_transcription(seed: int, chunk: int, monkeypatch) -> None:
    import specmerge.methods.elementwise as ew

    monkeypatch.setattr(ew, "CHUNK", chunk)
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randn(9, 11, generator=g, dtype=torch.float64) for _ in range(4)]
    taus[0][:2] = 0.0  # exact zeros and cancelling sums exercise the tie rules
    taus[1][3] = -taus[2][3]
    for density in (0.1, 0.2, 0.5):
        for agg in ("mean", "sum"):
            assert torch.equal(ties(taus, density=density, aggregate=agg),
                               _ties_official(taus, density, agg)), (density, agg)
