"""Merge spaces (Core Space, KnOTS): the official codes' numbers on small random adapters, the
space-invariance of linear merges, and the recipe's ``space`` through the engine and its
refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_state_dicts, recipe_for, write_hf_dir
from safetensors.torch import load_file, save_file

import specmerge
from specmerge.errors import RecipeError, SpecmergeError
from specmerge.lowrank import LowRank
from specmerge.methods.registry import get_method
from specmerge.spaces import core_space, knots_space, merge_in_space

GOLDEN = json.loads((Path(__file__).parent / "golden" / "spaces.json").read_text())
# the official methods and the specmerge calls that reproduce them (tests/golden/spaces.json)
CALLS = {"task_arithmetic": ("task_arithmetic", {"scaling": 1.0}),
         "ties_topK20": ("ties", {"density": 0.2}),  # mean, official trim count, λ = 1
         "tsv": ("tsv_m", {}),
         "iso_c": ("iso_c", {})}
# core: float64 throughout; knots: the official apply_svd casts U, s and V to float32
TOLERANCE = {"core": 1e-12, "knots": 1e-6}


def golden_terms() -> list[LowRank]:
    inputs = GOLDEN["inputs"]
    return [LowRank(torch.tensor(b, dtype=torch.float64), torch.tensor(a, dtype=torch.float64),
                    inputs["scale"]) for b, a in zip(inputs["B"], inputs["A"], strict=True)]


def method(name: str, **kwargs):
    fn = get_method(name).fn
    return lambda ts: fn(ts, **kwargs)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("space,case", [(s, c) for s in ("core", "knots") for c in GOLDEN[s]])
def test_the_official_codes_numbers(space, case) -> None:
    name, kwargs = CALLS[case]
    got = merge_in_space(space, method(name, **kwargs), golden_terms())
    assert isinstance(got, LowRank) and got.rank <= 6  # lifted back factored, rank ≤ Σ r
    assert rel(got.dense(), torch.tensor(GOLDEN[space][case], dtype=torch.float64)) \
        < TOLERANCE[space]


@pytest.mark.filterwarnings("ignore:tsv_m")
def test_linear_merges_are_the_dense_merge_in_every_space() -> None:
    gen = torch.Generator().manual_seed(1)
    terms = [LowRank(torch.randn(12, r, generator=gen, dtype=torch.float64),
                     torch.randn(r, 10, generator=gen, dtype=torch.float64), s)
             for r, s in ((2, 1.0), (3, 0.5), (1, 2.0))]
    dense = [t.dense() for t in terms]
    for name, kwargs in (("task_arithmetic", {"scaling": 0.3, "weights": [1.0, 2.0, 0.5]}),
                         ("weight_average", {})):
        want = get_method(name).fn(dense, **kwargs)
        for space in ("core", "knots"):
            got = merge_in_space(space, method(name, **kwargs), terms).dense()
            assert rel(got, want) < 1e-13, (name, space)
    assert rel(merge_in_space("core", method("tsv_m"), terms).dense(),
               get_method("tsv_m").fn(dense)) > 1e-3  # TSV-M depends on the space
    ties = [merge_in_space(s, method("ties"), terms).dense() for s in ("core", "knots")]
    assert min(rel(ties[0], ties[1]), rel(ties[0], get_method("ties").fn(dense))) > 1e-2


def test_the_bases_are_the_official_ones() -> None:
    """Core Space: the SVD (not a QR) of the stacked factors; KnOTS: the cores are Σ V_iᵀ, the
    rows of the joint SVD's right factors scaled by σ, so that Σ_i ‖row j‖² = σ_j²."""
    terms = golden_terms()
    space, cores = core_space(terms)
    b_stack = torch.cat([t.b for t in terms], dim=1)
    s_b = torch.linalg.svdvals(b_stack)
    torch.testing.assert_close((space.left.mT @ b_stack).norm(dim=1), s_b)  # rows ⟂, by σ
    assert space.left.shape == (12, 6) and cores[0].shape == (6, 6)
    knots, sigma_v = knots_space(terms)
    joint = torch.cat([t.dense() for t in terms], dim=1)
    sigma = torch.linalg.svdvals(joint)
    torch.testing.assert_close(sum(v.square().sum(1) for v in sigma_v), sigma.square()[:6])
    assert knots.u.shape == (12, 6) and sigma_v[0].shape == (6, 10)


# ------------------------------------------------------------------------------------------
# the recipe's space through the engine
# ------------------------------------------------------------------------------------------

TARGETS = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.mlp.up_proj": (12, 8)}


@pytest.fixture
def adapters(tmp_path: Path) -> tuple[Path, list[Path], list[dict[str, LowRank]]]:
    """The toy base and three hand-written LoRA adapters on q_proj and up_proj (r 2, 3, 2;
    lora_alpha 4), with their τ_i."""
    base, _ = make_state_dicts(k=0)
    bdir = write_hf_dir(tmp_path / "base", base)
    gen = torch.Generator().manual_seed(3)
    dirs, taus = [], []
    for i, r in enumerate((2, 3, 2)):
        path = tmp_path / f"ad{i}"
        path.mkdir()
        tensors, tau = {}, {}
        for module, (m, n) in TARGETS.items():
            a, b = torch.randn(r, n, generator=gen), torch.randn(m, r, generator=gen)
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
            tau[f"{module}.weight"] = LowRank(b.double(), a.double(), 4 / r)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": r, "lora_alpha": 4,
             "target_modules": ["q_proj", "up_proj"]}))
        dirs.append(path)
        taus.append(tau)
    return bdir, dirs, taus


def _recipe(bdir: Path, dirs: list[Path], **extra) -> dict:
    return {"base_model": str(bdir), "models": [str(d) for d in dirs], "dtype": "float64",
            "merge_method": "ties", **extra}


def test_a_space_merge_through_the_engine(tmp_path, adapters) -> None:
    bdir, dirs, taus = adapters
    base = load_file(str(bdir / "model.safetensors"))
    outs = {space: load_file(str(specmerge.merge(
        _recipe(bdir, dirs, space=space), tmp_path / space, progress=False).out_dir
        / "model.safetensors")) for space in ("full", "core", "knots")}
    for space in ("core", "knots"):
        for name in (f"{m}.weight" for m in TARGETS):
            want = merge_in_space(space, method("ties"), [t[name] for t in taus]).dense()
            got = outs[space][name].double() - base[name].double()
            assert rel(got, want) < 1e-6, (space, name)  # float32 output
            assert rel(got, outs["full"][name].double() - base[name].double()) > 1e-2
        for name in base:  # not targeted: the base, untouched
            if not any(name.startswith(m) for m in TARGETS):
                assert torch.equal(outs[space][name], base[name]), name
    # the PEFT output of a core merge: its factors, from the lifted bases (no dense SVD)
    out = specmerge.merge({**_recipe(bdir, dirs, space="core"), "output": {"format": "peft",
                           "rank": 7}}, tmp_path / "peft", progress=False).out_dir
    factors = load_file(str(out / "adapter_model.safetensors"))
    name = "model.layers.0.mlp.up_proj"
    cfg = json.loads((out / "adapter_config.json").read_text())
    b = factors[f"base_model.model.{name}.lora_B.weight"].double()
    a = factors[f"base_model.model.{name}.lora_A.weight"].double()
    scale = cfg["alpha_pattern"].get(name, cfg["lora_alpha"]) / cfg["rank_pattern"].get(
        name, cfg["r"])
    want = outs["core"][f"{name}.weight"].double() - base[f"{name}.weight"].double()
    assert rel(scale * b @ a, want) < 1e-5


def test_no_space_is_the_full_space_byte_for_byte(tmp_path, adapters) -> None:
    bdir, dirs, _ = adapters
    a = specmerge.merge(_recipe(bdir, dirs), tmp_path / "a", progress=False).out_dir
    b = specmerge.merge(_recipe(bdir, dirs, space="full"), tmp_path / "b", progress=False
                        ).out_dir
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert "\nspace:" not in (a / "specmerge_recipe.yaml").read_text()
    assert (a / "specmerge_recipe.yaml").read_text() == (b / "specmerge_recipe.yaml").read_text()


def test_row_blocks_leave_a_space_merge_unchanged(tmp_path, adapters) -> None:
    """Targeted weights are read whole, so a small block size changes nothing."""
    bdir, dirs, _ = adapters
    recipe = _recipe(bdir, dirs, space="core", merge_method="dare")
    whole = specmerge.merge(recipe, tmp_path / "w", progress=False).out_dir
    rows = specmerge.merge(recipe, tmp_path / "r", progress=False, block_size=64).out_dir
    assert (whole / "model.safetensors").read_bytes() == (rows / "model.safetensors").read_bytes()


def test_refusals_name_the_field_and_the_expert(tmp_path, adapters, toy_models) -> None:
    bdir, dirs, _ = adapters
    with pytest.raises(SpecmergeError, match=r"space 'core': models\[0\] .* is not a LoRA"):
        specmerge.merge(recipe_for(toy_models, "ties", space="core"), tmp_path / "x",
                        progress=False)
    with pytest.raises(SpecmergeError, match="space 'knots' merges LoRA adapters"):
        specmerge.merge_state_dicts({"merge_method": "ties", "space": "knots"},
                                    toy_models["base_sd"], toy_models["expert_sds"])
    with pytest.raises(RecipeError, match="space 'core': ties's whole-model statistic"):
        specmerge.merge(_recipe(bdir, dirs, space="core",
                                parameters={"trim_scope": "global"}), tmp_path / "y")
    with pytest.raises(RecipeError, match="space"):
        specmerge.merge(_recipe(bdir, dirs, space="dense"), tmp_path / "z")


def test_a_dense_task_vector_beside_lora_factors_is_refused_by_tensor_and_expert() -> None:
    from specmerge.engine.update import merged_update
    from specmerge.errors import MergeError
    from specmerge.plan import PlanEntry

    terms = golden_terms()
    entry = PlanEntry("w", (12, 10), torch.float64, "method", False, True, "ties",
                      {"density": 0.2}, space="core")
    zero = LowRank(torch.zeros(12, 0, dtype=torch.float64), torch.zeros(0, 10,
                                                                        dtype=torch.float64))
    got = merged_update(entry, [terms[0], zero, terms[2]], None, {})
    assert isinstance(got, LowRank)  # an adapter that leaves the weight alone: a zero core
    with pytest.raises(MergeError, match=r"space 'core': models\[1\] gives tensor 'w' as a "
                                         r"dense task vector"):
        merged_update(entry, [terms[0], terms[1].dense(), terms[2]], None, {})
    dense_only = merged_update(entry, [t.dense() for t in terms], None, {})
    torch.testing.assert_close(dense_only, get_method("ties").fn([t.dense() for t in terms],
                                                                 density=0.2))
