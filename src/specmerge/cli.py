"""The command line: a thin layer over the Python API. Errors print as one line, exit 1."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from specmerge import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="specmerge: data-free model merging (SVC, SWUDI and the baselines).")
example_app = typer.Typer(no_args_is_help=True, help="Write example checkpoints.")
app.add_typer(example_app, name="example")

try:  # the benchmark ships in the same package; its heavy imports are lazy
    from specmerge.bench.cli import app as bench_app
except ImportError:  # pragma: no cover - bench package absent in a partial install
    bench_app = None
if bench_app is not None:
    app.add_typer(bench_app, name="bench", help="Real-model benchmarks (needs the [bench] extra).")

log = logging.getLogger("specmerge")


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(1)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"specmerge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    out: Annotated[Path, typer.Argument(help="Output directory (HF format).")],
    device: Annotated[str, typer.Option(help="cpu or cuda (cuda:N).")] = "cpu",
    dtype: Annotated[Optional[str], typer.Option(  # noqa: UP045 (typer needs Optional)
        help="Compute dtype override: float32 or float64.")] = None,
    shard_size: Annotated[str, typer.Option(help="Max shard size, e.g. 5GB, 500MB.")] = "5GB",
    workers: Annotated[int, typer.Option(min=1, help="Parameters merged at once (threads).")] = 1,
    force: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Seed override.")] = None,  # noqa: UP045
    allow_nonfinite: Annotated[bool, typer.Option(
        help="Merge even if a tensor holds NaN/Inf.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Merge the experts of RECIPE into OUT."""
    from specmerge.engine import merge as run_merge
    from specmerge.errors import SpecmergeError

    try:
        res = run_merge(recipe, out, device=device, dtype=dtype, shard_size=shard_size,
                        workers=workers, force=force, seed=seed, allow_nonfinite=allow_nonfinite,
                        progress=not quiet)
    except (SpecmergeError, ValueError) as err:
        _fail(err)
    else:
        typer.echo(f"wrote merged model to {res.out_dir} ({res.num_tensors} tensors, "
                   f"{res.num_params:,} parameters, {res.seconds:.1f} s, "
                   f"peak RSS {res.peak_rss_mb:.0f} MB)")


@app.command()
def methods(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the methods: family, parameters with defaults, and references."""
    from specmerge.methods import all_methods

    ms = all_methods()
    if as_json:
        typer.echo(json.dumps([{
            "name": m.name, "family": m.family, "summary": m.summary, "citation": m.citation,
            "matrix_only": m.matrix_only,
            "parameters": {p.name: {"default": p.default, "type": p.type_name, "doc": p.doc,
                                    "choices": p.choices, "range": p.range} for p in m.params},
        } for m in ms], indent=2))
        return
    family = None
    for m in ms:
        if m.family != family:
            family = m.family
            title = "calibration (use as calibrate: {method: NAME})" if family == "calibration" \
                else f"{family} methods"
            typer.echo(f"\n== {title}")
        scope = "matrix params; others take the scope fallback" if m.matrix_only and \
            not m.is_calibration else ("matrix params only" if m.is_calibration else
                                       "every floating param")
        typer.echo(f"\n{m.name}  [{scope}]\n  {m.summary}\n  ref: {m.citation}")
        for p in m.params:
            extra = f" one of {list(p.choices)}" if p.choices else (
                f" in {p.range}" if p.range else "")
            typer.echo(f"    {p.name} = {p.default!r}  ({p.type_name}{extra}): {p.doc}")
        if m.notes:
            typer.echo(f"  note: {m.notes}")


@app.command()
def inspect(path: Annotated[Path, typer.Argument(help="Checkpoint file or HF directory.")],
            top: Annotated[int, typer.Option(help="How many largest tensors to list.")] = 10,
            ) -> None:
    """Parameter count, dtypes, shard layout and the largest tensors of a checkpoint."""
    from specmerge.errors import SpecmergeError
    from specmerge.io.checkpoint import Checkpoint

    try:
        ck = Checkpoint(path)
    except SpecmergeError as err:
        _fail(err)
    dtypes: dict[str, int] = {}
    for info in ck.infos.values():
        key = str(info.dtype).removeprefix("torch.")
        dtypes[key] = dtypes.get(key, 0) + info.numel
    typer.echo(f"{ck.path}\n  tensors: {len(ck)}\n  parameters: {ck.num_params():,}")
    typer.echo("  dtypes: " + ", ".join(f"{k} {v:,}" for k, v in sorted(dtypes.items())))
    typer.echo(f"  files ({len(ck.files)}):")
    for f in ck.files:
        n = sum(1 for i in ck.infos.values() if i.file == f)
        typer.echo(f"    {f.name}: {n} tensors, {f.stat().st_size / 1e6:.1f} MB")
    typer.echo(f"  largest {min(top, len(ck))} tensors:")
    for info in sorted(ck.infos.values(), key=lambda i: -i.numel)[:top]:
        typer.echo(f"    {info.name}: {list(info.shape)} {str(info.dtype).removeprefix('torch.')}")


@app.command()
def diagnose(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    param: Annotated[str, typer.Argument(help="Name of a 2-D parameter, e.g. "
                                               "model.layers.0.mlp.up_proj.weight.")],
    plot: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Write the spectrum plot (PNG) here; needs matplotlib.")] = None,
    top: Annotated[int, typer.Option(help="Singular directions to list.")] = 8,
) -> None:
    """Spectral diagnostics of the recipe's merge on one parameter: inflation, s_i^r, SVC's γ."""
    from specmerge.diagnostics import plot_spectrum, spectral_report
    from specmerge.engine import PlanEntry, merge_update
    from specmerge.errors import SpecmergeError
    from specmerge.io.checkpoint import Checkpoint
    from specmerge.recipe import load_recipe

    try:
        rec = load_recipe(recipe)
        base = Checkpoint(rec.base_model)
        if param not in base.infos or len(base.infos[param].shape) != 2:
            raise SpecmergeError(f"{base.path}: no 2-D parameter named {param!r}")
        theta0 = base.read(param).float()
        taus = [Checkpoint(m.model).read(param).float() - theta0 for m in rec.models]
        entry = PlanEntry(param, tuple(theta0.shape), theta0.dtype, "method", calibrate=False)
        merged = merge_update(entry, taus, rec)
        alpha = (rec.calibrate or {}).get("alpha")
        report = spectral_report(merged, taus, alpha=alpha)
    except (SpecmergeError, ValueError) as err:
        _fail(err)
    typer.echo(f"{param} under {rec.merge_method}:\n{report.summary(top)}")
    if plot is not None:
        typer.echo(f"wrote {plot_spectrum(report, plot, title=f'{param} ({rec.merge_method})')}")


@example_app.command("quickstart")
def example_quickstart(
    directory: Annotated[Path, typer.Argument(help="Where to write base/ and expert_1..3/.")],
) -> None:
    """Tiny Llama-shaped base and 3 experts for examples/quickstart.yaml."""
    from specmerge.examples import QUICKSTART, write_example_models

    try:
        dirs = write_example_models(directory, QUICKSTART, 3, progress=False)
    except (FileExistsError, OSError) as err:
        _fail(err)
    typer.echo("wrote " + ", ".join(str(d) for d in dirs))


@example_app.command("synthetic")
def example_synthetic(
    directory: Annotated[Path, typer.Argument(help="Where to write base/ and expert_i/.")],
    params: Annotated[str, typer.Option(help="Model size, e.g. 500M, 1.5B.")] = "500M",
    experts: Annotated[int, typer.Option(min=1, help="Number of experts K.")] = 4,
    dtype: Annotated[str, typer.Option(help="float32, bf16 or fp16.")] = "float32",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """A Llama-shaped base and K experts (shared + task low-rank + noise task vectors)."""
    from specmerge.examples import llama_shape_for, parse_count, write_example_models

    try:
        shape = llama_shape_for(parse_count(params))
        dirs = write_example_models(directory, shape, experts, dtype=dtype, seed=seed)
    except (FileExistsError, OSError, ValueError) as err:
        _fail(err)
    typer.echo(f"wrote {len(dirs)} checkpoints of {shape.num_params():,} parameters "
               f"({shape}) under {Path(directory).resolve()}")


def main() -> None:
    app(prog_name="specmerge")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
