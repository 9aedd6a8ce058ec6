"""The command line: a thin layer over the Python API. Errors print as one line, exit 1."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from specmerge._version import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="specmerge: data-free model merging (SVC, SWUDI and the baselines).")
example_app = typer.Typer(no_args_is_help=True, help="Write example checkpoints.")
app.add_typer(example_app, name="example")

log = logging.getLogger("specmerge")


def _fail(err: Exception) -> None:
    from specmerge.errors import Interrupted

    if "--debug" in sys.argv[1:]:
        raise err
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(128 + err.signum if isinstance(err, Interrupted) else 1)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"specmerge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the Python traceback of an "
                                                        "error (see main).")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # a method's warning (a rank setting that cannot bind, say) is one log line, once per text
    warnings.showwarning = lambda message, category, *args, **kw: log.warning("%s", message)


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    out: Annotated[Path, typer.Argument(help="Output directory (HF format, or a PEFT adapter "
                                                   "with --output-format peft).")],
    device: Annotated[str, typer.Option(help="cpu or cuda (cuda:N).")] = "cpu",
    dtype: Annotated[Optional[str], typer.Option(  # noqa: UP045 (typer needs Optional)
        help="Compute dtype override: float32 or float64.")] = None,
    shard_size: Annotated[str | None, typer.Option(
        help="Max shard size, e.g. 5GB (the default), 500MB.", show_default=False)] = None,
    workers: Annotated[int, typer.Option(min=1, help="Parameters merged at once (threads).")] = 1,
    block_size: Annotated[str | None, typer.Option(
        help="Largest tensor block held per input, in the compute dtype, where a parameter is "
             "merged in row blocks (element-wise methods and fallbacks on safetensors "
             "inputs), e.g. 8MiB (the default); never changes the output.",
        show_default=False)] = None,
    prefetch: Annotated[bool | None, typer.Option(
        "--prefetch/--no-prefetch",
        help="Read the next row block while one is merged, and write the last one, on two "
             "threads (3K + 6 blocks in memory instead of 2K + 4 for float32 inputs); on by "
             "default; never changes the output.", show_default=False)] = None,
    force: Annotated[bool, typer.Option(
        help="Replace an existing OUT that is a previous specmerge output (or empty): the old "
             "OUT is deleted once the new one is complete (only the one that was there at the "
             "start). Anything else, and a symbolic link, is refused.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Seed override.")] = None,  # noqa: UP045
    allow_nonfinite: Annotated[bool, typer.Option(
        help="Merge even if a tensor holds NaN/Inf.")] = False,
    output_format: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="hf (a full checkpoint) or peft (a LoRA adapter; every expert must be one). "
             "Overrides the recipe's output.format.")] = None,
    rank: Annotated[Optional[int], typer.Option(  # noqa: UP045
        min=1, help="Largest rank per weight of a peft output (default: the largest rank "
                    "among the experts' adapters). Overrides output.rank.")] = None,
    backend: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="local (this process, --workers threads) or ray (tasks on a Ray cluster; needs "
             "specmerge[ray] and a file system every node sees). Overrides the recipe's "
             "backend.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="The Ray cluster's address, e.g. 10.0.0.1:6379 or auto (default: RAY_ADDRESS, "
             "else the cluster `ray start` last started on this machine, else a new local "
             "one).")] = None,
    ray_gpus: Annotated[Optional[float], typer.Option(  # noqa: UP045
        min=0, help="GPUs each Ray task asks for with --device cuda (default 1; 0.5 puts two "
                    "tasks on a GPU).")] = None,
    ray_cpus: Annotated[Optional[float], typer.Option(  # noqa: UP045
        min=0, help="CPUs each Ray task asks for (default: the driver's torch threads, which "
                    "every task computes with, at most the largest node's CPUs).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Merge the experts of RECIPE into OUT."""
    from specmerge.engine import merge as run_merge
    from specmerge.errors import SpecmergeError

    try:
        res = run_merge(recipe, out, device=device, dtype=dtype, shard_size=shard_size,
                        workers=workers, force=force, seed=seed, allow_nonfinite=allow_nonfinite,
                        output_format=output_format, rank=rank, block_size=block_size,
                        backend=backend, ray_address=ray_address, ray_gpus=ray_gpus,
                        ray_cpus=ray_cpus, progress=not quiet, prefetch=prefetch)
    except (SpecmergeError, ValueError) as err:
        _fail(err)
    else:
        what = ("LoRA adapter" if res.recipe.output is not None
                and res.recipe.output.format == "peft" else "merged model")
        typer.echo(f"wrote {what} to {res.out_dir} ({res.num_tensors} tensors, "
                   f"{res.num_params:,} parameters, {res.seconds:.1f} s, "
                   f"peak RSS {res.peak_rss_mb:.0f} MB"
                   + ("" if res.peak_gpu_mb is None else f", GPU peak {res.peak_gpu_mb:.0f} MB")
                   + ")")


@app.command()
def plan(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """What the merge would do to every tensor: its role, action, function and output dtype.
    Reads only the checkpoints' headers."""
    from specmerge.engine import DEFAULT_BLOCK_SIZE, plan_recipe
    from specmerge.errors import SpecmergeError
    from specmerge.io.writer import parse_size
    from specmerge.memory import FORMULA, estimate

    try:
        p = plan_recipe(recipe)
    except (SpecmergeError, ValueError) as err:
        _fail(err)
    rows = [{"name": e.name, "shape": list(e.shape), "role": e.role, "action": e.action,
             "function": e.method, "transposed": e.transpose, "calibrated": e.calibrate,
             "out_dtype": str(e.out_dtype).removeprefix("torch.")} for e in p.entries]
    per_tensor = p.recipe.has_schedules
    if per_tensor:  # gradients and filters: each tensor's resolved values
        for r, e in zip(rows, p.entries, strict=True):
            r["values"] = {k: v for k, v in e.kwargs.items() if k not in p.recipe.parameters
                           or isinstance(p.recipe.parameters[k], list)}
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    width = max((len(r["name"]) for r in rows), default=6)
    typer.echo(f"{'tensor':<{width}}  {'shape':<14} {'role':<9} {'action':<8} "
               f"{'function':<16} calibrated  out dtype")
    for r in rows:
        fn = (r["function"] or "-") + (" (ᵀ)" if r["transposed"] else "")
        typer.echo(f"{r['name']:<{width}}  {'×'.join(map(str, r['shape'])) or '()':<14} "
                   f"{r['role']:<9} {r['action']:<8} {fn:<16} "
                   f"{'yes' if r['calibrated'] else '-':<11} {r['out_dtype']}"
                   + (f"  {_values(r['values'])}" if r.get("values") else ""))
    counts = p.counts()
    typer.echo(f"\n{len(rows)} tensors: {counts['method']} by {p.recipe.merge_method}, "
               f"{counts['fallback']} by the fallback ({p.recipe.scope.fallback}), "
               f"{counts['copy']} copied, {counts['calibrated']} calibrated"
               + ("; (ᵀ): Conv1D weights, merged in (out, in) orientation"
                  if any(r["transposed"] for r in rows) else ""))
    typer.echo(f"estimated peak memory with the defaults (1 worker, 8MiB blocks, prefetch): "
               f"{estimate(p, block_size=parse_size(DEFAULT_BLOCK_SIZE)).describe()}\n"
               f"  = {FORMULA}")


def _values(values: dict[str, Any]) -> str:
    """A tensor's resolved per-tensor values, short: weights=[1, 0.5] scaling=0.7."""
    def short(v: Any) -> str:
        return "[" + ", ".join(f"{x:g}" for x in v) + "]" if isinstance(v, list) else f"{v:g}"
    return " ".join(f"{k}={short(v)}" for k, v in values.items()
                    if isinstance(v, (int, float, list)) and not isinstance(v, bool))


@app.command()
def methods(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the methods: family, parameters with defaults, and references."""
    from specmerge.mergekit import mergekit_methods
    from specmerge.methods import all_methods
    from specmerge.methods.presets import presets_of

    ms = all_methods()
    ours = mergekit_methods()
    names = {m.name: [k for k, v in ours.items() if v == m.name] for m in ms}
    if as_json:
        typer.echo(json.dumps([{
            "name": m.name, "family": m.family, "summary": m.summary, "citation": m.citation,
            "matrix_only": m.matrix_only, "factored": m.factored, "streams": m.rowwise,
            "mergekit": names[m.name],
            "parameters": {p.name: {"default": p.default, "type": p.type_name, "doc": p.doc,
                                    "choices": p.choices, "range": p.range,
                                    "allowed": p.describe()} for p in m.params},
            "presets": {s.name: {"values": s.shown(), "applies": s.applies, "source": s.citation,
                                 "defaults": s.defaults, "notes": s.notes}
                        for s in presets_of(m.name)},
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
        lora = "LoRA: factored" if m.factored else "LoRA: densified per tensor"
        stream = "streams in row blocks" if m.rowwise else "whole tensors"
        typer.echo(f"\n{m.name}  [{scope}; {lora}; {stream}]\n  {m.summary}\n  ref: {m.citation}")
        if names[m.name]:
            typer.echo(f"  mergekit: {', '.join(names[m.name])}")
        for p in m.params:
            allowed = f": {p.describe()}" if p.constraints else ""
            typer.echo(f"    {p.name} = {p.default!r}  ({p.type_name}{allowed}): {p.doc}")
        if m.notes:
            typer.echo(f"  note: {m.notes}")
        presets = presets_of(m.name)
        if presets:
            key = (f"calibrate: {{method: {m.name}, preset: NAME}}" if m.is_calibration
                   else "parameters: {preset: NAME}")
            typer.echo(f"  presets ({key}; parameters beside it win):")
        for s in presets:
            values = ", ".join(f"{k} {v}" for k, v in s.shown().items())
            default = " [the defaults]" if s.defaults else ""
            typer.echo(f"    {s.name}{default}: {values}\n      when: {s.applies}"
                       f"\n      from: {s.citation}")
    typer.echo("\n== mergekit 0.1.5's methods (a mergekit recipe runs them as)")
    for k, v in ours.items():
        typer.echo(f"  {k:<17} {v or 'not implemented: refused by name'}")


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
def analyze(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    out: Annotated[Path, typer.Option("--out", help="Report directory (index.html, PNGs, "
                                                    "report.json).")] = Path("out/analyze"),
    param: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--param", help="Matrix whose spectrum to draw (repeat the option); default: the most "
                        "and the least inflated.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (cuda:N).")] = "cpu",
    dtype: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Compute dtype override: float32 or float64.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Parameters analysed at once.")] = 1,
    force: Annotated[bool, typer.Option(
        help="Replace an existing OUT that is a previous specmerge output (or empty): the old "
             "OUT is deleted once the new one is complete (only the one that was there at the "
             "start). Anything else, and a symbolic link, is refused.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Spectral report of RECIPE's merge over every matrix: inflation, task overlap (outputs and
    inputs), SVC's γ, effective ranks, SWUDI-A's ranks, SWUDI's k against rank C and its kept
    trace share, the norm against task arithmetic's and the scale of scaling: auto, as heat maps,
    γ per layer and spectra."""
    from specmerge.analysis import analyze as run_analyze
    from specmerge.errors import SpecmergeError

    try:
        path = run_analyze(recipe, out, params=param or [], device=device, dtype=dtype,
                           workers=workers, force=force, progress=not quiet)
    except (SpecmergeError, ValueError) as err:
        _fail(err)
    else:
        from specmerge.io.report import read_summary, summary_lines

        typer.echo("\n".join(summary_lines(*read_summary(path))))
        typer.echo(f"wrote {path / 'index.html'} (with report.json and the PNGs)")


@app.command()
def diagnose(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    param: Annotated[str, typer.Argument(help="Name of a matrix parameter, e.g. "
                                               "model.layers.0.mlp.up_proj.weight.")],
    plot: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Write the spectrum plot (PNG) here; needs matplotlib.")] = None,
    top: Annotated[int, typer.Option(help="Singular directions to list.")] = 8,
) -> None:
    """``analyze`` restricted to one parameter, printed: inflation, s_i^r, SVC's γ, ranks."""
    from specmerge.analysis import diagnose as run_diagnose
    from specmerge.errors import SpecmergeError
    from specmerge.io.plots import plot_spectrum

    try:
        res = run_diagnose(recipe, param)
        assert res.report is not None
        m = res.metrics
        typer.echo(f"{param}:\n{res.report.summary(top)}")
        typer.echo(f"task subspace overlap (top {m.overlap_k}): outputs {m.overlap:.3f}, inputs "
                   f"{m.input_overlap:.3f}; SWUDI-A ranks {m.swudi_a_ranks} of n = {m.n}; "
                   f"SWUDI top-{m.swudi_rank} keeps {m.swudi_trace_share:.1%} of trace C")
        bind = ("cannot bind (SWUDI is its filtered closed form)" if m.truncation_cannot_bind
                else "binds")
        typer.echo(f"rank C = {m.rank_c} against SWUDI's k = {m.swudi_rank}: the truncation "
                   f"{bind}; ‖W_m‖/‖TA‖ = {m.norm_ratio_ta:.3g}; scaling: auto would choose "
                   f"{m.auto_scale:.3g}")
        if plot is not None:
            typer.echo("wrote " + str(plot_spectrum(res.sigma_tasks, res.sigma_merged,
                                                    res.sigma_calibrated, plot, title=param)))
    except (SpecmergeError, ValueError, OSError) as err:
        _fail(err)


@app.command()
def convert(
    recipe: Annotated[Path, typer.Argument(help="A mergekit YAML (base model plus experts).")],
) -> None:
    """Print the specmerge recipe that means what the mergekit recipe means (YAML, to stdout)."""
    import yaml

    from specmerge.errors import RecipeError
    from specmerge.mergekit import MergekitError, from_mergekit
    from specmerge.recipe import read_yaml

    try:
        data = read_yaml(recipe)
        if not isinstance(data, dict):
            raise RecipeError(f"{recipe}: a recipe is a YAML mapping")
        out = from_mergekit(data)
    except (RecipeError, MergekitError) as err:
        _fail(err)
    typer.echo(f"# specmerge recipe converted from the mergekit recipe {recipe}")
    typer.echo(yaml.safe_dump(out, sort_keys=False).rstrip())


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
    vocab: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="Vocabulary size (embedding and head rows), e.g. 128256 for Llama 3.")] = None,
    hidden: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="Hidden size (a multiple of 16); the depth still follows --params.")] = None,
) -> None:
    """A Llama-shaped base and K experts (shared + task low-rank + noise task vectors)."""
    from specmerge.examples import llama_shape_for, parse_count, write_example_models

    try:
        shape = llama_shape_for(parse_count(params), vocab=vocab, hidden=hidden)
        dirs = write_example_models(directory, shape, experts, dtype=dtype, seed=seed)
    except (FileExistsError, OSError, ValueError) as err:
        _fail(err)
    typer.echo(f"wrote {len(dirs)} checkpoints of {shape.num_params():,} parameters "
               f"({shape}) under {Path(directory).resolve()}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []},
             help="Real-model benchmarks (needs the bench extra); see specmerge bench --help.")
def bench(ctx: typer.Context) -> None:
    # imported only when used, so the core never imports the benchmark
    from specmerge.bench.cli import app as bench_app

    bench_app(args=ctx.args, prog_name="specmerge bench")


def describe(err: BaseException) -> str:
    """The one line an error prints: its message, naming the file, tensor, field or option it
    is about (the message of every specmerge error does), or what kind of failure it was."""
    if isinstance(err, RecursionError):
        return "the input nests too deeply to read (a YAML or JSON of thousands of levels?)"
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        detail = str(err).splitlines()[0] if str(err) else ""
        return ("out of memory" + (f" ({detail})" if detail else "") + ": try a smaller "
                "--block-size, fewer --workers, or a machine with more memory")
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    message = str(err).strip() or type(err).__name__
    return message if isinstance(err, (ValueError, OSError)) else (
        f"{type(err).__name__}: {message} (an unexpected failure: please report it with the "
        f"output of --debug)")


def main() -> None:
    """The error boundary: every exception becomes ``error: …`` on one line and exit status 1
    (128 + the signal for a signal, 130 for Ctrl-C); ``--debug`` (before the command) shows the
    traceback instead."""
    from specmerge.errors import Interrupted

    try:
        app(prog_name="specmerge")
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if "--debug" in sys.argv[1:]:
            raise
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except BaseException as err:
        if "--debug" in sys.argv[1:]:
            raise
        typer.echo(f"error: {describe(err)}", err=True)
        sys.exit(128 + err.signum if isinstance(err, Interrupted) else 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
