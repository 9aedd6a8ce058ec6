"""Named presets: the official per-benchmark settings of a method, by name, each with its source.

A recipe selects one with ``preset`` among a method's parameters (``parameters: {preset: NAME}``,
or ``calibrate: {method: svc, preset: NAME}``); parameters written beside it override it. A
preset resolves to plain values when the recipe is validated, so the resolved recipe records
numbers, not the name, and re-runs alone. A value that depends on the recipe (``1/K``: K the
number of experts; SVC's α after TSV-M) is a ``PerRecipe`` and is resolved against it.

Sources: the official SWUDI code, WalkerWorldPeace/MLLMerging at commit ``MLLM_COMMIT`` (the
cited files are identical at 8c46d1f, the commit that added them), and the official SVC code,
lyymuwu/SVC at ``SVC_COMMIT``. Official names map onto specmerge's as: ``exp_time`` →
``exp_time``, ``truncate_rank_ratio`` → ``rank_ratio``, ``auto_rank_method`` → ``rank_rule``,
``filter_type`` → ``filter``, ``init_mode`` → ``init``, ``min_rank`` / ``max_rank_ratio`` →
the same, ``iter_num`` → ``iterations``, ``learning_rate`` / ``lr`` → ``lr``,
``scaling_coefficient`` → ``scaling``, and SVC's ``--alpha`` → ``alpha``.

One difference to know: the official ``scaling_coefficient`` multiplies every merged parameter,
specmerge's ``scaling`` the matrix parameters only (the others take ``scope.fallback``). The
official MLLM runs exclude norms, biases, embeddings and heads from merging, so there it is the
same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MLLM_COMMIT = "5f8a45837560e9863dc557704082269c70cea229"
SVC_COMMIT = "6ad2b314b7ae94a4b831e22ca88e4a2ee42098fa"
MLLM = f"WalkerWorldPeace/MLLMerging@{MLLM_COMMIT[:7]}"
SVC = f"lyymuwu/SVC@{SVC_COMMIT[:7]}"
FIELD = "preset"  # the key a recipe selects a preset with


@dataclass(frozen=True)
class Context:
    """What a per-recipe value may depend on: K, and for a calibration the base method."""

    num_experts: int
    merge_method: str | None = None


@dataclass(frozen=True)
class PerRecipe:
    """A preset value computed from the recipe; ``text`` is how it is shown (e.g. "1/K")."""

    fn: Callable[[Context], Any]
    text: str

    def __call__(self, ctx: Context) -> Any:
        return self.fn(ctx)

    def __str__(self) -> str:
        return self.text


ONE_OVER_K = PerRecipe(lambda c: 1.0 / c.num_experts, "1/K")
SVC_ALPHA = PerRecipe(lambda c: 1.0 if c.merge_method == "tsv_m" else 1.0 / c.num_experts,
                      "1 after tsv_m, else 1/K")


@dataclass(frozen=True)
class Preset:
    name: str
    method: str
    values: Mapping[str, Any]
    applies: str  # when it applies
    source: str  # file:lines in ``repo``
    repo: str  # owner/name@commit
    notes: str = ""
    defaults: bool = False  # the registry's defaults are this preset's values

    @property
    def citation(self) -> str:
        return f"{self.repo}: {self.source}"

    def resolve(self, ctx: Context) -> dict[str, Any]:
        return {k: v(ctx) if isinstance(v, PerRecipe) else v for k, v in self.values.items()}

    def shown(self) -> dict[str, Any]:
        """The values as ``specmerge methods`` shows them (a per-recipe value as its formula)."""
        return {k: str(v) if isinstance(v, PerRecipe) else v for k, v in self.values.items()}


_PRESETS: dict[str, dict[str, Preset]] = {}
_BY_NAME: dict[str, list[str]] = {}  # preset name -> the methods that have one of that name


def _add(method: str, name: str, values: Mapping[str, Any], applies: str, source: str,
         repo: str = MLLM, notes: str = "", defaults: bool = False) -> None:
    _PRESETS.setdefault(method, {})[name] = Preset(name, method, dict(values), applies, source,
                                                   repo, notes, defaults)
    _BY_NAME.setdefault(name, []).append(method)


README = "fusion_bench/README.md"
QWEN_EXPERTS = "LLaMA-Factory/run_merge.py:31-37 (N = 5 experts)"
ONE_OVER_N = ("LLaMA-Factory/swudi_aswudi.py:242-244 (init sum gives about N × a "
              "task's update; compensate with scaling about 1/N, 0.2 for N = 5)")

# --- SWUDI (official: fusion_bench swudi.yaml; LLaMA-Factory swudi_aswudi.py) ------------------
_add("swudi", "clip", {"rank_ratio": 0.65, "exp_time": 1300.0, "init": "sum", "scaling": 1.0},
     "full fine-tunes of CLIP ViT-B/32 (TA8/TALL20); the defaults",
     f"fusion_bench/config/method/yongxianwei_merging/swudi.yaml:4,34,59,72,74; "
     f"{README}:119-126", defaults=True)
_add("swudi", "clip-b16", {"rank_ratio": 0.65, "exp_time": 1800.0, "init": "sum",
                           "scaling": 1.0},
     "full fine-tunes of CLIP ViT-B/16 (TA8)",
     f"{README}:135-142; scaling and init: fusion_bench/config/method/yongxianwei_merging/swudi.yaml:4,74")
_add("swudi", "llama-full", {"rank_ratio": 0.85, "exp_time": 300.0, "init": "sum",
                             "scaling": 1.0},
     "full fine-tunes of an LLM (Llama-3.2-3B, MergeBench)",
     f"{README}:183-190; scaling and init: fusion_bench/config/method/yongxianwei_merging/swudi.yaml:4,74")
_add("swudi", "qwen2vl-lora", {"rank_ratio": 0.01, "exp_time": 1300.0, "init": "sum",
                               "scaling": ONE_OVER_K},
     "LoRA experts (Qwen2-VL-7B, 5 densified LoRA experts): the truncation binds at rank "
     "ratio 0.01, and scaling 1/K undoes the sum start",
     f"{README}:210,223-227 (scaling 0.2); {QWEN_EXPERTS}; {ONE_OVER_N}")
_add("swudi", "internvl-full", {"rank_ratio": 0.65, "exp_time": 300.0, "init": "sum",
                                "scaling": 0.1},
     "full fine-tunes of a multimodal LLM (InternVL2.5-1B, 5 experts)",
     f"{README}:237,244-248",
     notes="run_merge_internvl.py:56,70 default to scaling 0.3 and rank ratio 0.85; the "
           "README's reproduction command (cited) and the sweep that explains it "
           "(examples/yongxianwei_merging/run_internvl_swudi_scale_sweep_merge.sh:5-17) use "
           "0.1 and 0.65")

# --- SWUDI-A (official: aswudi.yaml) ----------------------------------------------------------
_ASWUDI = {"rank_rule": "participation_sqrt", "filter": "none", "min_rank": 1,
           "max_rank_ratio": 1.0, "init": "sum", "scaling": 1.0}
_ASWUDI_YAML = "fusion_bench/config/method/yongxianwei_merging/aswudi.yaml:4,41,46,53-54,56"
_add("swudi_a", "clip", _ASWUDI, "full fine-tunes of CLIP ViT (B/32, L/14); the defaults",
     f"{_ASWUDI_YAML}; {README}:128-133,144-149", defaults=True)
_add("swudi_a", "flan-t5-lora", _ASWUDI,
     "LoRA experts of an encoder-decoder (Flan-T5-base, GLUE, LoRA r = 16): participation_sqrt "
     "with no filter, at scaling 1 (the official rows run the defaults)",
     f"{README}:159-170 (method=yongxianwei_merging/aswudi, no overrides); {_ASWUDI_YAML}")
_add("swudi_a", "llama-full", {**_ASWUDI, "rank_rule": "gavish_donoho"},
     "full fine-tunes of an LLM (Llama-style)",
     "LLaMA-Factory/swudi_aswudi.py:236-239 ('best Llama-tuned rule'); "
     "fusion_bench/examples/yongxianwei_merging/summarize_llama32_3b_sweep.py:54")
_add("swudi_a", "qwen2vl-lora", {**_ASWUDI, "scaling": ONE_OVER_K},
     "LoRA experts (Qwen2-VL-7B, 5 densified LoRA experts)",
     f"{README}:210,217-221 (scaling 0.2); {QWEN_EXPERTS}; {ONE_OVER_N}")
_add("swudi_a", "internvl-full", {**_ASWUDI, "scaling": 0.1},
     "full fine-tunes of a multimodal LLM (InternVL2.5-1B, 5 experts)",
     f"{README}:237,250-254")

# --- WUDI (official: wudi.yaml; the MLLM baselines) -------------------------------------------
_add("wudi", "clip", {"iterations": 300, "lr": 1e-5, "optimizer": "adam", "init": "sum",
                      "scaling": 1.0},
     "full fine-tunes of CLIP ViT; the defaults",
     "fusion_bench/config/method/yongxianwei_merging/wudi.yaml:4,10-11", defaults=True)
_WUDI_MLLM = {"iterations": 300, "lr": 1e-5, "optimizer": "adam", "init": "sum", "scaling": 0.3}
_WUDI_MLLM_SRC = ("LLaMA-Factory/baseline_merging.py:476 (scaling 0.3, iter 300, "
                  "lr 1e-5), 332-333 (sum start, Adam)")
_add("wudi", "qwen2vl-lora", _WUDI_MLLM,
     "LoRA experts (Qwen2-VL-7B, the paper's WUDI baseline)",
     f"{_WUDI_MLLM_SRC}; used by LLaMA-Factory/run_merge_baseline.py:36,100-103")
_add("wudi", "internvl-full", _WUDI_MLLM,
     "full fine-tunes of a multimodal LLM (InternVL2.5-1B, the paper's WUDI baseline)",
     f"{_WUDI_MLLM_SRC}; used by LLaMA-Factory/run_merge_baseline_internvl.py:30,98-101",
     notes="the older InternVL/internvl_chat/model_merging.py:761 defaults every method to "
           "scaling 0.1; the baseline runner cited here uses 0.3")

# --- SVC (official: run.sh; CLIP only) --------------------------------------------------------
_add("svc", "clip", {"alpha": SVC_ALPHA, "space": "left"},
     "after any base method (the official code covers CLIP ViT only): α = 1 after TSV-M, "
     "1/K otherwise; the defaults except after TSV-M",
     "run.sh:1,11-16", repo=SVC,
     notes="run.sh computes 1/K with bc at 4 decimals (0.125 for its K = 8); specmerge uses "
           "1/K exactly")


def presets_of(method: str) -> list[Preset]:
    """The presets of ``method`` (none: an empty list)."""
    return list(_PRESETS.get(method, {}).values())


def all_presets() -> list[Preset]:
    return [p for by_name in _PRESETS.values() for p in by_name.values()]


def get_preset(method: str, name: Any, where: str) -> Preset:
    """The preset ``name`` of ``method``; a ValueError names ``where`` and the valid choices."""
    valid = list(_PRESETS.get(method, {}))
    choices = f"presets of {method!r}: {valid}" if valid else f"method {method!r} has no presets"
    if not isinstance(name, str):
        raise ValueError(f"{where} must be a preset name (a string), got {name!r}; {choices}")
    if name in valid:
        return _PRESETS[method][name]
    others = _BY_NAME.get(name)
    if others:
        raise ValueError(f"{where} {name!r} is a preset of {others}, not of {method!r}; "
                         f"{choices}")
    raise ValueError(f"{where} {name!r} is not a known preset; {choices}")


def apply_preset(method: str, params: Mapping[str, Any] | None, ctx: Context,
                 where: str) -> dict[str, Any]:
    """``params`` with its ``preset`` key replaced by the preset's values; the parameters given
    beside it win. Without a ``preset`` key, ``params`` as they are."""
    params = dict(params or {})
    if FIELD not in params:
        return params
    preset = get_preset(method, params.pop(FIELD), f"{where}.{FIELD}")
    return {**preset.resolve(ctx), **params}
