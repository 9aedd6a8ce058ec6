"""``specmerge analyze``: the spectral diagnostics of a recipe's merge, for every matrix.

The same Source → Plan → Backend path as a merge, with another step and sink: per matrix
parameter the step forms the recipe's base merge W_m (without calibration) and computes
``diagnostics.matrix_metrics``; the report sink writes ``report.json``, the heat maps, the
spectra and ``index.html``. Memory and progress are those of a merge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specmerge.diagnostics import MatrixMetrics, SpectralReport, matrix_metrics
from specmerge.engine import (
    execute,
    make_backend,
    merged_update,
    plan_of,
    resolve_device,
    run_statistics,
)
from specmerge.errors import SpecmergeError
from specmerge.io.plots import require_matplotlib
from specmerge.io.report import ReportSink
from specmerge.io.writer import check_output_path, output_path
from specmerge.methods.registry import get_method
from specmerge.plan import Plan, PlanEntry
from specmerge.recipe import Recipe, load_recipe, recipe_files
from specmerge.sources import CheckpointSource, Source

# the rank ratio whose top-k trace share is reported, unless the recipe's method sets one
SWUDI_METHOD = "swudi"
CALIBRATION_METHOD = "svc"  # whose γ the report shows


@dataclass(frozen=True)
class MatrixAnalysis:
    """One matrix's metrics, its spectra (σ of each τ_i, of W_m, after SVC), SVC's γ_r on W_m's
    numerical rank, and for ``diagnose`` the full spectral report."""

    name: str
    shape: tuple[int, ...]
    metrics: MatrixMetrics
    sigma_tasks: list[list[float]]
    sigma_merged: list[float]
    sigma_calibrated: list[float]
    gamma: list[float]
    report: SpectralReport | None = None


@dataclass(frozen=True)
class AnalyzeStep:
    statistics: Mapping[str, Any]
    device: str
    compute_dtype: torch.dtype
    alpha: float | None
    rank_ratio: float
    keep_report: bool = False

    def __call__(self, entry: PlanEntry, source: Source) -> MatrixAnalysis:
        tv = source.task_vectors(entry.name, torch.device(self.device), self.compute_dtype)
        merged = merged_update(dataclasses.replace(entry, calibrate=False), tv.taus, None,
                               self.statistics, base=tv.theta0)
        # the metrics of the whole matrix in (out, in) orientation (a fused one unsplit)
        taus = [t.mT.contiguous() if entry.transpose else t for t in tv.taus]
        metrics, rep = matrix_metrics(merged.mT.contiguous() if entry.transpose else merged, taus,
                                      alpha=self.alpha, rank_ratio=self.rank_ratio)
        return MatrixAnalysis(entry.name, entry.shape, metrics,
                              [s.tolist() for s in rep.sigma_tasks], rep.sigma_merged.tolist(),
                              rep.sigma_calibrated.tolist(), rep.gamma_kept.tolist(),
                              rep if self.keep_report else None)


def calibration_params(rec: Recipe) -> dict[str, Any]:
    """The recipe's calibration parameters with the calibration method's defaults filled in,
    from the registry (SVC's when the recipe has no calibration: analyze reports SVC's γ)."""
    given = dict(rec.calibrate or {})
    method = get_method(given.pop("method", CALIBRATION_METHOD))
    return {**method.defaults(), **given}


def _settings(rec: Recipe) -> tuple[float | None, float]:
    alpha = calibration_params(rec).get("alpha")
    rank_ratio = rec.parameters.get("rank_ratio",
                                    get_method(SWUDI_METHOD).defaults()["rank_ratio"])
    return alpha, rank_ratio


def _prepare(recipe: Recipe | dict[str, Any] | str | Path, dtype: str | None, device: str,
             workers: int, progress: bool, allow_nonfinite: bool
             ) -> tuple[Recipe, CheckpointSource, Plan, AnalyzeStep, Any]:
    rec = load_recipe(recipe, dtype=dtype)
    backend = make_backend(workers)
    dev = resolve_device(device)
    source = CheckpointSource.from_recipe(rec, allow_nonfinite)
    plan = plan_of(rec, source)
    alpha, rank_ratio = _settings(rec)
    step = AnalyzeStep({}, dev, plan.compute_dtype, alpha, rank_ratio)
    return rec, source, plan, step, backend


def _matrix_entries(plan: Plan, names: Sequence[str]) -> list[PlanEntry]:
    by_name = {e.name: e for e in plan.entries}
    for n in names:
        entry = by_name.get(n)
        if entry is None:
            close = [e.name for e in plan.entries if n.split(".")[-2:] == e.name.split(".")[-2:]]
            hint = f"; e.g. {close[0]}" if close else ""
            raise SpecmergeError(f"the base has no parameter named {n!r}{hint}")
        if not entry.matrix:
            raise SpecmergeError(
                f"{n!r} (shape {list(entry.shape)}) is not a matrix parameter under the recipe's "
                f"scope (2-D, floating, matching none of exclude {plan.recipe.scope.exclude})")
    return [e for e in plan.entries if e.matrix]


def analyze(recipe: Recipe | dict[str, Any] | str | Path, out_dir: str | Path, *,
            params: Sequence[str] = (), device: str = "cpu", dtype: str | None = None,
            workers: int = 1, force: bool = False, allow_nonfinite: bool = False,
            progress: bool = True) -> Path:
    """Write the spectral report of the recipe's merge to ``out_dir``: ``index.html``,
    ``report.json``, ``heatmaps.png`` and the Figure-2 spectra of ``params`` (default: the most
    and the least inflated matrix). Returns ``out_dir``."""
    require_matplotlib()
    rec, source, plan, step, backend = _prepare(recipe, dtype, device, workers, progress,
                                                allow_nonfinite)
    out = output_path(out_dir)
    claim = check_output_path(out, [*source.paths, *recipe_files(recipe)], force)
    entries = _matrix_entries(plan, params)
    if not entries:
        raise SpecmergeError(f"no matrix parameter under the recipe's scope (exclude "
                             f"{rec.scope.exclude}): nothing to analyze")
    stats = run_statistics(plan, source, backend, step.device, progress)
    step = dataclasses.replace(step, statistics=stats)
    sink = ReportSink(out, plan, spectra=list(params), alpha=step.alpha,
                      rank_ratio=step.rank_ratio, replace=claim)
    result: Path = execute(step, entries, source, backend, sink, desc="analyzing",
                           progress=progress)
    return result


def diagnose(recipe: Recipe | dict[str, Any] | str | Path, param: str, *,
             device: str = "cpu", dtype: str | None = None, allow_nonfinite: bool = False
             ) -> MatrixAnalysis:
    """``analyze`` restricted to one matrix parameter, with the full spectral report."""
    rec, source, plan, step, backend = _prepare(recipe, dtype, device, 1, False, allow_nonfinite)
    entry = next(e for e in _matrix_entries(plan, [param]) if e.name == param)
    stats = run_statistics(plan, source, backend, step.device, False)
    return dataclasses.replace(step, statistics=stats, keep_report=True)(entry, source)
