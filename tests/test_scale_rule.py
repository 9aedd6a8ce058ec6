"""``scaling: auto`` (specmerge.methods.scale_rule): the rule's reference values in closed form,
its identities (the official 1/N on orthogonal sums, 1 on an average, invariance to a common
scale, never above 1), each WUDI-family method applying exactly the rule's scale to its own
result, the factored path equal to the dense one, and recipes that accept "auto" only where it
means something."""

from __future__ import annotations

import pytest
import torch
from conftest import make_state_dicts, recipe_for

import specmerge
from specmerge.lowrank import LowRank, dense
from specmerge.methods.registry import get_method
from specmerge.methods.scale_rule import auto_scale
from specmerge.recipe import Recipe

WUDI_FAMILY = ("wudi", "wudi_closed_form", "swudi", "swudi_a")


def _orthogonal_tasks(k: int, m: int = 20, n: int = 18, r: int = 2) -> list[torch.Tensor]:
    """k rank-r task vectors of equal norm on disjoint rows and columns (as LoRA experts on
    disjoint input spaces)."""
    out = []
    g = torch.Generator().manual_seed(0)
    for i in range(k):
        t = torch.zeros(m, n, dtype=torch.float64)
        block = torch.randn(r, r, generator=g, dtype=torch.float64)
        t[i * r:(i + 1) * r, i * r:(i + 1) * r] = block / block.norm()
        out.append(t)
    return out


def test_reference_value_in_closed_form() -> None:
    # τ_1 = [1, 0], τ_2 = [0, 2], τ = [1, 1]: w = (1, 1/4), Σ w⟨τ, τ_i⟩ = 1 + 2/4 = 1.5,
    # ‖τ‖² Σ w = 2 · 1.25 = 2.5, so s* = 0.6
    t1, t2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert auto_scale(torch.tensor([[1.0, 1.0]]), [t1, t2]) == pytest.approx(0.6, rel=1e-12)


@pytest.mark.parametrize("k", [2, 5, 8])
def test_the_sum_of_orthogonal_equal_tasks_gets_one_over_k(k: int) -> None:
    taus = _orthogonal_tasks(k)
    assert auto_scale(sum(taus), taus) == pytest.approx(1.0 / k, rel=1e-12)


def test_an_average_of_equal_tasks_is_kept_and_nothing_is_amplified() -> None:
    t = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    assert auto_scale(t, [t, t, t]) == pytest.approx(1.0, rel=1e-12)
    assert auto_scale(0.5 * t, [t, t]) == 1.0  # s* = 2, clipped: the rule never amplifies
    assert auto_scale(-t, [t, t]) == 0.0  # pointing away from every task: nothing kept
    assert auto_scale(torch.zeros(6, 5), [t]) == 1.0  # nothing to scale
    assert auto_scale(t, [torch.zeros(6, 5)]) == 1.0  # no task to measure against


def test_invariant_to_a_common_scale_of_the_task_vectors() -> None:
    g = torch.Generator().manual_seed(2)
    taus = [torch.randn(7, 4, generator=g) for _ in range(3)]
    merged = sum(taus) + 0.3 * torch.randn(7, 4, generator=g)
    s = auto_scale(merged, taus)
    assert 0.0 < s < 1.0
    assert auto_scale(1e3 * merged, [1e3 * t for t in taus]) == pytest.approx(s, rel=1e-6)  # float32 inputs


def _rank_one_tasks(k: int = 3, m: int = 9, n: int = 7, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, 1, generator=g) @ torch.randn(1, n, generator=g) for _ in range(k)]


@pytest.mark.parametrize("method", WUDI_FAMILY)
def test_each_method_multiplies_its_own_result_by_the_rule(method: str) -> None:
    # rank-1 tasks: C has rank 3 < n = 7, the low-rank regime the rule is for
    fn = get_method(method).fn
    taus = _rank_one_tasks()
    plain = dense(fn(taus))
    s = auto_scale(plain, taus)
    assert 0.0 < s < 1.0
    torch.testing.assert_close(dense(fn(taus, scaling="auto")), s * plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", WUDI_FAMILY)
def test_full_rank_c_keeps_scale_one(method: str) -> None:
    # dense tasks: C has full rank n, where the official full fine-tune setting is scaling 1
    fn = get_method(method).fn
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(9, 7, generator=g) for _ in range(3)]
    assert auto_scale(dense(fn(taus)), taus) < 1.0  # the rule alone would shrink it
    torch.testing.assert_close(dense(fn(taus, scaling="auto")), dense(fn(taus)))


def test_closed_form_on_orthogonal_lora_tasks_gives_their_average() -> None:
    # disjoint input spaces: D C⁺ = Σ τ_i exactly (every task delivered at full strength, the
    # failure of text8's LoRA row); the rule brings it down to the official 1/N, the average
    taus = [t.float() for t in _orthogonal_tasks(4)]
    got = get_method("wudi_closed_form").fn(taus, scaling="auto")
    torch.testing.assert_close(got, sum(taus) / 4, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ("wudi_closed_form", "swudi", "swudi_a"))
def test_factored_auto_equals_dense_auto(method: str) -> None:
    g = torch.Generator().manual_seed(4)
    lora = [LowRank(torch.randn(16, 2, generator=g), torch.randn(2, 12, generator=g))
            for _ in range(3)]
    fn = get_method(method).fn
    factored = fn(lora, scaling="auto")
    assert isinstance(factored, LowRank)
    torch.testing.assert_close(dense(factored), fn([dense(t) for t in lora], scaling="auto"),
                               rtol=1e-4, atol=1e-5)


def _recipe(method: str, **params) -> dict:
    return {"base_model": "/nonexistent/base", "models": ["/nonexistent/a", "/nonexistent/b"],
            "merge_method": method, "parameters": params}


@pytest.mark.parametrize("method", WUDI_FAMILY)
def test_recipes_accept_auto_for_the_wudi_family(method: str) -> None:
    Recipe.model_validate(_recipe(method, scaling="auto"))


@pytest.mark.parametrize(("method", "value"), [("swudi", "Auto"), ("swudi", "0.5x"),
                                               ("task_arithmetic", "auto"), ("swudi", True)])
def test_other_values_are_refused_by_name(method: str, value) -> None:
    with pytest.raises(ValueError, match="scaling"):
        Recipe.model_validate(_recipe(method, scaling=value))


def test_a_merge_with_auto_runs_end_to_end_and_is_below_the_plain_merge() -> None:
    base, experts = make_state_dicts(k=3, seed=5)
    name = "model.layers.0.self_attn.q_proj.weight"
    for i, e in enumerate(experts):  # rank-1 updates of q_proj: the low-rank regime
        g = torch.Generator().manual_seed(10 + i)
        e[name] = base[name] + torch.randn(8, 1, generator=g) @ torch.randn(1, 8, generator=g)
    models = {"base": "/nonexistent/base", "experts": ["/nonexistent/e0", "/nonexistent/e1",
                                                       "/nonexistent/e2"]}
    plain = specmerge.merge_state_dicts(recipe_for(models, "swudi"), base, experts)
    auto = specmerge.merge_state_dicts(
        recipe_for(models, "swudi", parameters={"scaling": "auto"}), base, experts)
    d_plain, d_auto = plain[name] - base[name], auto[name] - base[name]
    s = float((d_auto * d_plain).sum() / d_plain.square().sum())
    assert 0.0 < s < 1.0
    torch.testing.assert_close(d_auto, s * d_plain, rtol=1e-4, atol=1e-5)
    up = "model.layers.0.mlp.up_proj.weight"  # dense updates, C of full rank: unchanged
    torch.testing.assert_close(auto[up], plain[up])
