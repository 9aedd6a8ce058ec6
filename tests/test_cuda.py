"""The GPU path against the CPU: every registered method, SVC, and an end-to-end merge.

The tests marked ``cuda`` run with ``pytest -m cuda`` (``benchmarks/gpu_check.sh`` runs them) and
are skipped when ``torch.cuda.is_available()`` is False. They compare the device under test with
the CPU within ``RTOL`` (1e-4), relative to the size of the merged update:

- every registered method (SVC after task arithmetic), through ``merge_state_dicts``, on float32
  and bf16 state dicts (statistics, RNG masks and fallbacks included);
- every matrix method and SVC called directly on float32 and bf16 task vectors that are moved to
  the device as they are and upcast there;
- ``specmerge.merge`` of the quickstart example (task arithmetic + SVC), file against file, and
  ``MergeResult.peak_gpu_mb``.

``SPECMERGE_TEST_DEVICE`` names the device under test (default ``cuda``); ``cpu`` rehearses the
harness on a machine without a GPU (``benchmarks/gpu_check.sh --dry-run`` does), where it can
only show that the tests run, not that a GPU agrees.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import accepts_experts
from safetensors.torch import load_file
from torch import Tensor

import specmerge
from specmerge.examples import QUICKSTART, write_example_models
from specmerge.lowrank import dense
from specmerge.methods.calibration import svc
from specmerge.methods.elementwise import task_arithmetic
from specmerge.methods.registry import all_methods

DEVICE = os.environ.get("SPECMERGE_TEST_DEVICE", "cuda")
RTOL = 1e-4
REPO = Path(__file__).resolve().parents[1]

needs_device = pytest.mark.skipif(
    torch.device(DEVICE).type == "cuda" and not torch.cuda.is_available(),
    reason="torch.cuda.is_available() is False: no CUDA device or a CPU-only torch build "
           "(SPECMERGE_TEST_DEVICE=cpu rehearses these tests on the CPU)")

# every registered merge method with its defaults (on 3 experts, or as many as it takes: slerp
# one, nuslerp two; passthrough takes slices, not experts), SVC after task arithmetic, and TIES
# with whole-model thresholds (the only statistic)
EXPERTS = {m.name: next((k for k in (3, 2, 1) if accepts_experts(m.name, k)), 0)
           for m in all_methods() if not m.is_calibration}
CASES: dict[str, dict[str, Any]] = {
    **{name: {"merge_method": name} for name, k in EXPERTS.items() if k},
    "task_arithmetic+svc": {"merge_method": "task_arithmetic", "calibrate": {"method": "svc"}},
    "ties(global)": {"merge_method": "ties", "parameters": {"trim_scope": "global"}},
}
CALIBRATIONS = [m.name for m in all_methods() if m.is_calibration]

# a Llama-like layer: square, tall and wide matrices, norms, a bias and an embedding
SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (64, 32),
    "model.layers.0.self_attn.q_proj.weight": (32, 32),
    "model.layers.0.mlp.up_proj.weight": (56, 32),
    "model.layers.0.mlp.down_proj.weight": (32, 56),
    "model.layers.0.input_layernorm.weight": (32,),
    "model.layers.0.mlp.up_proj.bias": (56,),
}
MATRIX_SHAPES = [(48, 48), (80, 48), (48, 80)]
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def relative_error(got: Tensor, want: Tensor, scale: Tensor) -> float:
    """‖got − want‖ / ‖scale‖, on the CPU in float64."""
    got, want, scale = (t.detach().to("cpu", torch.float64) for t in (got, want, scale))
    return float((got - want).norm() / scale.norm().clamp_min(1e-30))


def decaying_task_vectors(shape: tuple[int, int], k: int, generator: torch.Generator,
                          ratio: float = 0.85, scale: float = 2e-3) -> list[Tensor]:
    """K task vectors τ_i = scale · (S + T_i), S shared and T_i own, each with random singular
    vectors and singular values ratio^j (j = 0 … min(m, n) − 1).

    A geometric spectrum keeps the gaps where the methods cut (TSV-M's r/K, SWUDI's 0.65 n,
    the ranks SWUDI-A picks) wide, so the result is a well-conditioned function of the inputs
    and two devices' roundings agree to RTOL; in a flat noise bulk they need not (SWUDI on
    48 × 80 structured noise moves by 1.6e-4 under 1e-7 relative input noise).
    ``test_inputs_are_well_conditioned`` checks this on the CPU.
    """
    m, n = shape
    r = min(m, n)
    sigma = ratio ** torch.arange(r, dtype=torch.float32)

    def one() -> Tensor:
        left, _ = torch.linalg.qr(torch.randn(m, r, generator=generator))
        right, _ = torch.linalg.qr(torch.randn(n, r, generator=generator))
        return (left * sigma) @ right.mT

    shared = one()
    return [scale * (shared + one()) for _ in range(k)]


def state_dicts(k: int, dtype: torch.dtype, seed: int = 0
                ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """θ0 ~ N(0, 0.02²) (norms 1) and K experts θ0 + τ_i, τ_i from ``decaying_task_vectors``
    for matrices, small Gaussian elsewhere; rounded to ``dtype`` (τ_i then is what remains)."""
    gen = torch.Generator().manual_seed(seed)
    base: dict[str, Tensor] = {}
    experts: list[dict[str, Tensor]] = [{} for _ in range(k)]
    for name, shape in SHAPES.items():
        if len(shape) == 2:
            theta0 = 0.02 * torch.randn(shape, generator=gen)
            taus = decaying_task_vectors((shape[0], shape[1]), k, gen)
        else:
            theta0 = torch.ones(shape)
            taus = [2e-3 * torch.randn(shape, generator=gen) for _ in range(k)]
        base[name] = theta0.to(dtype)
        for sd, tau in zip(experts, taus, strict=True):
            sd[name] = (theta0 + tau).to(dtype)
    return base, experts


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.cuda
@needs_device
def test_every_method_on_device_matches_cpu(case: str, dtype: str) -> None:
    base, experts = state_dicts(EXPERTS.get(CASES[case]["merge_method"], 3), DTYPES[dtype])
    recipe = {**CASES[case], "out_dtype": "float32"}  # compare before any rounding to bf16
    if case == "wudi":
        recipe["parameters"] = {"iterations": 50}
    cpu = specmerge.merge_state_dicts(recipe, base, experts, device="cpu")
    dev = specmerge.merge_state_dicts(recipe, base, experts, device=DEVICE)
    assert list(dev) == list(cpu)
    for name, want in cpu.items():
        got = dev[name]
        assert got.device.type == "cpu" and got.dtype == want.dtype, name
        update = want - base[name].float()
        err = relative_error(got, want, update)
        assert err <= RTOL, (f"{case} ({dtype} inputs) on {DEVICE}: {name} differs from the "
                             f"CPU by {err:.2e} of the merged update's norm")


def matrix_inputs(shape: tuple[int, int], dtype: torch.dtype) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [t.to(dtype) for t in decaying_task_vectors(shape, 4, gen)]


def _call(name: str) -> Callable[[Sequence[Tensor]], Tensor]:
    if name in CALIBRATIONS:
        return lambda taus: dense(svc(task_arithmetic(taus, scaling=0.3), taus))
    method = next(m for m in all_methods() if m.name == name)
    kwargs: dict[str, Any] = {"iterations": 50} if name == "wudi" else {}
    return lambda taus: dense(method.fn(list(taus), **kwargs))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", MATRIX_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", [m.name for m in all_methods() if m.matrix_only])
@pytest.mark.cuda
@needs_device
def test_matrix_method_upcasts_on_device(name: str, shape: tuple[int, int], dtype: str) -> None:
    """The function itself on task vectors that reach the device in their own dtype and are
    upcast to float32 there, against the same on the CPU."""
    taus = matrix_inputs(shape, DTYPES[dtype])
    fn = _call(name)
    want = fn([t.float() for t in taus])
    got = fn([t.to(DEVICE).float() for t in taus])
    assert got.device.type == torch.device(DEVICE).type
    assert got.dtype == want.dtype == torch.float32
    err = relative_error(got, want, want)
    assert err <= RTOL, f"{name} on {DEVICE}, {shape} {dtype}: {err:.2e} relative to the CPU"


@pytest.mark.parametrize("name", [m.name for m in all_methods() if m.matrix_only])
def test_inputs_are_well_conditioned(name: str) -> None:
    """Runs everywhere: the CUDA comparison is meaningful only if rounding-sized changes of the
    inputs (1e-7 relative, like one device's roundings against another's) move each method's
    result well within RTOL; with a flat spectrum they need not."""
    gen = torch.Generator().manual_seed(2)
    fn = _call(name)
    for shape in MATRIX_SHAPES:
        taus = [t.float() for t in matrix_inputs(shape, torch.bfloat16)]
        want = fn(taus)
        for _ in range(2):
            noisy = [t * (1 + 1e-7 * torch.randn(t.shape, generator=gen)) for t in taus]
            err = relative_error(fn(noisy), want, want)
            assert err <= RTOL / 3, f"{name} {shape}: {err:.2e} under 1e-7 input noise"


def quickstart_recipe(root: Path) -> dict[str, Any]:
    """examples/quickstart.yaml with its models written under ``root``."""
    write_example_models(root, QUICKSTART, 3, progress=False)
    recipe = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    recipe["base_model"] = str(root / "base")
    recipe["models"] = [
        {**m, "model": str(root / Path(m["model"]).name)} if isinstance(m, dict)
        else str(root / Path(m).name) for m in recipe["models"]]
    return recipe


@pytest.mark.cuda
@needs_device
def test_quickstart_merge_on_device_matches_cpu(tmp_path: Path) -> None:
    recipe = quickstart_recipe(tmp_path / "models")
    cpu = specmerge.merge(recipe, tmp_path / "cpu", device="cpu", progress=False)
    dev = specmerge.merge(recipe, tmp_path / "dev", device=DEVICE, progress=False)
    assert cpu.peak_gpu_mb is None
    if torch.device(DEVICE).type == "cuda":
        assert dev.peak_gpu_mb is not None and dev.peak_gpu_mb > 0
    assert (dev.num_tensors, dev.num_params, dev.counts) == (cpu.num_tensors, cpu.num_params,
                                                             cpu.counts)
    base = load_file(str(tmp_path / "models" / "base" / "model.safetensors"))
    want, got = (load_file(str(p / "model.safetensors")) for p in (cpu.out_dir, dev.out_dir))
    assert list(got) == list(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype, name
        update = w.float() - base[name].float()
        if not update.any():
            assert torch.equal(got[name], w), name
            continue
        err = relative_error(got[name], w, update)
        assert err <= RTOL, f"{name}: the {DEVICE} merge differs by {err:.2e} of its update"


def test_peak_gpu_memory_is_none_on_cpu(tmp_path: Path) -> None:
    """Runs everywhere: on the CPU ``MergeResult`` reports no GPU memory, and the CLI's summary
    leaves it out."""
    from typer.testing import CliRunner

    from specmerge.cli import app

    recipe = quickstart_recipe(tmp_path / "models")
    assert specmerge.merge(recipe, tmp_path / "out", progress=False).peak_gpu_mb is None
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "cli"), "-q"])
    assert res.exit_code == 0, res.output
    assert "peak RSS" in res.output and "GPU peak" not in res.output
