"""Reference outputs of mergekit 0.1.5's own method code on small seeded tensors.

It runs mergekit's kernels (slerp, nearswap, model_stock, sce, della, della_linear, karcher,
nuslerp, multislerp, arcee_fusion, ram, ramplus_tl) inside the throw-away mergekit virtualenv
(``mergekit_parity.ensure_mergekit``), never specmerge's, and writes ``tests/golden/mergekit_methods.json``: per case the method, its parameters, the seed
and the inputs (θ0 and the θ_i, float32) and mergekit's merged tensor. The test
(tests/test_mergekit_methods.py) compares specmerge's methods to these numbers without mergekit.
DELLA's masks come from torch's global RNG, seeded with the case's seed just before the call;
specmerge reproduces them by drawing all experts' masks, in order, from one generator with that
seed.

    python benchmarks/peers/mergekit_methods_golden.py [--venv DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (name, mergekit method, shape, number of non-base models, seed, parameters); per-model
# parameters are lists, one value per non-base model
CASES = [
    ("slerp t=0.3", "slerp", (6, 5), 1, 1, {"t": 0.3}),
    ("slerp t=0.5, 1-D", "slerp", (7,), 1, 2, {"t": 0.5}),
    ("slerp t=1.2 (extrapolation)", "slerp", (4, 3), 1, 3, {"t": 1.2}),
    ("slerp near-collinear (linear branch)", "slerp", (6, 5), 1, 4, {"t": 0.4}, 0.001),
    ("nearswap t=0.05", "nearswap", (6, 5), 1, 5, {"t": 0.05}),
    ("nearswap t=0.0001", "nearswap", (9,), 1, 6, {"t": 0.0001}),
    ("model_stock K=3", "model_stock", (6, 5), 3, 7, {}),
    ("model_stock K=2 filter_wise", "model_stock", (6, 5), 2, 8, {"filter_wise": True}),
    ("model_stock K=3 filter_wise 1-D", "model_stock", (7,), 3, 9, {"filter_wise": True}),
    ("sce K=3", "sce", (6, 5), 3, 10, {}),
    ("sce K=3 select_topk=0.5", "sce", (6, 5), 3, 11, {"select_topk": 0.5}),
    ("della K=3", "della", (6, 5), 3, 12,
     {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.7, 0.4], "epsilon": [0.1, 0.1, 0.1]}),
    ("della K=2 lambda=0.7, 1-D", "della", (11,), 2, 13,
     {"weight": [0.6, 0.9], "density": [0.5, 0.5], "lambda": 0.7}),
    ("della_linear K=3", "della_linear", (6, 5), 3, 14,
     {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.7, 0.4]}),
    ("della_linear K=2 normalize", "della_linear", (6, 5), 2, 15,
     {"weight": [0.3, 0.9], "density": [0.6, 0.3], "normalize": True, "epsilon": [0.2, 0.2]}),
    # an 8th element: options. "no_base": the group has no base (mergekit without base_model;
    # the models are θ0 and the θ_i, and the per-model weights start with θ0's). "keep": each
    # θ_i − θ0 is zero outside a random share ``keep`` of its entries (drawn after the models)
    ("karcher K=2", "karcher", (6, 5), 2, 16, {}),
    ("karcher K=3 max_iter=3 spread=1", "karcher", (6, 5), 3, 17, {"max_iter": 3}, 1.0),
    ("karcher K=1 tol=1e-3, 1-D", "karcher", (9,), 1, 18, {"tol": 1e-3}, 0.5),
    ("nuslerp K=2", "nuslerp", (6, 5), 2, 19, {"weight": [0.3, 0.7]}),
    ("nuslerp K=2 rows", "nuslerp", (6, 5), 2, 20,
     {"weight": [1.0, 2.0], "nuslerp_flatten": False}),
    ("nuslerp K=2 row_wise (columns)", "nuslerp", (6, 5), 2, 21,
     {"weight": [0.5, 0.5], "nuslerp_flatten": False, "nuslerp_row_wise": True}, 1.0),
    ("nuslerp no base", "nuslerp", (6, 5), 1, 22, {"weight": [1.0, 1.0]}, 1.0, {"no_base": True}),
    ("nuslerp no base rows, 1-D", "nuslerp", (8,), 1, 23,
     {"weight": [0.2, 0.6], "nuslerp_flatten": False}, 1.0, {"no_base": True}),
    ("multislerp K=3", "multislerp", (6, 5), 3, 24, {"weight": [1.0, 0.5, 0.8]}),
    ("multislerp K=2 normalize_weights=false", "multislerp", (6, 5), 2, 25,
     {"weight": [0.4, 0.3], "normalize_weights": False}),
    ("multislerp no base K=3", "multislerp", (6, 5), 2, 26, {"weight": [0.5, 1.0, 1.5]}, 1.0,
     {"no_base": True}),
    ("multislerp K=1", "multislerp", (7,), 1, 27, {"weight": [2.0]}),
    ("arcee_fusion", "arcee_fusion", (6, 5), 1, 28, {}),
    ("arcee_fusion 40x30", "arcee_fusion", (40, 30), 1, 29, {}),
    ("arcee_fusion 1-D", "arcee_fusion", (50,), 1, 30, {}, 0.5),
    ("ram K=3 sparse", "ram", (6, 5), 3, 31, {}, 0.1, {"keep": 0.4}),
    ("ram K=2 epsilon=0.05", "ram", (6, 5), 2, 32, {"epsilon": 0.05}),
    ("ram K=3 dense", "ram", (9,), 3, 33, {}),
    ("ramplus_tl K=3 sparse", "ramplus_tl", (6, 5), 3, 34, {}, 0.1, {"keep": 0.4}),
    ("ramplus_tl K=3 r=0.5 alpha=0.8", "ramplus_tl", (6, 5), 3, 35, {"r": 0.5, "alpha": 0.8},
     0.1, {"keep": 0.3}),
    ("ramplus_tl K=2 epsilon=0.05", "ramplus_tl", (8, 4), 2, 36, {"epsilon": 0.05}),
]

KERNEL = r'''
import json, sys
import torch
import mergekit
from importlib.metadata import version
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import PerInputValues, TensorGroup
from mergekit.merge_methods.slerp import slerp

cases = json.load(sys.stdin)
out = []
for name, method, shape, k, seed, params, spread, opts in cases:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    models = [base + spread * torch.randn(shape, generator=gen) for _ in range(k)]
    if "keep" in opts:
        masks = [torch.rand(shape, generator=gen) < opts["keep"] for _ in range(k)]
        models = [torch.where(m, x, base) for m, x in zip(masks, models)]
    extra = {"options": opts} if opts else {}
    if method == "slerp":
        merged = slerp(torch.tensor([params["t"]]), base[None], models[0][None])[0]
    elif method in ("karcher", "nuslerp", "multislerp", "arcee_fusion", "ram", "ramplus_tl"):
        no_base = opts.get("no_base", False) or method == "karcher"  # karcher: every input
        group = TensorGroup.from_tensors([base, *models], base_index=None if no_base else 0)
        kw = dict(params)
        if "weight" in kw:
            first = 0 if no_base else 1
            kw["weight"] = PerInputValues([(i + first, w) for i, w in enumerate(kw["weight"])])
        merged = registry.get(method).merge_group(group, **kw)
    else:
        group = TensorGroup.from_tensors([base, *models], base_index=0)
        kw = dict(params)
        m = registry.get(method)
        if method.startswith("della"):
            defaults = {"int8_mask": False, "normalize": method == "della", "rescale": True,
                        "lambda": 1.0}
            kw = {**defaults, **kw}
            kw.setdefault("epsilon", [0.15] * k)
            for key in ("weight", "density", "epsilon"):
                kw[key] = {i + 1: v for i, v in enumerate(kw[key])}
            torch.manual_seed(seed)
        merged = m.merge_group(group, **kw)
    out.append({"name": name, "method": method, "seed": seed, "spread": spread,
                "params": params, **extra, "base": base.tolist(),
                "models": [t.tolist() for t in models], "merged": merged.tolist()})
print(json.dumps({"mergekit": version("mergekit"), "torch": torch.__version__,
                  "cases": out}))
'''


def main() -> None:
    from mergekit_parity import VENV_DEFAULT, ensure_mergekit

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=VENV_DEFAULT)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "golden" / "mergekit_methods.json")
    args = ap.parse_args()
    py = ensure_mergekit(args.venv).parent / "python"
    cases = [[*c, 0.1, {}] if len(c) == 6 else [*c, {}] if len(c) == 7 else list(c)
             for c in CASES]
    res = subprocess.run([str(py), "-c", KERNEL], input=json.dumps(cases), capture_output=True,
                         text=True)
    if res.returncode:
        sys.exit(f"mergekit failed:\n{res.stderr[-3000:]}")
    data = json.loads(res.stdout)
    data["inputs"] = ("θ0 = randn(shape), θ_i = θ0 + spread · randn(shape), float32, from "
                      "torch.Generator().manual_seed(seed), in that order")
    data["options"] = ("no_base: mergekit's group has no base (karcher always: it averages every "
                       "input); the models are θ0 and the θ_i, weights in that order. keep: "
                       "then θ_i = θ0 outside torch.rand(shape) < keep, one draw per model from "
                       "the same generator")
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}: {len(data['cases'])} cases, mergekit {data['mergekit']}")


if __name__ == "__main__":
    main()
