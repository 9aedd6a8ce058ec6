"""Spectral diagnostics agree with SVC and with closed forms."""

from __future__ import annotations

import torch

from specmerge.diagnostics import plot_spectrum, spectral_report
from specmerge.methods.calibration import svc
from specmerge.methods.elementwise import task_arithmetic


def test_identical_experts_report() -> None:
    tau = torch.randn(12, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    taus = [tau.clone() for _ in range(4)]
    merged = task_arithmetic(taus, scaling=0.3)  # = 1.2 τ: every s_i^r = 1.2
    rep = spectral_report(merged, taus)
    torch.testing.assert_close(rep.responses, torch.full((4, 7), 1.2, dtype=torch.float64))
    torch.testing.assert_close(rep.gamma, torch.full((7,), 1 / 1.2, dtype=torch.float64))
    torch.testing.assert_close(rep.sigma_calibrated, torch.linalg.svdvals(tau))
    assert abs(rep.inflation - 1.2) < 1e-12


def test_report_matches_svc_output_spectrum(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(10, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    merged = task_arithmetic(taus)
    rep = spectral_report(merged, taus)
    out_sigma = torch.linalg.svdvals(svc(merged, taus))
    torch.testing.assert_close(out_sigma, rep.sigma_calibrated.sort(descending=True).values)
    assert ((rep.gamma > 0) & (rep.gamma <= 3.0 + 1e-12)).all()  # γ ∈ (0, 1/α], α = 1/3
    png = plot_spectrum(rep, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
