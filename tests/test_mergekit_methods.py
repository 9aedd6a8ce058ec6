"""mergekit 0.1.5's own methods (slerp, nearswap, model_stock, sce, della, della_linear,
karcher, nuslerp, multislerp, arcee_fusion, ram, ramplus_tl): closed-form values, identities,
and parity with numbers that mergekit's own code computed
(tests/golden/mergekit_methods.json, written by benchmarks/peers/mergekit_methods_golden.py;
mergekit is not needed here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import specmerge
from specmerge.mergekit import MERGEKIT_ONLY, NATIVE, SUPPORTED, from_mergekit
from specmerge.methods import get_method
from specmerge.methods.elementwise import gta
from specmerge.methods.selective import (
    QUANTILE_SAMPLE,
    RamCounts,
    arcee_fusion,
    fusion_importance,
    quartiles,
    ram,
    ramplus_tl,
)
from specmerge.methods.spherical import karcher, multislerp, nuslerp
from specmerge.methods.weightspace import (
    della,
    della_linear,
    della_magprune,
    model_stock,
    nearswap,
    sce,
    slerp,
)

T = torch.tensor
GOLDEN = json.loads((Path(__file__).parent / "golden" / "mergekit_methods.json").read_text())


# --- closed forms and identities -------------------------------------------------------------

def test_slerp_of_orthogonal_unit_vectors_at_half_is_the_bisector() -> None:
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    got = a + slerp([b - a], base=a, t=0.5)
    torch.testing.assert_close(got, T([math.sqrt(0.5), math.sqrt(0.5)]))
    # t = 1/3 of a right angle: (cos 30°, sin 30°)
    got = a + slerp([b - a], base=a, t=1 / 3)
    torch.testing.assert_close(got, T([math.cos(math.pi / 6), math.sin(math.pi / 6)]))


def test_slerp_keeps_the_norms_path_and_ends() -> None:
    g = torch.Generator().manual_seed(0)
    base, other = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    tau = other - base
    torch.testing.assert_close(slerp([tau], base=base, t=0.0), torch.zeros(5, 4))
    torch.testing.assert_close(base + slerp([tau], base=base, t=1.0), other)
    # near-collinear inputs take the linear branch
    near = base * 1.0001
    torch.testing.assert_close(slerp([near - base], base=base, t=0.3), 0.3 * (near - base))


def test_slerp_of_a_large_float32_tensor_matches_float64() -> None:
    """A 4.1M-entry float32 embedding: θ within 1e-6 relative of the float64 closed form
    (torch's float32 vector_norm put it 3.8e-5 off, 3.3e-5 from mergekit's chunked norms)."""
    g = torch.Generator().manual_seed(0)
    a = 0.02 * torch.randn(8000, 512, generator=g)
    tau = 0.0015 * torch.randn(8000, 512, generator=g)
    got = a.double() + slerp([tau], base=a, t=0.3).double()
    x, y = a.double(), (a + tau).double()
    omega = math.acos(float((x / x.norm() * y / y.norm()).sum()))
    ref = (math.sin(0.7 * omega) * x + math.sin(0.3 * omega) * y) / math.sin(omega)
    assert float((got - ref).norm() / ref.norm()) < 1e-6


def test_nearswap_by_hand() -> None:
    tau = T([0.5, 0.01, -2.0, 0.0])
    # w = clamp(0.1 / max(|τ|, 1e-6), 0, 1) = [0.2, 1, 0.05, 1]
    torch.testing.assert_close(nearswap([tau], t=0.1), T([0.1, 0.01, -0.1, 0.0]))
    # |τ| is floored at 1e-6 (mergekit 0.1.5): w = 1e-7 / 1e-6 for |τ| = 5e-7
    torch.testing.assert_close(nearswap([T([5e-7])], t=1e-7), T([5e-8]), rtol=1e-5, atol=0)


def test_model_stock_identities() -> None:
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(4, 3, generator=g)
    # identical experts: cos θ = 1, t = K / K = 1: that expert
    torch.testing.assert_close(model_stock([tau, tau, tau]), tau)
    torch.testing.assert_close(model_stock([tau, tau], filter_wise=True), tau)
    # orthogonal experts: cos θ = 0, t = 0: the base
    e1, e2 = T([1.0, 0.0]), T([0.0, 2.0])
    torch.testing.assert_close(model_stock([e1, e2]), torch.zeros(2))
    # cos θ = 1/2 (60°), K = 2: t = 1 / 1.5
    a, b = T([1.0, 0.0]), T([0.5, math.sqrt(0.75)])
    torch.testing.assert_close(model_stock([a, b]), (a + b) / 2 * (2 * 0.5 / 1.5))


def test_sce_by_hand() -> None:
    # elected signs [+, +]; agreeing entries τ1: [1, ·], τ2: [3, 1]; w = [1, 5] / 6
    got = sce([T([1.0, -1.0]), T([3.0, 1.0])])
    torch.testing.assert_close(got, T([(1 / 6 + 15 / 6) / 1.0, 1.0]))
    # variances [0, 1, 0, 4]: select_topk 0.5 keeps ⌊0.5 · 2 nonzero⌋ = 1 entry, the last
    got = sce([T([1.0, -1.0, 2.0, 0.0]), T([1.0, 1.0, 2.0, 4.0])], select_topk=0.5)
    torch.testing.assert_close(got, T([0.0, 0.0, 0.0, 4.0]))


def test_della_at_density_one_is_gta_and_magprune_keeps_by_rank() -> None:
    g = torch.Generator().manual_seed(2)
    taus = [torch.randn(3, 4, generator=g) for _ in range(2)]
    torch.testing.assert_close(della(taus, weights=[0.5, 2.0]),
                               gta(taus, weights=[0.5, 2.0], consensus="sum", normalize=True))
    torch.testing.assert_close(della_linear(taus, weights=[0.5, 2.0]),
                               0.5 * taus[0] + 2.0 * taus[1])
    # ε at its extreme: the smallest entry of each row is kept with p = ρ − ε, the largest ρ + ε
    tau = T([[0.1, -3.0, 0.2]])
    keep = torch.stack([della_magprune(tau, 0.5, 0.49999, rescale=False,
                                       generator=torch.Generator().manual_seed(s)) != 0
                        for s in range(200)]).float().mean(0)
    assert keep[0, 1] > 0.97 and keep[0, 0] < 0.03 and 0.35 < keep[0, 2] < 0.65
    with pytest.raises(ValueError, match="density ± epsilon must lie in"):
        della_magprune(tau, 0.1, 0.15, rescale=True)


def test_karcher_by_hand_and_identities() -> None:
    e1, e2 = T([1.0, 0.0]), T([0.0, 1.0])
    # the base and two models on the unit circle at 0°, 0° and 90°: the Riemannian mean of
    # the angles, 30° (the Euclidean mean's direction is atan(1/2) = 26.6°: iterations move it)
    got = e1 + karcher([torch.zeros(2), e2 - e1], base=e1)
    torch.testing.assert_close(got, T([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    # max_iter 0 stops at the Euclidean mean's direction
    got = e1 + karcher([torch.zeros(2), e2 - e1], base=e1, max_iter=0)
    torch.testing.assert_close(got, T([2.0, 1.0]) / math.sqrt(5))
    # one direction, norms 1 and 3: that direction at the mean norm 2
    g = torch.Generator().manual_seed(3)
    v = torch.randn(4, 3, generator=g)
    torch.testing.assert_close(v + karcher([2 * v], base=v), 2 * v)
    # identical models: that model
    torch.testing.assert_close(karcher([torch.zeros(4, 3)] * 3, base=v), torch.zeros(4, 3))
    # antipodal directions (the units' mean is 0): the first one's, at the mean norm (1 + 2) / 2
    torch.testing.assert_close(e1 + karcher([-3 * e1], base=e1), 1.5 * e1)


def test_nuslerp_endpoints_bisector_and_slerp() -> None:
    e1, e2 = T([1.0, 0.0]), T([0.0, 1.0])
    zero = torch.zeros(2)
    # around the base: the task vectors' bisector at equal weights, the ends at weight 0
    torch.testing.assert_close(nuslerp([e1, e2], base=zero, weights=[1.0, 1.0]),
                               T([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(nuslerp([e1, e2], base=zero, weights=[1.0, 0.0]), e1)
    torch.testing.assert_close(nuslerp([e1, e2], base=zero, weights=[0.0, 3.0]), e2)
    # weights summing to 0: t = 0.5
    torch.testing.assert_close(nuslerp([e1, e2], base=zero, weights=[1.0, -1.0]),
                               T([1.0, 1.0]) / math.sqrt(2))
    # base_weight: θ0 is an end, and the flattened NuSLERP is SLERP at t = w_2 / (w_1 + w_2)
    g = torch.Generator().manual_seed(4)
    base, other = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    torch.testing.assert_close(nuslerp([other - base], base=base, weights=[3.0], base_weight=1.0),
                               slerp([other - base], base=base, t=0.75))
    # per row: each row is the flattened NuSLERP of that row; row_wise: of each column
    taus = [torch.randn(5, 4, generator=g) for _ in range(2)]
    rows = nuslerp(taus, base=base, weights=[1.0, 2.0], nuslerp_flatten=False)
    for i in range(5):
        torch.testing.assert_close(rows[i], nuslerp([t[i] for t in taus], base=base[i],
                                                    weights=[1.0, 2.0]))
    cols = nuslerp(taus, base=base, weights=[1.0, 2.0], nuslerp_flatten=False,
                   nuslerp_row_wise=True)
    torch.testing.assert_close(cols.T, nuslerp([t.T for t in taus], base=base.T,
                                               weights=[1.0, 2.0], nuslerp_flatten=False))
    with pytest.raises(ValueError, match="exactly two other models"):
        get_method("nuslerp").check_recipe({"base_weight": None}, [1.0])
    with pytest.raises(ValueError, match="exactly one other model"):
        get_method("nuslerp").check_recipe({"base_weight": 1.0}, [1.0, 1.0])


def test_multislerp_by_hand_and_identities() -> None:
    e1, e2 = T([2.0, 0.0]), T([0.0, 2.0])
    zero = torch.zeros(2)
    # two points of equal norm and weight: SLERP's midpoint, at their norm
    torch.testing.assert_close(multislerp([e1, e2], base=zero, weights=[1.0, 1.0]),
                               T([math.sqrt(2), math.sqrt(2)]), rtol=1e-6, atol=1e-6)
    g = torch.Generator().manual_seed(5)
    base, tau = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    # one model: that model; identical models: that model (any weights)
    torch.testing.assert_close(multislerp([tau], base=base, weights=[0.3]), tau)
    torch.testing.assert_close(multislerp([tau] * 3, base=base, weights=[1.0, 2.0, 0.5]), tau)
    # base_weight: θ0 is interpolated too; θ0 and one model equal: that model
    torch.testing.assert_close(multislerp([torch.zeros(4, 3)], base=base, weights=[2.0],
                                          base_weight=1.0), torch.zeros(4, 3), rtol=0, atol=1e-6)
    # the weighted mean of the unit vectors is 0: two points are averaged, more refused
    torch.testing.assert_close(multislerp([e1, -e1], base=zero, weights=[1.0, 1.0]), zero)
    with pytest.raises(ValueError, match="antipodal"):
        multislerp([e1, -e1, e2], base=zero, weights=[1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="sum to zero"):
        get_method("multislerp").check_recipe({"base_weight": -2.0}, [1.0, 1.0])


def test_arcee_fusion_keeps_the_outliers_of_importance() -> None:
    # a 1-D τ: the KL term is one positive number, so the mask is |τ| ≥ M + 1.5 IQR of |τ|:
    # sorted |τ| = 1..7, 100: Q1 = 2, M = 4, Q3 = 6 (index ⌊q · 7⌋), threshold 10
    tau = T([1.0, -2.0, 3.0, -4.0, 5.0, 6.0, -7.0, 100.0])
    got = arcee_fusion([tau], base=torch.zeros(8))
    torch.testing.assert_close(got, T([0.0] * 7 + [100.0]))
    # the expert equal to the base: nothing changes
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(arcee_fusion([torch.zeros(4, 6)], base=base), torch.zeros(4, 6))
    # more entries than the sample: quartiles of a seeded sample, near the exact ones
    x = torch.rand(QUANTILE_SAMPLE + 1000, generator=torch.Generator().manual_seed(7))
    q = quartiles(x, torch.Generator().manual_seed(1))
    assert torch.equal(q, quartiles(x, torch.Generator().manual_seed(1)))
    torch.testing.assert_close(q, T([0.25, 0.5, 0.75]), rtol=0, atol=3e-3)


def test_arcee_fusion_mask_is_taken_in_float64() -> None:
    # random 32×32 cases where the float32 KL, lost to cancellation, puts some entry on the
    # other side of the threshold (which ones depends on the CPU's kernels): the mask must be
    # the float64 one, whatever the input dtype
    def mask(theta0: torch.Tensor, tau: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        imp = fusion_importance(theta0.to(dtype) + tau.to(dtype), theta0.to(dtype))
        q1, m, q3 = quartiles(imp)
        return imp >= m + 1.5 * (q3 - q1)

    flips = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        theta0, tau = 0.05 * torch.randn(32, 32, generator=g), 0.02 * torch.randn(32, 32,
                                                                                  generator=g)
        flips += int((mask(theta0, tau, torch.float32) != mask(theta0, tau, torch.float64)).sum())
        got = arcee_fusion([tau], base=theta0)
        assert got.dtype == torch.float32
        assert torch.equal(got, tau * mask(theta0, tau, torch.float64)), seed
    assert flips > 0  # the cases still bite: float32 would have given other masks


def test_ram_and_ramplus_by_hand() -> None:
    # counts c = [2, 0, 1, 0] (1e-6 ≤ ε is no change): the overlap is averaged, the rest kept
    t1, t2 = T([1.0, 0.0, 2.0, 0.0]), T([3.0, 0.0, 0.0, 1e-6])
    torch.testing.assert_close(ram([t1, t2]), T([2.0, 0.0, 2.0, 0.0]))
    # |τ| = ε is no change either (mergekit's strict >)
    torch.testing.assert_close(ram([T([0.5, 1.0]), T([0.0, 3.0])], epsilon=0.5), T([0.0, 2.0]))
    g = torch.Generator().manual_seed(8)
    tau = torch.randn(5, 3, generator=g)
    torch.testing.assert_close(ram([tau, tau, tau]), tau)  # equal experts: that expert
    # RAM+: τ_1 and τ_2 share entry 0 and change one entry alone each, ρ = 1/1 clamped to
    # α = 0.2, λ = 1 + 0.1 · 0.2; τ_3 shares none, ρ = 0, λ = 1
    taus = [T([1.0, 2.0, 0.0, 0.0]), T([3.0, 0.0, 4.0, 0.0]), T([0.0, 0.0, 0.0, 5.0])]
    torch.testing.assert_close(ramplus_tl(taus), T([2.0, 2.04, 4.08, 5.0]))
    torch.testing.assert_close(ramplus_tl(taus, r=0.0), ram(taus))
    # only shared changes: ρ = shared / ε is capped, λ = 1 + r α (nothing unique to scale)
    torch.testing.assert_close(ramplus_tl([tau, tau], r=0.5, alpha=0.8), tau)
    # the counts over row blocks are the whole tensor's, and so is the merge
    taus = [torch.randn(9, 4, generator=g) * (torch.rand(9, 4, generator=g) < 0.4)
            for _ in range(3)]
    stat, blocks = RamCounts(), [(lo, min(lo + 2, 9)) for lo in range(0, 9, 2)]
    state = stat.start({"epsilon": 1e-5}, 3, 36, torch.float32)
    state = stat.reduce(state, [stat.map(state, [t[lo:hi] for t in taus]) for lo, hi in blocks])
    parts = torch.cat([ramplus_tl([t[lo:hi] for t in taus], r=0.5, alpha=2.0,
                                  counts=stat.value(state)) for lo, hi in blocks])
    whole = ramplus_tl(taus, r=0.5, alpha=2.0)
    assert torch.equal(parts, whole) and not torch.equal(whole, ram(taus))


def test_registry_entries() -> None:
    assert get_method("slerp").uses_base and not get_method("slerp").rowwise
    assert get_method("nearswap").rowwise
    assert get_method("della").uses_rng and get_method("della").uses_densities
    for name in ("slerp", "model_stock", "sce", "della", "della_linear", "karcher", "nuslerp",
                 "multislerp", "arcee_fusion"):
        assert "whole tensors" in get_method(name).notes and not get_method(name).rowwise
    for name in ("ram", "ramplus_tl"):
        assert get_method(name).rowwise and "Streams in row blocks" in get_method(name).notes
    for name in ("karcher", "nuslerp", "multislerp", "arcee_fusion"):
        assert get_method(name).uses_base
    with pytest.raises(ValueError, match="exactly one other model"):
        get_method("slerp").check_recipe({"t": 0.5}, [1.0, 1.0])
    with pytest.raises(ValueError, match="at least two other models"):
        get_method("model_stock").check_recipe({}, [1.0])


# --- parity with mergekit 0.1.5 --------------------------------------------------------------

def _specmerge_output(case: dict) -> torch.Tensor:
    base = T(case["base"])
    taus = [T(m) - base for m in case["models"]]
    method = get_method(case["method"])
    params, kwargs = dict(case["params"]), {}
    for mk, ours in (("weight", "weights"), ("density", "densities"), ("lambda", "scaling")):
        if mk in params:
            kwargs[ours] = params.pop(mk)
    if "epsilon" in params and method.uses_densities:  # DELLA's, per model
        kwargs["epsilon"] = params.pop("epsilon")[0]
    if case.get("options", {}).get("no_base"):  # θ0 is the first interpolated model
        kwargs["base_weight"], kwargs["weights"] = kwargs["weights"][0], kwargs["weights"][1:]
    kwargs.update(params)
    if method.uses_base:
        kwargs["base"] = base
    if method.uses_rng:  # mergekit draws every expert's mask, in order, from one seeded stream
        gen = torch.Generator().manual_seed(case["seed"])
        kwargs["generators"] = [gen] * len(taus)
    return base + method.fn(taus, **kwargs)


def test_golden_was_written_by_mergekit_0_1_5() -> None:
    assert GOLDEN["mergekit"] == "0.1.5"
    assert {c["method"] for c in GOLDEN["cases"]} == set(NATIVE)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_parity_with_mergekit(case) -> None:
    got, ref = _specmerge_output(case), T(case["merged"])
    # float32: a few ulps of the largest magnitude (mergekit's arithmetic order differs)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=4 * 1.2e-7 * float(ref.abs().max()))


# --- mergekit recipes ------------------------------------------------------------------------

def test_native_methods_are_supported_not_refused() -> None:
    for name in NATIVE:
        assert name in SUPPORTED and name not in MERGEKIT_ONLY


def test_della_recipe_maps_mergekit_parameters(toy_models) -> None:
    e = toy_models["experts"]
    rec = from_mergekit({
        "base_model": str(toy_models["base"]), "merge_method": "della",
        "parameters": {"lambda": 0.9, "int8_mask": True, "normalize": False},
        "models": [{"model": str(e[0]), "parameters": {"weight": 0.5, "density": 0.6,
                                                        "epsilon": 0.1}},
                   {"model": str(e[1]), "parameters": {"weight": 0.7, "density": 0.4,
                                                        "epsilon": 0.1}}]})
    assert rec["merge_method"] == "della"
    assert rec["parameters"] == {"scaling": 0.9, "normalize": False, "epsilon": 0.1}
    assert [m["density"] for m in rec["models"]] == [0.6, 0.4]
    with pytest.raises(ValueError, match="epsilon values differ"):
        from_mergekit({"base_model": str(toy_models["base"]), "merge_method": "della",
                       "models": [{"model": str(e[0]), "parameters": {"epsilon": 0.1}},
                                  str(e[1])]})


def test_mergekit_slerp_recipe_converts_and_merges(toy_models, tmp_path) -> None:
    from specmerge.cli import app

    base, other = toy_models["base"], toy_models["experts"][0]
    mk = {"merge_method": "slerp", "base_model": str(base), "dtype": "float32",
          "models": [{"model": str(base)}, {"model": str(other)}], "parameters": {"t": 0.3}}
    p = tmp_path / "slerp.yml"
    p.write_text(yaml.safe_dump(mk))
    res = CliRunner().invoke(app, ["convert", str(p)])
    assert res.exit_code == 0, res.output
    rec = yaml.safe_load(res.output)
    assert rec["merge_method"] == "slerp" and rec["parameters"] == {"t": 0.3}
    out = specmerge.merge(rec, tmp_path / "out", progress=False).out_dir
    got = load_file(str(out / "model.safetensors"))
    b, e = toy_models["base_sd"], toy_models["expert_sds"][0]
    for name, theta0 in b.items():
        a, c = theta0.reshape(-1), e[name].reshape(-1)
        omega = torch.acos(torch.dot(a, c) / (a.norm() * c.norm()))
        ref = (torch.sin(0.7 * omega) * a + torch.sin(0.3 * omega) * c) / torch.sin(omega)
        torch.testing.assert_close(got[name], ref.reshape(theta0.shape), rtol=1e-5, atol=1e-6)
    # the mergekit YAML itself (the base listed among its models, no per-model parameters) is
    # recognised as mergekit's and merges to the same tensors
    direct = specmerge.merge(p, tmp_path / "direct", progress=False).out_dir
    assert (direct / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_mergekit_recipes_without_base_model(toy_models, tmp_path) -> None:
    """nuslerp, multislerp and karcher run without a base_model, as in mergekit: the first
    model is the base; nuslerp interpolates it with its weight, karcher averages it too."""
    b, e = toy_models["base_sd"], toy_models["expert_sds"]
    paths = [str(toy_models["base"]), *map(str, toy_models["experts"])]
    mk = {"merge_method": "nuslerp", "dtype": "float32", "parameters": {"nuslerp_flatten": False},
          "models": [{"model": paths[0], "parameters": {"weight": 0.4}},
                     {"model": paths[1], "parameters": {"weight": 0.6}}]}
    rec = from_mergekit(mk)
    assert rec["base_model"] == paths[0] and rec["models"] == [{"model": paths[1], "weight": 0.6}]
    assert rec["parameters"] == {"base_weight": 0.4, "nuslerp_flatten": False}
    got = load_file(str(specmerge.merge(mk, tmp_path / "nu", progress=False).out_dir
                        / "model.safetensors"))
    for name, theta0 in b.items():
        v0, v1 = theta0.reshape(-1, theta0.shape[-1]), e[0][name].reshape(-1, theta0.shape[-1])
        cos = torch.nn.functional.cosine_similarity(v0, v1, dim=-1).unsqueeze(-1)
        omega = torch.acos(cos)
        ref = (torch.sin(0.4 * omega) * v0 + torch.sin(0.6 * omega) * v1) / torch.sin(omega)
        torch.testing.assert_close(got[name], ref.reshape(theta0.shape), rtol=1e-5, atol=1e-6)

    mk = {"merge_method": "karcher", "models": paths[:3], "parameters": {"max_iter": 20}}
    assert specmerge.load_recipe(mk).models[0].model == paths[1]  # read as mergekit's
    got = load_file(str(specmerge.merge(mk, tmp_path / "ka", progress=False).out_dir
                        / "model.safetensors"))
    for name, theta0 in b.items():
        ref = theta0 + karcher([e[0][name] - theta0, e[1][name] - theta0], base=theta0,
                               max_iter=20)
        torch.testing.assert_close(got[name], ref, rtol=1e-6, atol=1e-6)

    mk = {"merge_method": "multislerp", "models": [
        {"model": p, "parameters": {"weight": w}} for p, w in zip(paths, [1.0, 2.0, 3.0, 0.5],
                                                                  strict=True)]}
    rec = from_mergekit(mk)
    assert rec["parameters"] == {"base_weight": 1.0}
    assert [m["weight"] for m in rec["models"]] == [2.0, 3.0, 0.5]
    for method in ("arcee_fusion", "ram", "ramplus_tl"):
        with pytest.raises(ValueError, match=f"base_model is missing: mergekit's {method} "
                                             "needs one"):
            from_mergekit({"merge_method": method, "models": paths[:2]})


def test_mergekit_ram_and_arcee_fusion_recipes(toy_models, tmp_path) -> None:
    base, experts = str(toy_models["base"]), [str(p) for p in toy_models["experts"]]
    # epsilon is RAM's own shared parameter here, not DELLA's per-model one
    rec = from_mergekit({"merge_method": "ramplus_tl", "base_model": base, "models": experts,
                         "parameters": {"epsilon": 0.01, "r": 0.3, "alpha": 0.5}})
    assert rec["merge_method"] == "ramplus_tl"
    assert rec["parameters"] == {"epsilon": 0.01, "r": 0.3, "alpha": 0.5}
    with pytest.raises(ValueError, match=r"parameters \['epsilon'\]"):
        from_mergekit({"merge_method": "ram", "base_model": base,
                       "models": [{"model": experts[0], "parameters": {"epsilon": 0.1}}]})
    # arcee_fusion: the base among the models is skipped, as mergekit takes it as the base
    mk = {"merge_method": "arcee_fusion", "base_model": base, "models": [base, experts[0]]}
    out = specmerge.merge(mk, tmp_path / "af", progress=False).out_dir
    got = load_file(str(out / "model.safetensors"))
    b, e = toy_models["base_sd"], toy_models["expert_sds"][0]
    changed = 0
    for name, theta0 in b.items():
        ref = theta0 + arcee_fusion([e[name] - theta0], base=theta0)
        torch.testing.assert_close(got[name], ref, rtol=0, atol=1e-6)
        changed += int((got[name] != theta0).sum())
    assert 0 < changed < 0.5 * sum(t.numel() for t in b.values())  # the outliers only
