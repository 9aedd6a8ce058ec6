"""The recipes of benchmarks/peers/mergekit_parity.py: every mergekit 0.1.5 method and recipe
feature, written in mergekit's YAML with placeholder model names (BASE, EXPERT_1..3 for the
40-layer stand-ins, BIG_A/BIG_B for the 2-layer pair whose embedding has over 1M entries), and
why a case cannot agree to 1 ulp where it cannot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mergekit"
WD = [(1.0, 0.5), (0.5, 0.7), (0.3, 0.9)]  # (weight, density) of experts 1..3


def _experts(keys: tuple[str, ...] = ("weight", "density"), n: int = 3) -> list[dict[str, Any]]:
    out = []
    for i, (w, d) in enumerate(WD[:n]):
        p = {k: v for k, v in (("weight", w), ("density", d)) if k in keys}
        out.append({"model": f"EXPERT_{i + 1}", **({"parameters": p} if p else {})})
    return out


def _plain(n: int = 3) -> list[dict[str, Any]]:
    return [{"model": f"EXPERT_{i + 1}"} for i in range(n)]


def _tb(method: str, models: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    """A recipe of ``method`` on BASE and ``models``."""
    return {"models": models, "merge_method": method, "base_model": "BASE",
            **({"parameters": params} if params else {})}


CASES: dict[str, dict[str, Any]] = {
    "linear": {"models": [{"model": "BASE", "parameters": {"weight": 0.4}},
                          *_experts(keys=("weight",))], "merge_method": "linear"},
    "task_arithmetic": _tb("task_arithmetic", _experts(keys=("weight",)), **{"lambda": 0.8}),
    "ties": _tb("ties", [{"model": "BASE"}, *_experts()], normalize=True, int8_mask=True),
    "breadcrumbs": _tb("breadcrumbs", _experts()),
    "breadcrumbs_ties": _tb("breadcrumbs_ties", _experts(), gamma=0.05),
    "dare_ties": _tb("dare_ties", _experts()),
    "dare_linear": _tb("dare_linear", _experts()),
    "della": _tb("della", _experts(), epsilon=0.05, **{"lambda": 0.9}),
    "della_linear": _tb("della_linear", _experts(), epsilon=0.05),
    "sce": _tb("sce", _plain(), select_topk=0.5),
    "model_stock": _tb("model_stock", _plain()),
    "model_stock, filter_wise": _tb("model_stock", _plain(2), filter_wise=True),
    "slerp (t 0.3)": _tb("slerp", [{"model": "BASE"}, *_plain(1)], t=0.3),
    "slerp, t a gradient and filtered": _tb(
        "slerp", [{"model": "BASE"}, *_plain(1)],
        t=[{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
           {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]),
    "nearswap (t 0.01)": _tb("nearswap", [{"model": "BASE"}, *_plain(1)], t=0.01),
    "karcher (3 models, no base)": {"models": _plain(), "merge_method": "karcher",
                                    "parameters": {"max_iter": 10, "tol": 1e-5}},
    "nuslerp (base + 2)": _tb("nuslerp", [{"model": "EXPERT_1", "parameters": {"weight": 0.3}},
                                          {"model": "EXPERT_2", "parameters": {"weight": 0.7}}]),
    "nuslerp (2 models, no base, rows)": {
        "models": [{"model": "EXPERT_1", "parameters": {"weight": 0.4}},
                   {"model": "EXPERT_2", "parameters": {"weight": 0.6}}],
        "merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False}},
    "multislerp (base + 3)": _tb("multislerp", _experts(keys=("weight",))),
    "multislerp (3 models, no base)": {"models": _experts(keys=("weight",)),
                                       "merge_method": "multislerp"},
    "arcee_fusion": _tb("arcee_fusion", [{"model": "BASE"}, *_plain(1)]),
    "arcee_fusion, a 1.05M-entry embedding": {
        "models": [{"model": "BIG_A"}, {"model": "BIG_B"}], "merge_method": "arcee_fusion",
        "base_model": "BIG_A"},
    "ram": _tb("ram", _plain()),
    "ramplus_tl": _tb("ramplus_tl", _plain(), r=0.2, alpha=0.3),
    "passthrough of one model": {"models": [{"model": "EXPERT_2"}],
                                 "merge_method": "passthrough"},
    "passthrough of slices (8 + 36 = 44 layers)": {
        "slices": [{"sources": [{"model": "EXPERT_1", "layer_range": [0, 8]}]},
                   {"sources": [{"model": "EXPERT_2", "layer_range": [4, 40]}]}],
        "merge_method": "passthrough"},
    "ties, gradients and filters": _tb(
        "ties", [{"model": "EXPERT_1", "parameters": {"weight": 1.0, "density": [1, 0.7, 0.1]}},
                 {"model": "EXPERT_2", "parameters": {"weight": [0, 0.3, 0.7, 1],
                                                      "density": 0.5}},
                 {"model": "EXPERT_3", "parameters": {
                     "density": 0.33, "weight": [{"filter": "mlp", "value": 0.5},
                                                 {"value": 0}]}}],
        normalize=True, int8_mask=True),
}

RANDOM = {  # case → why its output is random; compared by statistics, not values
    "dare_ties": "DARE's Bernoulli masks: mergekit draws them from torch's global RNG, "
                 "specmerge from per-parameter seeds",
    "dare_linear": "as dare_ties",
    "della": "DELLA's magnitude-ranked Bernoulli masks, from different generators as DARE's",
    "della_linear": "as della",
    "arcee_fusion, a 1.05M-entry embedding":
        "the quartiles of a tensor over 1M entries are estimated from 1M entries sampled "
        "with replacement (mergekit: torch's global RNG; specmerge: a per-parameter seed); "
        "every smaller tensor is deterministic",
}
NOTES = {
    "float16": "mergekit computes in the recipe's float16, specmerge in float32 and rounds "
               "once: the difference is float16 rounding (the float32 row is the check)",
    "bfloat16": "mergekit computes in the recipe's bfloat16, specmerge in float32 and rounds "
                "once (the float32 row is the check)",
}


def example_cases() -> dict[str, dict[str, Any]]:
    """mergekit's six example recipes (examples/mergekit/), their models mapped in order of
    appearance to BASE, EXPERT_1..3, as written and again in float32."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(EXAMPLES.glob("*.yml")):
        data = yaml.safe_load(f.read_text())
        names: dict[str, str] = {}

        def name(p: str, names: dict[str, str] = names) -> str:
            return names.setdefault(p, ["BASE", "EXPERT_1", "EXPERT_2", "EXPERT_3"][len(names)])

        if data.get("base_model"):
            name(data["base_model"])
        text = f.read_text()
        for p in sorted({m["model"] for m in data.get("models", [])}
                        | {s["model"] for sl in data.get("slices", []) for s in sl["sources"]},
                        key=text.index):
            name(p)
        for p, n in names.items():
            text = text.replace(p, n)
        recipe = yaml.safe_load(text)
        out[f"examples/{f.name}"] = recipe
        if recipe.get("dtype", "float32") != "float32":
            out[f"examples/{f.name}, dtype float32"] = {**recipe, "dtype": "float32"}
    return out
