"""Row blocks (issue #13): memory bounded by a block size, never a different byte.

- Merging a parameter in row blocks gives the bytes of the whole-tensor merge, for every
  element-wise method and fallback, whatever the block size and the workers.
- DARE's counter-based generator: splitmix64 as the reference computes it; any block of a
  stream equals that slice of the whole stream.
- The cheap NaN/Inf check: the methods that declare ``propagates_nonfinite`` do turn any
  non-finite input entry into a non-finite output entry (the proof that checking the output
  finds them), and a NaN read in a block is still reported with its file and tensor.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import specmerge
import specmerge.io.writer as writer
from specmerge.errors import NonFiniteError
from specmerge.examples import llama_shape_for, write_example_models
from specmerge.methods.registry import all_methods, get_method
from specmerge.methods.rng import CounterRNG, reference_splitmix64, splitmix64, uniform
from tests.conftest import recipe_for, tree_hash

CASES: list[tuple[str, dict[str, Any]]] = [
    ("weight_average", {}),
    ("task_arithmetic", {}),
    ("ties", {}),
    ("ties", {"parameters": {"density": 1.0}}),
    ("ties", {"parameters": {"trim_scope": "global", "aggregate": "sum"}}),
    ("dare", {"seed": 7, "out_dtype": "bfloat16"}),
    ("tsv_m", {"scope": {"fallback": "task_arithmetic", "exclude": ["re:\\.0\\."]}}),
    ("iso_c", {"scope": {"fallback": "average"}}),
    ("star", {"scope": {"fallback": "base"}}),
    ("ram", {}),
    ("ramplus_tl", {"parameters": {"epsilon": 0.02, "r": 0.5}}),  # RamCounts over the blocks
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("blocks")
    write_example_models(root, llama_shape_for(1, vocab=40, hidden=32), 3, dtype="bfloat16",
                         seed=3, progress=False)
    return root


def _merge(root: Path, out: Path, method: str, extra: dict[str, Any], **kw: Any) -> str:
    recipe = {"base_model": str(root / "base"),
              "models": [str(root / f"expert_{i + 1}") for i in range(3)],
              "merge_method": method, **extra}
    specmerge.merge(recipe, out, shard_size="20KB", progress=False, **kw)
    return tree_hash(out)


@pytest.mark.parametrize(("method", "extra"), CASES, ids=[f"{m}-{i}" for i, (m, _) in
                                                           enumerate(CASES)])
def test_block_size_and_workers_do_not_change_bytes(synthetic: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    method: str, extra: dict[str, Any]) -> None:
    whole = _merge(synthetic, tmp_path / "whole", method, extra)
    calls = []
    real = writer.Region.write_rows

    def spy(self: writer.Region, start: int, rows: torch.Tensor) -> None:
        calls.append(self.name)
        real(self, start, rows)

    monkeypatch.setattr(writer.Region, "write_rows", spy)
    assert _merge(synthetic, tmp_path / "rows", method, extra, block_size=1) == whole
    assert len(calls) > 100  # one row per block: the element-wise parameters went by rows
    assert _merge(synthetic, tmp_path / "rows-w2", method, extra, block_size="1KiB",
                  workers=2) == whole


def test_ties_per_tensor_statistics_match_the_whole_tensor() -> None:
    """Thresholds and sign majority over row blocks equal the whole tensor's, ties included."""
    from specmerge.methods.elementwise import SignMajority, TrimThresholds, ties

    gen = torch.Generator().manual_seed(0)
    taus = [torch.randn(37, 5, generator=gen).round(decimals=1) for _ in range(3)]
    blocks = [(lo, min(lo + 4, 37)) for lo in range(0, 37, 4)]
    params = {"density": 0.3}
    values: dict[str, Any] = {}
    for stat in (TrimThresholds("tensor"), SignMajority()):
        state = stat.start({**params, **values}, 3, taus[0].numel(), torch.float32)
        while not stat.done(state):
            state = stat.reduce(state, [stat.map(state, [t[lo:hi] for t in taus])
                                        for lo, hi in blocks])
        values[stat.kwarg] = stat.value(state)
    whole = ties(taus, density=0.3)
    parts = torch.cat([ties([t[lo:hi] for t in taus], density=0.3, **values)
                       for lo, hi in blocks])
    assert torch.equal(whole, parts)


def test_splitmix64_matches_the_reference_and_blocks_are_slices() -> None:
    key = (1 << 63) - 12345
    z = splitmix64(key, 1000, 64)
    assert [int(v) % (1 << 64) for v in z] == [reference_splitmix64(key, 1000 + i)
                                               for i in range(64)]
    whole = uniform(key, 0, 100_000)
    assert torch.equal(whole[70_000:], CounterRNG(key, 70_000).uniform(0, 30_000))
    assert float(whole.min()) >= 0 and float(whole.max()) < 1
    assert abs(float(whole.mean()) - 0.5) < 0.01


def test_dare_masks_do_not_depend_on_the_blocks() -> None:
    dare = get_method("dare").fn
    gen = torch.Generator().manual_seed(1)
    taus = [torch.randn(9, 7, generator=gen) for _ in range(2)]
    keys = [11, 12]
    whole = dare(taus, generators=[CounterRNG(k) for k in keys], drop_rate=0.6)
    parts = torch.cat([dare([t[lo:lo + 2] for t in taus], generators=[
        CounterRNG(k, lo * 7) for k in keys], drop_rate=0.6) for lo in range(0, 9, 2)])
    assert torch.equal(whole, parts)
    kept = (whole != 0).float().mean()
    assert 0.5 < float(kept) < 0.9  # 1 − 0.6² of the entries survive in one expert at least


PROPAGATING = [m for m in all_methods() if m.propagates_nonfinite]


def test_which_methods_check_the_output_only() -> None:
    assert {m.name for m in PROPAGATING} == {"weight_average", "task_arithmetic", "dare",
                                              "nearswap", "ram", "ramplus_tl"}


@pytest.mark.parametrize("method", [m.name for m in PROPAGATING])
def test_propagating_methods_turn_every_nonfinite_input_into_a_nonfinite_output(
        method: str) -> None:
    """The proof behind checking only the output: for any input (θ0 or θ_i), any entry, any of
    NaN/+Inf/−Inf, under weights that include 0, scaling 0 and (DARE) dropped entries, the
    output θ0 + τ is non-finite at that entry."""
    fn = get_method(method).fn
    gen = torch.Generator().manual_seed(2)
    k, n = (1, 40) if method == "nearswap" else (3, 40)
    thetas = [torch.randn(n, generator=gen) for _ in range(k + 1)]
    settings: list[dict[str, Any]] = [{"weights": [1.0, 0.0, 2.0]}, {"weights": [0.5] * k}]
    if method not in ("weight_average", "nearswap"):
        settings.append({"scaling": 0.0, "weights": [1.0] * k})
    if method == "nearswap":  # no weights; thresholds from none to every entry
        settings = [{"t": t} for t in (0.0, 1e-4, 0.5, 1e3)]
    if method in ("ram", "ramplus_tl"):  # no weights; every entry changed, some, none
        settings = [{"epsilon": e} for e in (0.0, 0.5, 1e3)]
    if method == "dare":
        settings = [{**s, "drop_rate": p, "generators": [CounterRNG(i) for i in range(k)]}
                    for s in settings for p in (0.0, 0.9)]
    for kwargs, bad, which, where in itertools.product(
            settings, (math.nan, math.inf, -math.inf), range(k + 1), (0, 17, n - 1)):
        inputs = [t.clone() for t in thetas]
        inputs[which][where] = bad
        theta0 = inputs[0]
        taus = [t - theta0 for t in inputs[1:]]
        out = theta0 + fn(taus, **kwargs)
        assert not math.isfinite(float(out[where])), (kwargs, bad, which, where)


def _poisoned(root: Path, tmp: Path, name: str, value: float) -> Path:
    """A copy of expert_2 with one entry of ``name`` set to ``value``."""
    import shutil

    dst = tmp / "bad"
    shutil.copytree(root / "expert_2", dst)
    files = sorted(dst.glob("*.safetensors"))
    for f in files:
        sd = load_file(str(f))
        if name in sd:
            sd[name] = sd[name].clone()
            sd[name].view(-1)[-1] = value
            save_file(sd, str(f), metadata={"format": "pt"})
            return f
    raise AssertionError(name)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare"])
def test_nan_read_in_a_block_names_its_file_and_tensor(synthetic: Path, tmp_path: Path,
                                                       method: str) -> None:
    name = "model.embed_tokens.weight"
    f = _poisoned(synthetic, tmp_path, name, math.nan)
    recipe = {"base_model": str(synthetic / "base"),
              "models": [str(synthetic / "expert_1"), str(tmp_path / "bad"),
                         str(synthetic / "expert_3")],
              "merge_method": method}
    block = 1 if method != "ties" else 1024  # 1 row, or 8 rows (TIES reads each block 4 times)
    with pytest.raises(NonFiniteError, match=f"{f.name}: tensor '{name}' holds 1 NaN/Inf"):
        specmerge.merge(recipe, tmp_path / "out", block_size=block, progress=False)
    assert not (tmp_path / "out").exists()
    specmerge.merge(recipe, tmp_path / "out", block_size=block, allow_nonfinite=True,
                    progress=False)


def test_overflow_from_finite_inputs_in_blocks_names_the_merged_tensor(toy_models,
                                                                       tmp_path: Path) -> None:
    recipe = recipe_for(toy_models, parameters={"scaling": 1e4})
    name = "model.embed_tokens.weight"
    for e in toy_models["experts"]:
        sd = load_file(str(e / "model.safetensors"))
        sd[name] = sd[name].clone()
        sd[name][3, 1] = 3e37
        save_file(sd, str(e / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=f"the merged tensor '{name}' \\(from finite "
                                             f"inputs\\) holds 1 NaN/Inf"):
        specmerge.merge(recipe, tmp_path / "out", block_size=1, progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_count_nonfinite_finds_every_nonfinite_entry(dtype: torch.dtype) -> None:
    """The one-sum shortcut: any NaN/±Inf entry, anywhere, is found and counted; finite
    entries whose sum overflows are counted exactly (as 0)."""
    from specmerge.sources import count_nonfinite

    gen = torch.Generator().manual_seed(4)
    for n in (1, 7, 1000, 100_003):
        t = torch.randn(n, generator=gen).to(dtype)
        assert count_nonfinite(t) == 0
        for bad, pos in itertools.product((math.nan, math.inf, -math.inf), (0, n // 2, n - 1)):
            u = t.clone()
            u[pos] = bad
            assert count_nonfinite(u) == 1, (n, bad, pos)
        if n > 1:
            u = t.clone()
            u[0], u[-1] = math.inf, -math.inf  # the sum is NaN, not ±Inf
            assert count_nonfinite(u) == 2
    huge = torch.finfo(dtype).max
    assert count_nonfinite(torch.full((10,), huge, dtype=dtype)) == 0  # the sum overflows
    assert count_nonfinite(torch.zeros(3, dtype=torch.int32)) == 0
