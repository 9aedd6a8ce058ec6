"""TIES's ``trim_count``: the official rule keeps ⌊ρd⌋ + 1 entries of each task vector,
``exact`` keeps ⌊ρd⌋ (at least 1) like mergekit 0.1.5. Closed-form cases on the whole tensor,
over row blocks and with ``trim_scope: global``; the count as an identity; the default's
record unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

import specmerge
from specmerge.methods.elementwise import SignMajority, TrimThresholds, ties, trim_rank
from specmerge.methods.registry import get_method
from tests.conftest import write_hf_dir
from tests.test_elementwise import TIES_MEAN, taus3

# The 3×3, 3-task case of test_elementwise, density 0.4: ⌊9·0.4⌋ = 3.
# official: t_i is the 6th smallest |τ_i| (2, 2, 2) and 4 entries survive (TIES_MEAN there);
# exact: t_i is the 7th smallest (3, 3, 4) and 3 survive:
#   τ1 keeps 5, -3, 4 | τ2 keeps 3, -5, -6 | τ3 keeps -4, -7, 5
# Σ trimmed = [[5, -1, 0], [0, -8, -7], [-2, 5, 0]]; 2 positive, 4 negative: zeros elect -.
# Kept (agreeing): (0,0) 5 | (0,1) -4 | (1,1) -3, -5 | (1,2) -7 | (2,0) -6 | (2,1) 5.
EXACT_MEAN = [[5.0, -4.0, 0.0], [0.0, -4.0, -7.0], [-6.0, 5.0, 0.0]]
EXACT_SUM = [[5.0, -4.0, 0.0], [0.0, -8.0, -7.0], [-6.0, 5.0, 0.0]]
NAME = "model.layers.0.mlp.up_proj.weight"


def test_trim_rank_by_rule() -> None:
    assert trim_rank(9, 0.4) == 6 and trim_rank(9, 0.4, "exact") == 7
    assert trim_rank(10, 0.05) == 10 and trim_rank(10, 0.05, "exact") == 10  # ⌊ρd⌋ = 0: keep 1
    assert trim_rank(10, 1.0) == 0 and trim_rank(10, 1.0, "exact") == 1  # keep everything
    assert trim_rank(0, 0.5) == 0 and trim_rank(0, 0.5, "exact") == 0


def test_whole_tensor_closed_form() -> None:
    assert torch.equal(ties(taus3(), density=0.4), torch.tensor(TIES_MEAN))
    assert torch.equal(ties(taus3(), density=0.4, trim_count="official"),
                       torch.tensor(TIES_MEAN))
    assert torch.equal(ties(taus3(), density=0.4, trim_count="exact"), torch.tensor(EXACT_MEAN))
    assert torch.equal(ties(taus3(), density=0.4, trim_count="exact", aggregate="sum"),
                       torch.tensor(EXACT_SUM))
    with pytest.raises(ValueError, match="trim_count"):
        ties(taus3(), trim_count="mergekit")


def _block_statistics(taus: list[torch.Tensor], params: dict[str, Any], rows: int
                      ) -> dict[str, Any]:
    """The engine's per-tensor statistics, run over blocks of ``rows`` rows."""
    n = taus[0].shape[0]
    blocks = [(lo, min(lo + rows, n)) for lo in range(0, n, rows)]
    values: dict[str, Any] = {}
    for stat in (TrimThresholds("tensor"), SignMajority()):
        state = stat.start({**params, **values}, len(taus), taus[0].numel(), torch.float32)
        while not stat.done(state):
            state = stat.reduce(state, [stat.map(state, [t[lo:hi] for t in taus])
                                        for lo, hi in blocks])
        values[stat.kwarg] = stat.value(state)
    return values


@pytest.mark.parametrize(("rule", "thresholds", "expected"),
                         [("official", [2.0, 2.0, 2.0], TIES_MEAN),
                          ("exact", [3.0, 3.0, 4.0], EXACT_MEAN)])
def test_row_block_statistics_closed_form(rule: str, thresholds: list[float],
                                          expected: list[list[float]]) -> None:
    taus = taus3()
    values = _block_statistics(taus, {"density": 0.4, "trim_count": rule}, rows=1)
    assert values["thresholds"] == thresholds
    parts = torch.cat([ties([t[r:r + 1] for t in taus], density=0.4, trim_count=rule,
                            **values) for r in range(3)])
    assert torch.equal(parts, torch.tensor(expected))


def _write(root: Path, taus: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    base = {n: torch.zeros_like(t) for n, t in taus[0].items()}
    bdir = write_hf_dir(root / "base", base)
    edirs = [write_hf_dir(root / f"e{i}", t) for i, t in enumerate(taus)]
    return {"base_model": str(bdir), "models": [str(e) for e in edirs], "merge_method": "ties"}


@pytest.mark.parametrize("block_size", [1, "16MiB"])
@pytest.mark.parametrize(("rule", "expected"), [("official", TIES_MEAN), ("exact", EXACT_MEAN)])
def test_engine_closed_form_whole_and_row_blocks(tmp_path: Path, block_size: int | str,
                                                 rule: str, expected: list[list[float]]) -> None:
    recipe = _write(tmp_path, [{NAME: t} for t in taus3()])
    recipe["parameters"] = {"density": 0.4, "trim_count": rule}
    res = specmerge.merge(recipe, tmp_path / "out", block_size=block_size, progress=False)
    assert torch.equal(load_file(str(res.out_dir / "model.safetensors"))[NAME],
                       torch.tensor(expected))


# trim_scope global, one expert (its merge is its trimmed τ): τ = A [1, -5] and B [3, 2, -4],
# d = 5, density 0.5, ⌊2.5⌋ = 2. official: the 3rd smallest |τ| (3) keeps -5, 3, -4;
# exact: the 4th smallest (4) keeps -5, -4. (Per tensor, official keeps A whole and 3, -4.)
GLOBAL_TAU = {"a.weight": torch.tensor([[1.0, -5.0]]),
              "b.weight": torch.tensor([[3.0], [2.0], [-4.0]])}
GLOBAL = {"official": {"a.weight": [[0.0, -5.0]], "b.weight": [[3.0], [0.0], [-4.0]]},
          "exact": {"a.weight": [[0.0, -5.0]], "b.weight": [[0.0], [0.0], [-4.0]]}}


@pytest.mark.parametrize("rule", ["official", "exact"])
def test_global_scope_closed_form(tmp_path: Path, rule: str) -> None:
    params = {"density": 0.5, "trim_scope": "global", "trim_count": rule}
    recipe = _write(tmp_path, [GLOBAL_TAU])
    recipe["parameters"] = params
    for block_size in (1, "16MiB"):
        res = specmerge.merge(recipe, tmp_path / f"out{block_size}", block_size=block_size,
                              progress=False)
        got = load_file(str(res.out_dir / "model.safetensors"))
        assert {n: t.tolist() for n, t in got.items()} == GLOBAL[rule]
    base = {n: torch.zeros_like(t) for n, t in GLOBAL_TAU.items()}
    mem = specmerge.merge_state_dicts({"merge_method": "ties", "parameters": params}, base,
                                      [GLOBAL_TAU])
    assert {n: t.tolist() for n, t in mem.items()} == GLOBAL[rule]


@pytest.mark.parametrize("numel", [1, 7, 100, 1000, 4099])
def test_exact_keeps_floor_density_times_d_distinct_magnitudes(numel: int) -> None:
    """One task vector of distinct magnitudes: TIES returns it trimmed, with ⌊ρd⌋ nonzeros by
    the exact rule (at least 1) and ⌊ρd⌋ + 1 by the official one (at most d), on the whole
    tensor and over row blocks."""
    x = torch.randperm(numel, generator=torch.Generator().manual_seed(numel)).float() + 1
    x = x * torch.where(torch.arange(numel) % 3 == 0, -1.0, 1.0)
    for density in (0.001, 0.01, 0.1, 0.2, 0.5, 0.9, 0.99):
        floor = int(numel * density)
        for rule, kept in (("exact", max(1, floor)), ("official", min(numel, floor + 1))):
            whole = ties([x], density=density, trim_count=rule)
            assert int((whole != 0).sum()) == kept, (rule, density)
            assert torch.equal(whole[whole != 0], x[whole != 0])  # the largest |x| survive
            assert float(whole.abs()[whole != 0].min()) >= float(x.abs().sort().values[-kept])
            rows = x.reshape(numel, 1)
            values = _block_statistics([rows], {"density": density, "trim_count": rule}, 3)
            parts = torch.cat([ties([rows[lo:lo + 3]], density=density, **values)
                               for lo in range(0, numel, 3)])
            assert torch.equal(parts.reshape(-1), whole)


def test_default_is_official_and_left_out_of_the_record(tmp_path: Path) -> None:
    method = get_method("ties")
    assert method.param("trim_count").default == "official"
    assert method.param("trim_count").choices == ("official", "exact")
    recipe = _write(tmp_path, [{NAME: t} for t in taus3()])
    default = specmerge.merge(recipe, tmp_path / "default", progress=False)
    record = yaml.safe_load((default.out_dir / "specmerge_recipe.yaml").read_text())
    assert "trim_count" not in record["parameters"]
    assert "trim_count" not in (default.out_dir / "README.md").read_text()
    recipe["parameters"] = {"trim_count": "exact"}
    exact = specmerge.merge(recipe, tmp_path / "exact", progress=False)
    record = yaml.safe_load((exact.out_dir / "specmerge_recipe.yaml").read_text())
    assert record["parameters"]["trim_count"] == "exact"
    assert '"trim_count": "exact"' in (exact.out_dir / "README.md").read_text()
    # each record re-runs to its own bytes
    again = specmerge.merge(exact.out_dir / "specmerge_recipe.yaml", tmp_path / "again",
                            progress=False)
    assert (again.out_dir / "model.safetensors").read_bytes() == \
        (exact.out_dir / "model.safetensors").read_bytes()
    assert (default.out_dir / "model.safetensors").read_bytes() != \
        (exact.out_dir / "model.safetensors").read_bytes()


def test_global_exact_thresholds_over_the_toy_model(toy_models: dict[str, Any]) -> None:
    from specmerge.backends import LocalBackend
    from specmerge.engine import run_statistics
    from specmerge.plan import build_plan
    from specmerge.recipe import load_recipe
    from specmerge.sources import CheckpointSource
    from tests.conftest import recipe_for

    rec = load_recipe(recipe_for(toy_models, "ties", parameters={
        "trim_scope": "global", "trim_count": "exact"}))
    source = CheckpointSource(toy_models["base"], toy_models["experts"])
    got = run_statistics(build_plan(rec, source.index()), source, LocalBackend(1), "cpu",
                         progress=False)["thresholds"]
    b = toy_models["base_sd"]
    for i, e in enumerate(toy_models["expert_sds"]):
        allabs = torch.cat([(e[n] - b[n]).reshape(-1).abs() for n in b])
        d = allabs.numel()
        assert got[i] == allabs.kthvalue(d - int(d * 0.2) + 1).values.item()
        assert int((allabs >= got[i]).sum()) == int(d * 0.2)  # distinct magnitudes here
