"""Spectral diagnostics and ``specmerge analyze``: agreement with SVC, closed forms and direct
computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_state_dicts, recipe_for, write_hf_dir
from safetensors.torch import save_file
from typer.testing import CliRunner

from specmerge.analysis import analyze, diagnose
from specmerge.cli import app
from specmerge.diagnostics import (
    effective_rank,
    matrix_metrics,
    spectral_report,
    subspace_overlap,
)
from specmerge.io.plots import plot_spectrum
from specmerge.methods.calibration import svc
from specmerge.methods.elementwise import task_arithmetic
from specmerge.methods.interference import RANK_RULES, swudi
from specmerge.methods.registry import UnboundRankWarning, get_method

runner = CliRunner()


def test_identical_experts_report() -> None:
    tau = torch.randn(12, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    taus = [tau.clone() for _ in range(4)]
    merged = task_arithmetic(taus, scaling=0.3)  # = 1.2 τ: every s_i^r = 1.2
    rep = spectral_report(merged, taus)
    torch.testing.assert_close(rep.responses, torch.full((4, 7), 1.2, dtype=torch.float64))
    torch.testing.assert_close(rep.gamma, torch.full((7,), 1 / 1.2, dtype=torch.float64))
    torch.testing.assert_close(rep.sigma_calibrated, torch.linalg.svdvals(tau))
    assert abs(rep.inflation - 1.2) < 1e-12
    metrics, _ = matrix_metrics(merged, taus, alpha=None, rank_ratio=0.65)
    assert metrics.overlap == pytest.approx(1.0)  # one shared subspace
    assert metrics.gamma_min == pytest.approx(1 / 1.2) == metrics.gamma_max


def test_report_matches_svc_output_spectrum(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(10, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    merged = task_arithmetic(taus)
    rep = spectral_report(merged, taus)
    out_sigma = torch.linalg.svdvals(svc(merged, taus))
    torch.testing.assert_close(out_sigma, rep.sigma_calibrated.sort(descending=True).values)
    assert ((rep.gamma > 0) & (rep.gamma <= 3.0 + 1e-12)).all()  # γ ∈ (0, 1/α], α = 1/3
    png = plot_spectrum(rep.sigma_tasks, rep.sigma_merged, rep.sigma_calibrated,
                        tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlap_closed_forms() -> None:
    eye = torch.eye(6, dtype=torch.float64)
    assert subspace_overlap([eye[:, :2], eye[:, 2:4]]) == 0.0  # orthogonal subspaces
    assert subspace_overlap([eye[:, :2], eye[:, :2]]) == 1.0
    # a 45° rotation of one of two directions: ‖U_1ᵀU_2‖² = 1 + 1/2, over k = 2
    rot = torch.stack([eye[:, 0], (eye[:, 1] + eye[:, 2]) / math.sqrt(2)], dim=1)
    assert subspace_overlap([eye[:, :2], rot]) == pytest.approx(0.75)
    assert math.isnan(subspace_overlap([eye[:, :2]]))
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)


def _direct(base, experts, name):
    theta0 = base[name].double()
    taus = [e[name].double() - theta0 for e in experts]
    merged = 0.3 * sum(taus)  # task_arithmetic at its default λ
    return taus, merged


def test_analyze_report_metrics_match_direct_computation(toy_models, tmp_path) -> None:
    recipe = recipe_for(toy_models, "task_arithmetic", calibrate={"method": "svc"})
    out = analyze(recipe, tmp_path / "report", progress=False)
    report = json.loads((out / "report.json").read_text())
    assert (out / "index.html").is_file() and (out / "heatmaps.png").is_file()
    assert (out / "spectrum_1.png").read_bytes()[:4] == b"\x89PNG"
    rows = {r["name"]: r for r in report["matrices"]}
    # the scope's matrices, no embedding or head
    assert set(rows) == {"model.layers.0.self_attn.q_proj.weight",
                         "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"}
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        taus, merged = _direct(toy_models["base_sd"], toy_models["expert_sds"], name)
        sig = torch.linalg.svdvals(merged)
        inflation = float(sig[0] / max(torch.linalg.svdvals(t)[0] for t in taus))
        assert rows[name]["inflation"] == pytest.approx(inflation, rel=1e-4)
        # γ by the SVC rule at α = 1/K, from its definition
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
        resp = torch.stack([s * ((u.T @ t) * vh).sum(1) / (u.T @ t).square().sum(1)
                            for t in taus])
        gamma = 3 / resp.clamp_min(1 / 3).sum(0)
        assert rows[name]["gamma_max"] == pytest.approx(float(gamma.max()), rel=1e-4)
        assert rows[name]["gamma_min"] == pytest.approx(float(gamma.min()), rel=1e-4)
        # C's trace share kept by SWUDI's top-k, k = ⌊0.65 n + 0.999⌋
        w = [1 / float(t.square().sum()) for t in taus]
        lam = torch.linalg.eigvalsh(sum(wi * t.T @ t for wi, t in zip(w, taus, strict=True)))
        lam = lam.flip(0).clamp_min(1e-8)
        k = math.floor(lam.numel() * 0.65 + 0.999)
        assert rows[name]["swudi_rank"] == k
        assert rows[name]["swudi_trace_share"] == pytest.approx(float(lam[:k].sum() / lam.sum()),
                                                                rel=1e-4)
        assert set(rows[name]["swudi_a_ranks"]) == set(RANK_RULES)
        assert rows[name]["rank_c"] == rows[name]["n"]  # full rank
        assert not rows[name]["truncation_cannot_bind"]
    html = (out / "index.html").read_text()
    assert "heatmaps.png" in html and "spectrum_1.png" in html and "report.json" in html
    # full-rank experts: the truncation binds everywhere, no verdict
    assert report["summary"]["cannot_bind"] == 0 and report["summary"]["touched"] == 3
    assert "Will the truncation bind?" not in html and 'src="gamma.png"' in html


def test_analyze_refuses_existing_out_and_non_matrix_params(toy_models, tmp_path) -> None:
    from specmerge.errors import OutputError, SpecmergeError

    recipe = recipe_for(toy_models)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        analyze(recipe, tmp_path / "taken", progress=False)
    with pytest.raises(SpecmergeError, match="not a matrix parameter under the recipe's scope"):
        analyze(recipe, tmp_path / "r", params=["model.embed_tokens.weight"], progress=False)
    with pytest.raises(SpecmergeError, match="no parameter named 'nope'"):
        diagnose(recipe, "nope")
    assert not (tmp_path / "r").exists()


def test_diagnose_honours_the_scope(toy_models) -> None:
    from specmerge.errors import SpecmergeError

    name = "model.layers.0.mlp.up_proj.weight"
    res = diagnose(recipe_for(toy_models), name)
    assert res.report is not None and res.metrics.n == 8
    with pytest.raises(SpecmergeError, match="not a matrix parameter"):
        diagnose(recipe_for(toy_models, scope={"exclude": ["mlp"]}), name)


# ------------------------------------------------------------------------------------------
# what predicts a low-rank merge: rank C against k, norms against task arithmetic, the tasks'
# input spaces, the scale of scaling: auto (issue 23)
# ------------------------------------------------------------------------------------------

def _rank1(m: int, n: int, i: int, j: int, c: float = 1.0) -> torch.Tensor:
    """c · e_i f_jᵀ in R^{m×n}."""
    t = torch.zeros(m, n, dtype=torch.float64)
    t[i, j] = c
    return t


def test_two_orthogonal_rank_one_tasks_closed_form() -> None:
    taus = [_rank1(5, 4, 0, 0, 2.0), _rank1(5, 4, 1, 1, 2.0)]
    merged = taus[0] + taus[1]
    m, rep = matrix_metrics(merged, taus, alpha=None, rank_ratio=0.65)
    assert m.rank_c == 2 and m.swudi_rank == 3 and m.truncation_cannot_bind
    assert m.input_overlap == 0.0 and m.overlap == 0.0  # k_top = 2 > rank 1: one vector each
    lam = get_method("task_arithmetic").defaults()["scaling"]
    assert m.norm_ratio_ta == pytest.approx(1 / lam)  # the sum against λ · the sum
    assert matrix_metrics(merged, taus, alpha=None, rank_ratio=0.65,
                          ta_scaling=0.5)[0].norm_ratio_ta == pytest.approx(2.0)
    assert m.auto_scale == pytest.approx(0.5)  # 1/K
    # γ on W_m's 2 directions: K / (1 + α) with α = 1/2; W_m's null directions (γ = 1/α) left out
    assert rep.rank == 2 and m.gamma_min == pytest.approx(4 / 3) == m.gamma_max
    assert m.swudi_trace_share == pytest.approx(1.0)
    # the merge that already delivers each task once (their mean · K/K): auto keeps it
    assert matrix_metrics(merged / 2, taus, alpha=None, rank_ratio=0.65)[0].auto_scale == \
        pytest.approx(1.0)
    # with rank_ratio 0.25, k = 1 ≤ rank C: the truncation binds
    assert not matrix_metrics(merged, taus, alpha=None, rank_ratio=0.25)[0].truncation_cannot_bind


def test_input_overlap_closed_forms() -> None:
    same_input = [_rank1(5, 4, 0, 0), _rank1(5, 4, 1, 0)]  # other outputs, one input direction
    m, _ = matrix_metrics(same_input[0] + same_input[1], same_input, alpha=None, rank_ratio=0.65)
    assert m.input_overlap == pytest.approx(1.0) and m.overlap == pytest.approx(0.0)
    assert m.rank_c == 1
    tilted = torch.zeros(5, 4, dtype=torch.float64)
    tilted[1, :2] = 1 / math.sqrt(2)  # e_2 ((f_1 + f_2)/√2)ᵀ: 45° from the first task's input
    m, _ = matrix_metrics(same_input[0] + tilted, [same_input[0], tilted], alpha=None,
                          rank_ratio=0.65)
    assert m.input_overlap == pytest.approx(0.5) and m.rank_c == 2


def test_full_rank_tasks_bind_and_a_zero_matrix_is_blank() -> None:
    g = torch.Generator().manual_seed(4)
    taus = [torch.randn(12, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    m, _ = matrix_metrics(task_arithmetic(taus), taus, alpha=None, rank_ratio=0.65)
    assert m.rank_c == 8 and m.swudi_rank == 6 and not m.truncation_cannot_bind
    assert m.auto_scale == pytest.approx(  # s* of λ Σ τ_i from its definition
        min(1.0, sum(float((task_arithmetic(taus) * t).sum()) / float(t.square().sum())
                     for t in taus)
            / (float(task_arithmetic(taus).square().sum())
               * sum(1 / float(t.square().sum()) for t in taus))))
    zero = [torch.zeros(6, 4, dtype=torch.float64)] * 2  # a module no adapter targets
    m, _ = matrix_metrics(zero[0], zero, alpha=None, rank_ratio=0.65)
    assert m.rank_c == 0 and m.truncation_cannot_bind and m.auto_scale == 1.0
    assert all(math.isnan(x) for x in (m.overlap, m.input_overlap, m.norm_ratio_ta,
                                       m.gamma_median))


LORA_TARGETS = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.mlp.up_proj": (12, 8)}


@pytest.fixture
def lora_recipe(tmp_path) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """The toy base and three hand-written rank-1 LoRA adapters on q_proj and up_proj
    (lora_alpha 2: s = 2), a SWUDI recipe over them, and their dense τ_i."""
    base, _ = make_state_dicts(k=0)
    bdir = write_hf_dir(tmp_path / "base", base)
    gen = torch.Generator().manual_seed(5)
    dirs, taus = [], []
    for i in range(3):
        path = tmp_path / f"ad{i}"
        path.mkdir()
        tensors, tau = {}, {}
        for module, (m, n) in LORA_TARGETS.items():
            a, b = torch.randn(1, n, generator=gen), torch.randn(m, 1, generator=gen)
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
            tau[f"{module}.weight"] = 2.0 * b.double() @ a.double()
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj", "up_proj"]}))
        dirs.append(str(path))
        taus.append(tau)
    recipe = {"base_model": str(bdir), "models": dirs, "merge_method": "swudi",
              "dtype": "float64"}
    return recipe, taus


def test_analyze_an_adapter_recipe(lora_recipe, tmp_path) -> None:
    recipe, taus = lora_recipe
    with pytest.warns(UnboundRankWarning):
        out = analyze(recipe, tmp_path / "report", progress=False)
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["matrices"]}
    for name in (f"{m}.weight" for m in LORA_TARGETS):
        ts = [t[name] for t in taus]
        with pytest.warns(UnboundRankWarning):
            want, _ = matrix_metrics(swudi(ts), ts, alpha=None, rank_ratio=0.65)
        r = rows[name]
        assert r["rank_c"] == 3 and r["swudi_rank"] == 6 and r["truncation_cannot_bind"]
        for key in ("norm_ratio_ta", "input_overlap", "auto_scale", "gamma_median"):
            assert r[key] == pytest.approx(getattr(want, key), rel=1e-6), (name, key)
        assert 0 < r["auto_scale"] < 1
    down = rows["model.layers.0.mlp.down_proj.weight"]  # no adapter targets it: τ_i = 0
    assert down["rank_c"] == 0 and down["norm_ratio_ta"] is None
    summary = report["summary"]
    assert summary["touched"] == 2 and summary["cannot_bind"] == 2
    assert summary["rank_c_median"] == 3 and summary["swudi_rank_median"] == 6
    assert summary["auto_scale_median"] == pytest.approx(
        (rows[f"{next(iter(LORA_TARGETS))}.weight"]["auto_scale"]
         + rows["model.layers.0.mlp.up_proj.weight"]["auto_scale"]) / 2)
    html = (out / "index.html").read_text()
    assert (out / "gamma.png").read_bytes()[:4] == b"\x89PNG" and 'src="gamma.png"' in html
    assert "Will the truncation bind?" in html and "preset: qwen2vl-lora" in html
    assert "scaling: auto" in html and "left out of the medians" in html
    for word in ("rank C", "input overlap", "‖W_m‖/‖TA‖", "auto scale"):
        assert f"<th>{word}</th>" in html and f"<b>{word}" in html


def test_the_cli_echoes_the_new_metrics(lora_recipe, tmp_path) -> None:
    recipe, _ = lora_recipe
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    res = runner.invoke(app, ["analyze", str(path), "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 0, res.output
    assert "k 6 against rank C 3; k > rank C in 2 of 2" in res.output
    assert "preset: qwen2vl-lora} or scaling: auto" in res.output
    res = runner.invoke(app, ["diagnose", str(path), "model.layers.0.mlp.up_proj.weight"])
    assert res.exit_code == 0, res.output
    assert "rank C = 3 against SWUDI's k = 6: the truncation cannot bind" in res.output
    assert "scaling: auto would choose 0." in res.output and "inputs " in res.output


def test_heat_map_colours_do_not_shade_rounding_errors() -> None:
    from specmerge.io.plots import _color_range

    lo, hi = _color_range([[0.9999998325, 0.99999983], [math.nan, 0.9999998]])
    assert lo < 0.6 and hi > 1.4  # agree to 1e-6: one colour, not a shade per rounding error
    assert _color_range([[0.1, 0.5], [math.nan, 0.3]]) == (0.1, 0.5)
    assert _color_range([[math.nan]]) == (None, None)
