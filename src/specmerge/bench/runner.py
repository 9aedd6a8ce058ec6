"""Orchestration of a text8 run: base, heads, experts (cached), merges through the public API,
evaluation of every row, and the results dictionary that ``report`` renders.

Cache layout (``--cache``, default ``~/.cache/specmerge/text8``)::

    base-<sha12>/                 the base re-saved by transformers (same weights, same keys
                                  as the experts), used as ``base_model`` of every merge
    experts/<task>-seed<s>-<key>/ one expert per task and seed, key = protocol hash
    experts/<task>-seed<s>-lora8-<key>/  a LoRA expert (PEFT adapter), with ``--experts lora``
    tokens/<hash>.pt              tokenised evaluation sets
    rows/<hash>.json              evaluated rows, keyed by experts, recipe and test set
    merges/                       merged checkpoints while they are evaluated (then deleted)
    logs/                         the log of each mergekit row that failed (mergekit_rows)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from specmerge.errors import OutputError
from specmerge.io.writer import atomic_output_dir, atomic_write_text, output_identity

from . import mergekit_rows as M
from . import peft_rows as P
from . import text8 as T

log = logging.getLogger(__name__)

# Row names: "<method>" or "<method>+svc" are recipes in examples/text8 (or the packaged copy);
# "<method>@val" sweeps the method's ``scaling`` λ on validation, "<row>+svc@alpha" SVC's α.
ZERO_SHOT, EXPERTS = "zero_shot", "experts"
# With LoRA experts: the full fine-tunes of the same tasks and seeds, for reference, when they
# are in the cache or the shared directory (never trained for this row).
FULL_EXPERTS = "experts_full"
BASE_METHODS = ("weight_average", "task_arithmetic", "ties", "dare", "tsv_m", "iso_c", "iso_cts",
                "star", "wudi", "wudi_closed_form", "swudi", "swudi_a")
# λ on validation; the WUDI family's ``scaling`` too: its official settings range from 1 (CLIP)
# to 0.1 (InternVL) and 1/K (LoRA experts), so only a validated scale compares it fairly.
SWEEPS = ("task_arithmetic@val", "ties@val", "wudi@val", "wudi_closed_form@val", "swudi@val",
          "swudi_a@val")
# SVC's α on validation ("@alpha"), after the base methods SVC helps or hurts most.
ALPHA_SWEEPS = ("task_arithmetic+svc@alpha", "tsv_m+svc@alpha", "swudi+svc@alpha")
# The α grid of every "@alpha" row, beside 1/K (SVC's default): γ_r = K / Σ_i max(α, s_i^r), so
# α at or above every response s_i^r shrinks every direction by 1/α.
ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0)
# Rows for LoRA experts (issue "LoRA experts merged well"): the official LoRA presets, the
# data-free scale rule ``scaling: auto``, and the Core Space and KnOTS spaces.
LORA_ROWS = ("swudi_lora", "swudi_a_lora", "wudi_lora", "swudi_auto", "swudi_a_auto",
             "wudi_closed_form_auto", "wudi_auto", "ties_core", "tsv_m_core", "iso_c_core",
             "ties_knots", "tsv_m_knots", "iso_c_knots")
# Extra rows beyond "every method ± SVC at defaults": SVC after TSV-M with α = 1.0, the official
# SVC run script's setting for TSV-M (the registry default α = 1/K is its setting elsewhere).
EXTRAS = ("tsv_m+svc_a1",)
# The λ grid of every "@val" row: steps of 0.05 up to 0.3 (1/K for K = 8 is 0.125; the official
# LoRA and MLLM scales are 0.1 to 0.3), then steps of 0.1 up to 1.
LAMBDAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
PRESETS: dict[str, tuple[str, ...]] = {
    "full": tuple(m for b in BASE_METHODS for m in (b, f"{b}+svc")) + EXTRAS + SWEEPS
    + ALPHA_SWEEPS,
    # TSV-M + SVC at α = 1 (the official setting for TSV-M) beside the registry's α = 1/K
    "headline": ("task_arithmetic", "task_arithmetic+svc", "tsv_m", "tsv_m+svc", "tsv_m+svc_a1",
                 "swudi", "swudi+svc"),
    "quick": ("task_arithmetic", "task_arithmetic+svc", "ties"),
}
QUICK_TASKS = ("subj", "trec")
# With --experts lora, PEFT's own merges join the preset as peer rows.
PEFT_ROWS = tuple(f"{P.PREFIX}{c}" for c in P.COMBINATIONS) + tuple(
    f"{P.PREFIX}{c}@val" for c in P.COMBINATIONS)
LORA_EXTRAS: dict[str, tuple[str, ...]] = {
    "full": LORA_ROWS + PEFT_ROWS,
    "headline": ("swudi_lora", "swudi_auto", "peft_svd", "peft_cat@val"), "quick": ("peft_ties",)}


def sweep_of(row: str) -> str | None:
    """What a row sweeps on validation: "scaling" (@val), "alpha" (@alpha) or nothing."""
    return "scaling" if row.endswith("@val") else "alpha" if row.endswith("@alpha") else None


def sweep_grid(row: str, k: int) -> tuple[float, ...]:
    """The values a sweep row tries: the λ grid, or SVC's default 1/K and the α grid."""
    return LAMBDAS if sweep_of(row) == "scaling" else tuple(sorted({1.0 / k, *ALPHAS}))
# Figure 2 of the SVC paper: one attention and one MLP matrix.
SPECTRUM_PARAMS = ("encoder.layer.3.attention.self.query.weight",
                   "encoder.layer.3.intermediate.dense.weight")


@dataclass
class RunConfig:
    data: Path | None
    tasks: Sequence[str] = T.TASKS
    methods: Sequence[str] = PRESETS["full"]
    seeds: int = 1
    cache: Path = Path("~/.cache/specmerge/text8")
    shared: Path | None = None  # read-only directory of prebuilt experts
    recipes: Path | None = None
    test_cap: int | None = None
    val_cap: int | None = 500
    train: T.TrainConfig = field(default_factory=T.TrainConfig)
    device: str = "cpu"
    workers: int = 1
    threads: int | None = None
    model_dir: Path | None = None
    model_sha256: str = T.MODEL_SHA256
    progress: bool = True
    reuse_rows: bool = True
    lora: T.LoraSpec | None = None  # LoRA experts (PEFT adapters) instead of full fine-tunes
    mergekit_venv: Path | None = None  # a virtualenv holding mergekit, for the mergekit_* rows


def default_data_dir(name: str = "text") -> Path | None:
    """``data/<name>`` of the source checkout this module runs from (the tasks ship with the
    repository, not in the wheel), else None."""
    for parent in Path(__file__).resolve().parents:
        cand = parent / "data" / name
        if (cand / "README.md").is_file():
            return cand
    return None


def default_recipes_dir() -> Path:
    """``examples/text8`` of a source checkout, else the copy packaged with specmerge.bench."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "examples" / "text8"
        if cand.is_dir():
            return cand
    return Path(str(resources.files("specmerge.bench") / "recipes"))


def recipe_path(recipes: Path, row: str) -> Path:
    name = row.split("@")[0].replace("+", "_")
    return recipes / f"{name}.yaml"


def validate_methods(methods: Sequence[str], recipes: Path, lora: bool = False,
                     mergekit_venv: Path | None = None) -> list[str]:
    """Check row names early: each needs a recipe, and its method must be registered; a PEFT
    row needs LoRA experts, a mergekit row full experts and ``mergekit_venv``."""
    import yaml

    from specmerge.methods.registry import get_method

    out = []
    for m in methods:
        if m in (ZERO_SHOT, EXPERTS, FULL_EXPERTS):
            continue
        if P.is_peft_row(m):
            P.combination(m)
            if not lora:
                raise T.BenchError(f"row {m!r} merges PEFT adapters: it needs --experts lora")
            out.append(m)
            continue
        if M.is_mergekit_row(m):
            M.check_row(m, mergekit_venv, lora)
            out.append(m)
            continue
        p = recipe_path(recipes, m)
        if not p.is_file():
            known = sorted(x.stem for x in recipes.glob("*.yaml"))
            raise T.BenchError(f"unknown method row {m!r}: no recipe {p}. Rows: {known} "
                               "(append '+svc' for calibration rows is already in the name; "
                               "'@val' sweeps scaling on validation)")
        rec = yaml.safe_load(p.read_text())
        try:
            get_method(rec["merge_method"])
        except Exception as e:
            raise T.BenchError(f"method row {m!r}: {e}") from e
        if m.endswith("@val") and "scaling" not in get_method(rec["merge_method"]).defaults():
            raise T.BenchError(f"method row {m!r}: {rec['merge_method']} has no 'scaling' to sweep")
        if m.endswith("@alpha") and (rec.get("calibrate") or {}).get("method") != "svc":
            raise T.BenchError(f"method row {m!r}: '@alpha' sweeps SVC's α, but the recipe "
                               f"{p.name} calibrates with no SVC")
        out.append(m)
    return out


# --------------------------------------------------------------------------------------------
# Base and experts
# --------------------------------------------------------------------------------------------

def ensure_base(model_dir: Path, sha: str, cache: Path) -> Path:
    """The base re-saved by transformers: same weights, and exactly the experts' key set."""
    out = cache / f"base-{sha[:12]}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    model, tok = T.load_encoder(model_dir)
    try:
        with atomic_output_dir(out, replace=output_identity(out)) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
    except OutputError:
        # a concurrent run (e.g. one per half of --tasks) saved the same base first: use it
        if not ((out / "config.json").is_file() and any(out.glob("*.safetensors"))):
            raise
        log.info("base %s was saved by another run meanwhile; using it", out)
    return out


@dataclass
class Expert:
    task: str
    seed: int
    key: str
    path: Path
    info: dict


def expert_plan(cfg: RunConfig, tasks: list[T.Task], sha: str, train: T.TrainConfig | None = None,
                lora: T.LoraSpec | None = None) -> list[tuple[T.Task, int, str]]:
    train = cfg.train if train is None else train
    return [(t, s, T.protocol_hash(sha, t.files_digest(), train, s, lora))
            for s in range(cfg.seeds) for t in tasks]


def find_expert(cfg: RunConfig, task: str, seed: int, key: str,
                lora: T.LoraSpec | None = None) -> Path | None:
    name = T.expert_dirname(task, seed, key, lora)
    roots = [cfg.cache / "experts"]
    if cfg.shared is not None:  # a shared directory may hold experts/ or the expert dirs
        roots = [Path(cfg.shared), Path(cfg.shared) / "experts", *roots]
    for root in roots:
        if T.is_complete(root / name):
            return root / name
    return None


def ensure_experts(cfg: RunConfig, tasks: list[T.Task], heads: dict, sha: str,
                   model_dir: Path) -> list[Expert]:
    """Find every (task, seed) expert in the shared directory or the cache; train the rest."""
    def train(t: T.Task, s: int, k: str, out: Path) -> None:
        T.train_expert(model_dir, t, heads[t.name], cfg.train, s, out, cfg.device,
                       meta={"protocol_hash": k, "model_sha256": sha},
                       progress=cfg.progress, lora=cfg.lora)

    return find_or_train(cfg, expert_plan(cfg, tasks, sha, lora=cfg.lora), train)


def find_or_train(cfg, plan: list[tuple], train: Callable[[Any, int, str, Path], None]
                  ) -> list[Expert]:
    """The experts of ``plan`` ((task, seed, key) triples), each found in the shared directory
    or the cache, or trained by ``train(task, seed, key, out_dir)``."""
    todo = [(t, s, k) for t, s, k in plan if find_expert(cfg, t.name, s, k, cfg.lora) is None]
    if todo:
        log.info("training %d of %d experts (%d cached)", len(todo), len(plan),
                 len(plan) - len(todo))
    for t, s, k in tqdm(todo, desc="experts", disable=not cfg.progress or not todo):
        if find_expert(cfg, t.name, s, k, cfg.lora) is not None:  # built meanwhile elsewhere
            continue
        out = cfg.cache / "experts" / T.expert_dirname(t.name, s, k, cfg.lora)
        out.parent.mkdir(parents=True, exist_ok=True)
        train(t, s, k, out)
    experts = []
    for t, s, k in plan:
        p = find_expert(cfg, t.name, s, k, cfg.lora)
        assert p is not None
        experts.append(Expert(t.name, s, k, p, json.loads((p / "expert.json").read_text())))
    return experts


def find_full_experts(cfg: RunConfig, tasks: list[T.Task], sha: str) -> dict[int, list[Expert]]:
    """The full fine-tunes matching this run's protocol (same steps cap), per seed where every
    task has one; they are looked up, never trained."""
    train = T.TrainConfig(max_steps=cfg.train.max_steps)
    out: dict[int, list[Expert]] = {}
    for t, s, k in expert_plan(cfg, tasks, sha, train=train):
        p = find_expert(cfg, t.name, s, k)
        if p is None:
            out.setdefault(s, []).append(None)  # type: ignore[arg-type]
            continue
        out.setdefault(s, []).append(Expert(t.name, s, k, p,
                                            json.loads((p / "expert.json").read_text())))
    return {s: ex for s, ex in out.items() if all(e is not None for e in ex)}


# --------------------------------------------------------------------------------------------
# Merging and evaluation
# --------------------------------------------------------------------------------------------

def load_recipe(recipes: Path, row: str, base: Path, experts: list[Path]) -> dict:
    """The row's YAML recipe with the placeholders ``base_model`` / ``models`` filled in."""
    import yaml

    rec = yaml.safe_load(recipe_path(recipes, row).read_text())
    rec["base_model"] = str(base)
    rec["models"] = [str(p) for p in experts]
    return rec


def run_merge(recipe: dict, out_dir: Path, cfg: RunConfig) -> float:
    """Merge through the public API; return the wall time in seconds."""
    import specmerge

    t0 = time.perf_counter()
    specmerge.merge(recipe, out_dir, device=cfg.device, workers=cfg.workers, force=True,
                    progress=False)
    return time.perf_counter() - t0


class Evaluator:
    """One reusable encoder; loads any checkpoint's weights and scores the tasks' eval sets."""

    loader = staticmethod(T.load_encoder)

    def __init__(self, base: Path, device: str):
        self.model, self.tok = T.load_encoder(base, device)
        self.base, self.device = base, device
        self.base_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load(self, ckpt: Path) -> None:
        """A full checkpoint's weights; a PEFT adapter directory is merged into the base."""
        if (Path(ckpt) / "adapter_config.json").is_file():
            self.load_deltas(adapter_deltas(self.base, ckpt))
        else:
            T.load_weights(self.model, ckpt)

    def load_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        """θ0 + Δ on the weights of ``deltas``, θ0 elsewhere."""
        P.apply_deltas(self.model, self.base_state, deltas)

    def scores(self, sets: dict[str, T.EvalSet], heads: dict) -> dict[str, float]:
        return {t: T.accuracy(self.model, es, heads[t], self.device,
                              pad_id=self.tok.pad_token_id or 0) for t, es in sets.items()}


def adapter_deltas(base: Path, adapter: Path, loader: Callable = T.load_encoder
                   ) -> dict[str, torch.Tensor]:
    """Δ = s B A of every weight a PEFT adapter targets, as PEFT computes it."""
    return P.PeftMerger(base, [Path(adapter)], loader).deltas("e0")


def spectra(base: Path, ckpts: dict[str, Path], names: Sequence[str],
            loader: Callable = T.load_encoder) -> dict:
    """Singular values of Δ = θ − θ0 for the chosen matrices of each checkpoint."""
    from safetensors import safe_open

    def read(d: Path, name: str) -> torch.Tensor:
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                if name in fh.keys():
                    return fh.get_tensor(name).double()
        raise KeyError(f"{name} not in {d}")

    def deltas(d: Path) -> dict[str, torch.Tensor]:
        if (Path(d) / "adapter_config.json").is_file():  # a LoRA expert: τ = s B A
            ad = adapter_deltas(base, d, loader)
            return {n: ad[n].double() for n in names}
        return {n: read(d, n) - read(base, n) for n in names}

    out: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for label, d in ckpts.items():
        for n, tau in deltas(d).items():
            out[n][label] = torch.linalg.svdvals(tau).tolist()
    return out


def _row_key(row: str, recipe: Any, experts: list[Expert], sets_key: str, extra: Any = None
             ) -> str:
    blob = json.dumps({"row": row, "recipe": recipe, "experts": [e.key for e in experts],
                       "sets": sets_key, "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class RowCache:
    """Evaluated rows on disk, keyed by everything they depend on (``rows/<key>.json``)."""

    def __init__(self, directory: Path, reuse: bool):
        self.directory, self.reuse = directory, reuse
        directory.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, compute: Callable[[], dict]) -> dict:
        path = self.directory / f"{key}.json"
        if self.reuse and path.is_file():
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        row = compute()
        row["compute_s"] = time.perf_counter() - t0
        atomic_write_text(path, json.dumps(row))
        return row


@dataclass
class Bench:
    """One text8 run's shared state, built by ``setup``; each method below is one named step."""

    cfg: RunConfig
    sha: str
    tasks: list[T.Task]
    recipes: Path
    methods: list[str]
    base: Path
    model_dir: Path
    evaluator: Evaluator
    heads: dict
    cache: RowCache
    work: Path
    test_sets: dict[str, T.EvalSet] = field(default_factory=dict)
    val_sets: dict[str, T.EvalSet] = field(default_factory=dict)
    sets_key: str = ""
    peft: tuple[int, P.PeftMerger] | None = None  # the current seed's adapters, loaded once
    spectrum_params: tuple[str, ...] = SPECTRUM_PARAMS

    @classmethod
    def setup(cls, cfg: RunConfig) -> Bench:
        """Check the model, tasks and rows; re-save the base; build the zero-shot heads."""
        cfg.cache = Path(cfg.cache).expanduser()
        cfg.cache.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model_dir = Path(cfg.model_dir) if cfg.model_dir else T.default_model_dir()
        sha = T.verify_model(model_dir, cfg.model_sha256)
        tasks = [T.load_task(cfg.data, t) for t in cfg.tasks]
        if len({t.name for t in tasks}) != len(tasks):
            raise T.BenchError(f"duplicate task names in {list(cfg.tasks)}")
        recipes = Path(cfg.recipes) if cfg.recipes else default_recipes_dir()
        methods = validate_methods(cfg.methods, recipes, lora=cfg.lora is not None,
                                   mergekit_venv=cfg.mergekit_venv)
        base = ensure_base(model_dir, sha, cfg.cache)
        ev = Evaluator(base, cfg.device)
        embed_fn = T.make_embed_fn(ev.model, ev.tok, cfg.device, cfg.train.max_length)
        heads = {t.name: T.build_head(t.prompts(), embed_fn) for t in tasks}
        return cls(cfg, sha, tasks, recipes, methods, base, model_dir, ev, heads,
                   RowCache(cfg.cache / "rows", cfg.reuse_rows),
                   cfg.cache / "merges" / f"run{os.getpid()}")

    def tokenize(self) -> None:
        """The test sets (and validation sets when a row sweeps λ), tokenised and cached."""
        cfg, tok = self.cfg, self.evaluator.tok
        ml, tok_cache = cfg.train.max_length, cfg.cache / "tokens"
        self.test_sets = {t.name: T.tokenize_set(tok, T.subsample(t.test, cfg.test_cap, 0), ml,
                                                 tok_cache) for t in self.tasks}
        if any(sweep_of(m) for m in self.methods):  # PEFT's sweeps included
            self.val_sets = {t.name: T.tokenize_set(
                tok, T.subsample(T.split_train_val(t, cfg.train.val_fraction)[1], cfg.val_cap,
                                 0), ml, tok_cache) for t in self.tasks}
        self.sets_key = json.dumps({
            t: [len(es), hashlib.sha256(str(es.input_ids).encode()).hexdigest()]
            for t, es in self.test_sets.items()})

    def merge_and_score(self, recipe: dict, out: Path, sets: dict[str, T.EvalSet]
                        ) -> tuple[dict[str, float], float]:
        secs = run_merge(recipe, out, self.cfg)
        self.evaluator.load(out)
        return self.evaluator.scores(sets, self.heads), secs

    def merged_row(self, row: str, recipe: dict, out: Path, want_spectra: bool) -> dict:
        """One method row: merge, score the test sets, optionally keep Figure-2 spectra."""
        acc, secs = self.merge_and_score(recipe, out, self.test_sets)
        res: dict[str, Any] = {"acc": acc, "merge_s": secs}
        if want_spectra:
            res["spectra"] = spectra(self.base, {row: out}, self.spectrum_params)
        shutil.rmtree(out, ignore_errors=True)
        return res

    def sweep_row(self, row: str, recipe: dict, out: Path) -> dict:
        """A λ sweep: every λ scored on validation; the best one scored on the test sets."""
        try:
            return self._sweep(row, recipe, out)
        finally:  # whatever happened, no merged model of the sweep stays behind
            for d in out.parent.glob(f"{out.name}-*"):
                shutil.rmtree(d, ignore_errors=True)

    def _sweep(self, row: str, recipe: dict, out: Path) -> dict:
        curve, total, best = [], 0.0, None
        knob = sweep_of(row)
        grid = sweep_grid(row, len(recipe["models"]))
        for lam in tqdm(grid, desc=f"{row} {'α' if knob == 'alpha' else 'λ'}", leave=False,
                        disable=not self.cfg.progress):
            r = copy.deepcopy(recipe)
            if knob == "alpha":
                r["calibrate"] = {**r["calibrate"], "alpha": lam}
            else:
                r.setdefault("parameters", {})["scaling"] = lam
            d = out.with_name(f"{out.name}-{lam}")
            va, secs = self.merge_and_score(r, d, self.val_sets)
            total += secs
            mean = sum(va.values()) / len(va)
            curve.append({"lambda": lam, "val_acc": va, "val_avg": mean, "merge_s": secs})
            if best is None or mean > best[0]:
                if best is not None:
                    shutil.rmtree(best[2], ignore_errors=True)
                best = (mean, lam, d, secs)
            else:
                shutil.rmtree(d, ignore_errors=True)
        assert best is not None
        self.evaluator.load(best[2])
        res = {"acc": self.evaluator.scores(self.test_sets, self.heads), "merge_s": best[3],
               "sweep_s": total, "lambda": best[1], "curve": curve}
        shutil.rmtree(best[2], ignore_errors=True)
        return res

    def method_row(self, row: str, seed: int, experts: list[Expert]) -> dict:
        """A method row for one seed, from the row cache or computed; a failure is recorded."""
        if P.is_peft_row(row):
            return self.peft_row(row, seed, experts)
        if M.is_mergekit_row(row):
            return self.mergekit_row(row, seed, experts)
        recipe = load_recipe(self.recipes, row, self.base, [e.path for e in experts])
        out = self.work / f"{row.replace('+', '_').replace('@', '_')}-s{seed}"
        sweep = sweep_of(row) is not None
        key = _row_key(row, recipe | {"base_model": None, "models": None}, experts,
                       self.sets_key, {"val": self.cfg.val_cap, "lambdas": LAMBDAS}
                       if row.endswith("@val") else {"val": self.cfg.val_cap,
                                                      "alphas": sweep_grid(row, len(experts))}
                       if sweep else None)
        want_spectra = seed == 0 and row in ("task_arithmetic", "task_arithmetic+svc")
        try:
            return self.cache.get(key, lambda: self.sweep_row(row, recipe, out) if sweep
                                  else self.merged_row(row, recipe, out, want_spectra))
        except Exception as err:  # one failing method must not sink the whole run
            log.error("row %s (seed %d) failed: %s", row, seed, err)
            shutil.rmtree(out, ignore_errors=True)
            return {"acc": {t.name: math.nan for t in self.tasks},
                    "error": f"{type(err).__name__}: {err}"}

    def peft_merger(self, seed: int, experts: list[Expert]) -> P.PeftMerger:
        if self.peft is None or self.peft[0] != seed:
            self.peft = None  # free the previous seed's adapters first
            self.peft = (seed, P.PeftMerger(self.base, [e.path for e in experts],
                                            self.evaluator.loader))
        return self.peft[1]

    def peft_row(self, row: str, seed: int, experts: list[Expert]) -> dict:
        """A PEFT peer row: add_weighted_adapter at PEFT's defaults, or its common weight λ
        chosen on validation; scored by the same evaluator as every other row."""
        comb, k = P.combination(row), len(experts)
        sweep = row.endswith("@val")
        recipe = {"peft": P.merge_kwargs(comb, P.DEFAULT_WEIGHT, k),
                  "peft_version": T.import_peft().__version__}
        key = _row_key(row, recipe, experts, self.sets_key,
                       {"val": self.cfg.val_cap, "lambdas": LAMBDAS} if sweep else None)

        def compute() -> dict:
            merger = self.peft_merger(seed, experts)
            if not sweep:
                deltas, secs = merger.merged_deltas(P.merge_kwargs(comb, P.DEFAULT_WEIGHT, k))
                self.evaluator.load_deltas(deltas)
                return {"acc": self.evaluator.scores(self.test_sets, self.heads),
                        "merge_s": secs, "peft": recipe["peft"]}
            curve, total, best = [], 0.0, None
            for lam in tqdm(LAMBDAS, desc=f"{row} λ", leave=False, disable=not self.cfg.progress):
                deltas, secs = merger.merged_deltas(P.merge_kwargs(comb, lam, k))
                total += secs
                self.evaluator.load_deltas(deltas)
                va = self.evaluator.scores(self.val_sets, self.heads)
                mean = sum(va.values()) / len(va)
                curve.append({"lambda": lam, "val_acc": va, "val_avg": mean, "merge_s": secs})
                if best is None or mean > best[0]:
                    best = (mean, lam, deltas, secs)
            assert best is not None
            self.evaluator.load_deltas(best[2])
            return {"acc": self.evaluator.scores(self.test_sets, self.heads), "merge_s": best[3],
                    "sweep_s": total, "lambda": best[1], "curve": curve,
                    "peft": P.merge_kwargs(comb, best[1], k)}

        try:
            return self.cache.get(key, compute)
        except Exception as err:  # one failing row must not sink the whole run
            log.error("row %s (seed %d) failed: %s", row, seed, err)
            return {"acc": {t.name: math.nan for t in self.tasks},
                    "error": f"{type(err).__name__}: {err}"}

    def mergekit_row(self, row: str, seed: int, experts: list[Expert]) -> dict:
        """A mergekit peer row (mergekit_rows): mergekit-yaml in its own virtualenv on the full
        experts, its output scored by the same evaluator call as every merged row."""
        out = self.work / f"{row}-s{seed}"

        def compute(job: M.MergekitJob) -> dict:
            res = job.run(self.base, [e.path for e in experts], out, self.cfg.device,
                          self.cfg.threads, logs=self.cfg.cache / "logs")
            try:
                self.evaluator.load(out)
                return {"acc": self.evaluator.scores(self.test_sets, self.heads), **res}
            finally:
                shutil.rmtree(out, ignore_errors=True)

        try:
            job = M.MergekitJob.build(row, self.recipes, self.cfg.mergekit_venv,
                                      [e.task for e in experts])
            return self.cache.get(_row_key(row, job.identity(), experts, self.sets_key),
                                  lambda: compute(job))
        except Exception as err:  # one failing row must not sink the whole run
            log.error("row %s (seed %d) failed: %s", row, seed, err)
            return {"acc": {t.name: math.nan for t in self.tasks},
                    "error": f"{type(err).__name__}: {err}"}

    def zero_shot_row(self) -> dict:
        def compute() -> dict:
            self.evaluator.load(self.base)
            return {"acc": self.evaluator.scores(self.test_sets, self.heads)}

        return self.cache.get(_row_key(ZERO_SHOT, self.sha, [], self.sets_key), compute)

    def experts_row(self, experts: list[Expert]) -> dict:
        """Each expert on its own task; the sets that are no task's (bench lm's perplexity
        sample) score every expert, and the row holds their mean."""
        tasks = {t.name for t in self.tasks}
        shared = {n: es for n, es in self.test_sets.items() if n not in tasks}

        def compute() -> dict:
            acc: dict[str, float] = {}
            other: dict[str, list[float]] = {n: [] for n in shared}
            for e in experts:
                self.evaluator.load(e.path)
                got = self.evaluator.scores({e.task: self.test_sets[e.task], **shared},
                                            self.heads)
                acc[e.task] = got[e.task]
                for n in shared:
                    other[n].append(got[n])
            return {"acc": {**acc, **{n: sum(v) / len(v) for n, v in other.items() if v}}}

        return self.cache.get(_row_key(EXPERTS, None, experts, self.sets_key), compute)

    def task_spectra(self, experts: list[Expert], merged: dict) -> dict:
        """Figure-2 spectra: each task vector's beside the merged rows' kept earlier."""
        if not merged:
            return {}
        ex0 = {f"τ_{e.task}": e.path for e in experts if e.seed == 0}
        out = dict(merged)
        for n, v in spectra(self.base, ex0, self.spectrum_params,
                            self.evaluator.loader).items():
            out[n] = {**v, **out.get(n, {})}
        return out


def run(cfg: RunConfig) -> dict:
    """Run the benchmark; return the results dictionary (see report.write_results)."""
    t_start = time.perf_counter()
    bench = Bench.setup(cfg)
    t0 = time.perf_counter()
    experts = ensure_experts(cfg, bench.tasks, bench.heads, bench.sha, bench.model_dir)
    t_experts = time.perf_counter() - t0
    full = find_full_experts(cfg, bench.tasks, bench.sha) if cfg.lora is not None else {}
    if cfg.lora is not None:
        log.info("full fine-tuned experts for reference: seeds %s of %d found", sorted(full),
                 cfg.seeds)
    bench.tokenize()
    row_names, per_seed, sweeps, spec = run_rows(bench, experts, full)
    shutil.rmtree(bench.work, ignore_errors=True)
    trained_s = sum(e.info.get("train_seconds", 0) for e in experts)
    return assemble(cfg, bench.tasks, bench.sha, row_names, per_seed, experts, sweeps,
                    bench.task_spectra(experts, spec),
                    timings={"total_s": time.perf_counter() - t_start,
                             "experts_wall_s": t_experts, "experts_train_s": trained_s})


def run_rows(bench: Bench, experts: list[Expert], full: dict[int, list[Expert]]
             ) -> tuple[list[str], dict[str, list[dict]], dict, dict]:
    """Every row for every seed: (row names, per-seed results, sweeps, spectra)."""
    cfg = bench.cfg
    row_names = [ZERO_SHOT, EXPERTS, *([FULL_EXPERTS] if full else []), *bench.methods]
    per_seed: dict[str, list[dict]] = {r: [] for r in row_names}
    sweeps: dict[str, list[dict]] = {}
    spec: dict = {}
    bar = tqdm(total=cfg.seeds * len(row_names), desc="rows", disable=not cfg.progress)
    for s in range(cfg.seeds):
        ex = [e for e in experts if e.seed == s]
        for row in bench.methods:
            bar.set_postfix_str(f"seed {s} {row}")
            res = bench.method_row(row, s, ex)
            per_seed[row].append(res)
            for n, v in res.get("spectra", {}).items():
                spec[n] = {**spec.get(n, {}), **v}
            if "curve" in res:
                sweeps.setdefault(row, []).append({"seed": s, "lambda": res["lambda"],
                                                   "curve": res["curve"]})
            bar.update()
        # the reference rows come last: parallel runs over disjoint --methods then share them
        bar.set_postfix_str(f"seed {s} zero-shot, experts")
        per_seed[ZERO_SHOT].append(bench.zero_shot_row())
        per_seed[EXPERTS].append(bench.experts_row(ex))
        if full:  # a seed without every full expert has no reference value (None)
            per_seed[FULL_EXPERTS].append(bench.experts_row(full[s]) if s in full else None)
        bar.update(2 + bool(full))
        bench.peft = None
    bar.close()
    return row_names, per_seed, sweeps, spec


def assemble(cfg: RunConfig, tasks: list[T.Task], sha: str, row_names: list[str],
             per_seed: dict[str, list[dict]], experts: list[Expert], sweeps: dict, spec: dict,
             timings: dict) -> dict:
    """Per row: per-seed accuracies, their means, average and normalised accuracy."""
    return {
        "benchmark": "text8",
        "protocol": {
            "model": "all-MiniLM-L6-v2", "model_sha256": sha, "head_scale": T.HEAD_SCALE,
            "pooling": "mean over attention mask, L2-normalised",
            "train": asdict(cfg.train), "protocol_version": T.PROTOCOL_VERSION,
            "test_cap": cfg.test_cap, "val_cap": cfg.val_cap, "lambdas": list(LAMBDAS),
            "seeds": cfg.seeds,
            "experts": "full" if cfg.lora is None else "lora",
            "lora": asdict(cfg.lora) if cfg.lora is not None else None,
        },
        "config": config_dict(cfg),
        "tasks": [{"name": t.name, "classes": t.num_classes, "n_test": len(t.test)
                   if cfg.test_cap is None else min(cfg.test_cap, len(t.test)),
                   "validation": "own" if t.validation is not None else "10% of train",
                   "prompts": t.prompts()} for t in tasks],
        **run_record(row_names, per_seed, [t.name for t in tasks], experts, sweeps, spec,
                     timings),
    }


def run_record(row_names: list[str], per_seed: dict[str, list[dict]], names: list[str],
               experts: list[Expert], sweeps: dict, spec: dict, timings: dict) -> dict:
    """What every benchmark's results hold beside its protocol: the experts, the rows, the
    sweeps, the spectra, the timings and the versions."""
    import platform

    import transformers

    import specmerge

    timings = {**timings, "rows_compute_s": sum(x.get("compute_s", 0.0) for r in row_names
                                                for x in per_seed[r] if x is not None)}
    return {
        "experts": [{"task": e.task, "seed": e.seed, "hash": e.key, "path": str(e.path),
                     **{k: e.info.get(k) for k in ("steps", "n_train", "train_seconds",
                                                   "first_loss", "final_loss",
                                                   "trainable_params")}}
                    for e in experts],
        "rows": summarise_rows(row_names, per_seed, names),
        "sweeps": sweeps,
        "spectra": spec,
        "timings": timings,
        "versions": {"specmerge": specmerge.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "python": platform.python_version(), "platform": platform.platform(),
                     "threads": torch.get_num_threads()},
    }


def summarise_rows(row_names: list[str], per_seed: dict[str, list[dict]], names: list[str]
                   ) -> list[dict]:
    """Per row: the per-seed scores' means, the average and normalised accuracy over the tasks
    ``names`` (normalised by the same seed's experts), merge and sweep times, errors."""
    expert_acc = [r["acc"] for r in per_seed[EXPERTS]]
    rows = []
    for r in row_names:
        kept = [(i, x) for i, x in enumerate(per_seed[r]) if x is not None]
        seeds = [x for _, x in kept]
        avg = [sum(x["acc"][t] for t in names) / len(names) for x in seeds]
        norm = [T.normalized_accuracy({t: x["acc"][t] for t in names}, expert_acc[i])
                for i, x in kept]
        mean_acc = {t: sum(x["acc"][t] for x in seeds) / len(seeds) for t in names}
        row = {"name": r, "acc": mean_acc, "avg": sum(avg) / len(avg),
               "norm": sum(norm) / len(norm), "avg_per_seed": avg, "norm_per_seed": norm,
               "per_seed": [{k: v for k, v in x.items() if k not in ("spectra", "curve")}
                            for x in seeds]}
        if len(kept) < len(per_seed[r]):
            row["seeds"] = [i for i, _ in kept]
        errors = [x["error"] for x in seeds if "error" in x]
        if errors:
            row["errors"] = errors
        for k in ("merge_s", "peak_rss_mb", "startup_s"):  # the last two: mergekit rows'
            vs = [x[k] for x in seeds if x.get(k) is not None]
            if vs:
                row[k] = sum(vs) / len(vs)
        if sweep_of(r) is not None and not errors:
            row["lambda"] = [x["lambda"] for x in seeds]
            row["sweep_s"] = sum(x["sweep_s"] for x in seeds) / len(seeds)
        other = sorted({k for x in seeds for k in x["acc"] if k not in names})
        if other:  # scores that are not tasks' (bench lm's perplexity): their mean over seeds
            row["metrics"] = {k: sum(x["acc"][k] for x in seeds) / len(seeds) for k in other}
        rows.append(row)
    return rows


def config_dict(cfg) -> dict:
    """A run configuration as JSON-ready values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
