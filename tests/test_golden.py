"""Golden bytes: every output file of every method ± SVC, pinned by sha256.

The hashes in ``golden/hashes.json`` were recorded before the engine was split into
Source → Plan → Backend → Sink; the redesign must reproduce every byte. Text files that record
input paths (the model card, the resolved recipe) are hashed with the temporary root replaced
by ``<ROOT>``. torch runs with one thread here: LAPACK's SVD and eigh round differently with another thread
count, so the hashes pin it. Regenerate (only for an intended change, explained in the commit)
with::

    python tests/test_golden.py --write
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import specmerge
from specmerge.examples import QUICKSTART, llama_shape_for, write_example_models
from specmerge.methods.registry import all_methods

GOLDEN = Path(__file__).parent / "golden" / "hashes.json"
MODELS = {"quickstart": (QUICKSTART, 3, "float32"), "synthetic": (llama_shape_for(1_000_000), 4,
                                                                   "bfloat16")}
# (case name, method, parameters, recipe extras); every case runs with and without SVC
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    (m.name, m.name, {"iterations": 20} if m.name == "wudi" else {}, {})
    for m in all_methods() if not m.is_calibration
] + [
    ("ties_global", "ties", {"trim_scope": "global"}, {}),
    ("dare_seed7_bf16out", "dare", {}, {"seed": 7, "out_dtype": "bfloat16"}),
    ("task_arithmetic_f64", "task_arithmetic", {}, {"dtype": "float64", "out_dtype": "float32"}),
    ("tsv_m_fallback_ta", "tsv_m", {}, {"scope": {"exclude": ["embed", "lm_head", "re:\\.0\\."],
                                                  "fallback": "task_arithmetic"}}),
]
WORKERS = (1, 2)


def _case_ids() -> list[str]:
    return [f"{model}-{case[0]}{'+svc' if svc else ''}-w{w}" for model in MODELS
            for case in CASES for svc in (False, True) for w in WORKERS]


def hash_dir(out: Path, root: Path) -> dict[str, str]:
    hashes = {}
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        data = f.read_bytes()
        if f.suffix in (".md", ".yaml", ".json"):
            data = data.replace(str(root).encode(), b"<ROOT>")
        hashes[str(f.relative_to(out))] = hashlib.sha256(data).hexdigest()
    return hashes


def run_case(root: Path, model: str, case: tuple[str, str, dict[str, Any], dict[str, Any]],
             svc: bool, workers: int) -> dict[str, str]:
    name, method, params, extra = case
    mdir = root / model
    k = MODELS[model][1]
    recipe: dict[str, Any] = {"base_model": str(mdir / "base"),
                              "models": [str(mdir / f"expert_{i + 1}") for i in range(k)],
                              "merge_method": method, "parameters": params, **extra}
    if svc:
        recipe["calibrate"] = {"method": "svc"}
    out = root / "out" / f"{model}-{name}-{svc}-{workers}"
    specmerge.merge(recipe, out, workers=workers, shard_size="300KB", progress=False)
    return hash_dir(out, root)


def make_models(root: Path) -> None:
    for model, (shape, k, dtype) in MODELS.items():
        write_example_models(root / model, shape, k, dtype=dtype, seed=1, progress=False)


def all_hashes(root: Path) -> dict[str, dict[str, str]]:
    make_models(root)
    out = {}
    for model in MODELS:
        for case in CASES:
            for svc in (False, True):
                for w in WORKERS:
                    out[f"{model}-{case[0]}{'+svc' if svc else ''}-w{w}"] = run_case(
                        root, model, case, svc, w)
    return out


@pytest.fixture(scope="module")
def golden_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("golden")
    make_models(root)
    yield root
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case_id", _case_ids())
def test_golden_bytes(golden_root: Path, case_id: str) -> None:
    expected = json.loads(GOLDEN.read_text())[case_id]
    model, rest = case_id.split("-", 1)
    rest, w = rest.rsplit("-w", 1)
    svc = rest.endswith("+svc")
    name = rest.removesuffix("+svc")
    case = next(c for c in CASES if c[0] == name)
    assert run_case(golden_root, model, case, svc, int(w)) == expected


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(all_hashes(Path(d).resolve()), indent=1, sort_keys=True)
                          + "\n")
    print(f"wrote {GOLDEN}")
