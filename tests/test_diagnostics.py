"""Spectral diagnostics and ``specmerge analyze``: agreement with SVC, closed forms and direct
computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import recipe_for

from specmerge.analysis import analyze, diagnose
from specmerge.diagnostics import (
    effective_rank,
    matrix_metrics,
    spectral_report,
    subspace_overlap,
)
from specmerge.io.plots import plot_spectrum
from specmerge.methods.calibration import svc
from specmerge.methods.elementwise import task_arithmetic
from specmerge.methods.interference import RANK_RULES


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
    html = (out / "index.html").read_text()
    assert "heatmaps.png" in html and "spectrum_1.png" in html and "report.json" in html


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
