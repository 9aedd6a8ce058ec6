"""Orchestration of a ``bench lm`` run, on text8's machinery (runner.py): the same cache
layout, protocol hash, row cache, rows, sweeps and results dictionary, with the SmolLM2 base,
the LM task folders (lm_tasks) and the LM evaluator (lm_score).

Cache layout (``--cache``, default ``~/.cache/specmerge/lm``)::

    base-lm-<sha12>/                the dequantised base (an ordinary Llama checkpoint)
    experts/<task>-seed<s>-<key>/   one expert per task and seed (…-lora8-<key>/ for LoRA)
    rows/<hash>.json                evaluated rows, keyed by experts, recipe and eval sets
    merges/                         merged checkpoints while they are evaluated (then deleted)
    logs/                           the log of each mergekit row that failed (mergekit_rows)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import lm as L
from . import runner as R
from . import text8 as T
from .lm_score import PPL, LmEvaluator, ppl_set, task_set
from .lm_tasks import PPL_FILE, LmTask, load_lm_task, read_texts, write_lm_eval_tasks

log = logging.getLogger(__name__)

# the default tasks: those whose full expert beats the base by ≥ 10 points at the default
# protocol (docs/results/lm.md); arc_easy (+6), mawps (+8) and gsm8k (not measured) stay in
# data/lm and run with --tasks
TASKS = ("svamp", "sst2_qa", "agnews_qa", "trec_qa", "subj_qa")
QUICK_TASKS = ("sst2_qa", "svamp")
PRESETS = {**R.PRESETS, "quick": ("task_arithmetic", "task_arithmetic+svc", "ties")}


@dataclass
class LmRunConfig(R.RunConfig):
    """text8's run configuration with the LM protocol's defaults and base."""

    tasks: Sequence[str] = TASKS
    cache: Path = Path("~/.cache/specmerge/lm")
    train: L.LmTrainConfig = field(default_factory=L.LmTrainConfig)
    val_cap: int | None = 100
    model: Path | None = None  # a GGUF file or an HF directory (default: the wheel's GGUF)
    model_sha256: str = L.GGUF_SHA256
    ppl_file: Path | None = None  # default: perplexity.jsonl of the data directory
    ppl_cap: int | None = None  # at most this many texts of the perplexity sample


def default_data_dir() -> Path | None:
    """``data/lm`` of the source checkout this module runs from, else None."""
    return R.default_data_dir("lm")


@dataclass
class LmBench(R.Bench):
    """text8's Bench with the LM evaluator: its rows (merge, sweep, PEFT, reference) run as
    they are; ``setup`` and ``tokenize`` are the LM protocol's."""

    texts: list[str] = field(default_factory=list)

    @classmethod
    def setup(cls, cfg: LmRunConfig) -> LmBench:  # type: ignore[override]
        cfg.cache = Path(cfg.cache).expanduser()
        cfg.cache.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        tasks = [load_lm_task(cfg.data, t) for t in cfg.tasks]
        if len({t.name for t in tasks}) != len(tasks):
            raise T.BenchError(f"duplicate task names in {list(cfg.tasks)}")
        ppl = cfg.ppl_file or (Path(cfg.data) / PPL_FILE if cfg.data is not None else None)
        texts = T.subsample(read_texts(ppl), cfg.ppl_cap, 0) if ppl and Path(ppl).is_file() else []
        if cfg.ppl_file is not None and not texts:
            raise T.BenchError(f"--ppl-file {cfg.ppl_file}: no texts")
        recipes = Path(cfg.recipes) if cfg.recipes else R.default_recipes_dir()
        methods = R.validate_methods(cfg.methods, recipes, lora=cfg.lora is not None,
                                     mergekit_venv=cfg.mergekit_venv)
        base, sha = L.ensure_base(cfg.model, cfg.cache, cfg.model_sha256)
        return cls(cfg, sha, tasks, recipes, methods, base, base, LmEvaluator(base, cfg.device),
                   {}, R.RowCache(cfg.cache / "rows", cfg.reuse_rows),
                   cfg.cache / "merges" / f"run{os.getpid()}",
                   spectrum_params=spectrum_params(base), texts=texts)

    def tokenize(self) -> None:
        """The test sets (and validation sets when a row sweeps), and the perplexity sample."""
        cfg, tok = self.cfg, self.evaluator.tok
        self.test_sets = {t.name: task_set(tok, t, T.subsample(t.test, cfg.test_cap, 0))
                          for t in self.tasks}
        if self.texts:
            self.test_sets[PPL] = ppl_set(tok, self.texts)
        if any(R.sweep_of(m) for m in self.methods):
            self.val_sets = {t.name: task_set(tok, t, T.subsample(
                T.split_train_val(t, cfg.train.val_fraction)[1], cfg.val_cap, 0))
                for t in self.tasks}
        self.sets_key = json.dumps({n: [len(es), es.digest()] for n, es in self.test_sets.items()})


def spectrum_params(base: Path) -> tuple[str, ...]:
    """Figure 2 of the SVC paper: one attention and one MLP matrix of the middle layer."""
    n = json.loads((Path(base) / "config.json").read_text())["num_hidden_layers"] // 2
    return (f"model.layers.{n}.self_attn.q_proj.weight", f"model.layers.{n}.mlp.up_proj.weight")


def ensure_experts(cfg: LmRunConfig, tasks: list[LmTask], sha: str, base: Path
                   ) -> list[R.Expert]:
    """Every (task, seed) expert, found in the shared directory or the cache, or trained."""
    def train(t: LmTask, s: int, k: str, out: Path) -> None:
        L.train_expert(base, t, cfg.train, s, out, cfg.device,
                       meta={"protocol_hash": k, "model_sha256": sha}, progress=cfg.progress,
                       lora=cfg.lora)

    plan = [(t, s, T.protocol_hash(sha, t.files_digest(), cfg.train, s, cfg.lora, L.PROTOCOL))
            for s in range(cfg.seeds) for t in tasks]
    return R.find_or_train(cfg, plan, train)


def run(cfg: LmRunConfig) -> dict:
    """Run the benchmark; return the results dictionary (text8's, with the LM protocol)."""
    t_start = time.perf_counter()
    bench = LmBench.setup(cfg)
    t0 = time.perf_counter()
    experts = ensure_experts(cfg, bench.tasks, bench.sha, bench.base)
    t_experts = time.perf_counter() - t0
    bench.tokenize()
    row_names, per_seed, sweeps, spec = R.run_rows(bench, experts, {})
    shutil.rmtree(bench.work, ignore_errors=True)
    trained_s = sum(e.info.get("train_seconds", 0) for e in experts)
    names = [t.name for t in bench.tasks]
    return {
        "benchmark": "lm",
        "protocol": {
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
            "model_sha256": bench.sha, "train": asdict(cfg.train), **L.PROTOCOL,
            "test_cap": cfg.test_cap, "val_cap": cfg.val_cap, "lambdas": list(R.LAMBDAS),
            "seeds": cfg.seeds, "experts": "full" if cfg.lora is None else "lora",
            "lora": asdict(cfg.lora) if cfg.lora is not None else None,
            "perplexity": {"texts": len(bench.texts), "window": 512,
                           "tokens": sum(len(w) for w in bench.test_sets[PPL].items)
                           if PPL in bench.test_sets else 0},
        },
        "config": R.config_dict(cfg),
        "tasks": [{"name": t.name, "kind": t.kind, "n_test": len(bench.test_sets[t.name]),
                   "validation": "own" if t.validation is not None else "10% of train",
                   "description": t.description} for t in bench.tasks],
        **R.run_record(row_names, per_seed, names, experts, sweeps,
                       bench.task_spectra(experts, spec),
                       {"total_s": time.perf_counter() - t_start, "experts_wall_s": t_experts,
                        "experts_train_s": trained_s}),
    }


def write_outputs(results: dict, cfg: LmRunConfig, out: Path, doc: Path | None = None
                  ) -> dict[str, Path]:
    """results.json, table.md, report.md, the plots, and lm-eval task YAMLs (``out/lm_eval``)
    that re-score any model of the run with ``lm_eval`` alone; with ``doc``, also the report
    there with its plots and JSON beside it."""
    from . import report
    from .lm_report import markdown_report

    files = report.write_all(results, out, prefix="lm", render=markdown_report)
    if doc is not None:
        report.write_doc(results, doc, render=markdown_report)
    tasks = [load_lm_task(cfg.data, t) for t in cfg.tasks]
    ppl = cfg.ppl_file or (Path(cfg.data) / PPL_FILE if cfg.data is not None else None)
    write_lm_eval_tasks(tasks, Path(out) / "lm_eval", ppl if ppl and Path(ppl).is_file() else None)
    files["lm_eval"] = Path(out) / "lm_eval"
    return files

