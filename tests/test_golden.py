"""Goldens: every output of every method ± SVC, on both example models, checked by value.

``golden/values.json`` holds one record per case: the exact sha256 of every text file (the
model card, the resolved recipe, config and index, with the temporary root replaced by
``<ROOT>``) and, per tensor, its dtype, shape, float64 norm and a seeded sample of entries. A
tensor passes when its norm and sampled entries agree within a tolerance that follows from the
dtype and from the conditioning of the case, measured when the record was made (``tolerances``):
another CPU, MKL code path or thread count rounds an SVD or eigendecomposition differently, so
SVD output is never compared by its bytes across machines (docs/numerics.md).

Bytes are still compared where they must agree: inside one test session, on one machine, the
``-w2`` cases compare every byte with the ``-w1`` output of the same session (and ``test_ray``,
``test_blocks`` and ``test_overlap`` do the same for Ray, block sizes and prefetch).

Regenerate (only for an intended change, explained in the commit) with::

    python tests/test_golden.py --write

or, for new cases (a new method), record only the cases the file lacks, leaving every existing
record as it is, with ``python tests/test_golden.py --write-new``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import accepts_experts
from safetensors import safe_open

import specmerge
from specmerge.examples import QUICKSTART, llama_shape_for, write_example_models
from specmerge.methods.registry import all_methods

GOLDEN = Path(__file__).parent / "golden" / "values.json"
MODELS = {"quickstart": (QUICKSTART, 3, "float32"), "synthetic": (llama_shape_for(1_000_000), 4,
                                                                   "bfloat16")}
# (case name, method, parameters, recipe extras); every case runs with and without SVC
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    (m.name, m.name, {"iterations": 20} if m.name == "wudi" else {},
     {} if all(accepts_experts(m.name, k) for _, k, _ in MODELS.values())
     else {"experts": next(n for n in (1, 2) if accepts_experts(m.name, n))})
    for m in all_methods() if not m.is_calibration
    and (any(accepts_experts(m.name, n) for n in (1, 2))
         or all(accepts_experts(m.name, k) for _, k, _ in MODELS.values()))
] + [  # "experts": merge only the first n of the experts (slerp, nearswap take one, nuslerp two);
    # methods that take no experts (passthrough: slices) are tested in test_slices.py
    ("ties_global", "ties", {"trim_scope": "global"}, {}),
    ("dare_seed7_bf16out", "dare", {}, {"seed": 7, "out_dtype": "bfloat16"}),
    ("task_arithmetic_f64", "task_arithmetic", {}, {"dtype": "float64", "out_dtype": "float32"}),
    ("tsv_m_fallback_ta", "tsv_m", {}, {"scope": {"exclude": ["embed", "lm_head", "re:\\.0\\."],
                                                  "fallback": "task_arithmetic"}}),
]
WORKERS = (1, 2)
TEXT = (".md", ".yaml", ".json")
SAMPLE = 32  # entries per tensor, at positions seeded by the tensor's name
# Tolerance = SAFETY × the float32-against-float64 deviation of the case (each machine's
# float32 result lies about that far from the exact one, so two machines lie at most about twice
# as far apart) + rounding floors of the output dtype. docs/numerics.md derives it.
SAFETY = 8.0


def _case_ids() -> list[str]:
    return [f"{model}-{case[0]}{'+svc' if svc else ''}-w{w}" for model in MODELS
            for case in CASES for svc in (False, True) for w in WORKERS]


def parse_case_id(case_id: str) -> tuple[str, tuple[str, str, dict[str, Any], dict[str, Any]],
                                         bool, int]:
    model, rest = case_id.split("-", 1)
    rest, w = rest.rsplit("-w", 1)
    name = rest.removesuffix("+svc")
    return model, next(c for c in CASES if c[0] == name), rest.endswith("+svc"), int(w)


def hash_dir(out: Path, root: Path) -> dict[str, str]:
    """sha256 of every file under ``out`` (text files with ``root`` as ``<ROOT>``): for byte
    comparisons inside one session, never across machines."""
    hashes = {}
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        data = f.read_bytes()
        if f.suffix in TEXT:
            data = data.replace(str(root).encode(), b"<ROOT>")
        hashes[str(f.relative_to(out))] = hashlib.sha256(data).hexdigest()
    return hashes


def sample_positions(name: str, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randint(numel, (min(SAMPLE, numel),), generator=g)


def read_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})  # noqa: SIM118
    return tensors


def summarize(out: Path, root: Path) -> dict[str, Any]:
    """The golden record of one output directory: text files by hash, tensors by value."""
    files = {k: v for k, v in hash_dir(out, root).items() if k.endswith(TEXT)}
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    return {"files": files, "weights": weights, "tensors": summarize_tensors(read_tensors(out))}


def summarize_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per tensor: dtype, shape, float64 norm and the entries at ``sample_positions``."""
    summary = {}
    for name, t in tensors.items():
        x = t.double().flatten()
        summary[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                         "norm": float(x.norm()),
                         "sample": x[sample_positions(name, x.numel())].tolist()}
    return summary


def deviations(reference: Path, other: Path) -> dict[str, tuple[float, float]]:
    """Per tensor of two outputs of the same case: (‖x − x_ref‖, |‖x‖ − ‖x_ref‖|) / ‖x_ref‖."""
    ref, near = read_tensors(reference), read_tensors(other)
    out = {}
    for k, v in ref.items():
        x, y = v.double(), near[k].double()
        scale = float(x.norm()) or 1e-300
        out[k] = (float((y - x).norm()) / scale, abs(float(y.norm()) - float(x.norm())) / scale)
    return out


def tolerances(record: dict[str, Any], spread: dict[str, tuple[float, float]],
               compute: str) -> None:
    """Add each tensor's ``rtol`` (for its norm) and ``atol`` (for its entries) to ``record``.

    F = the largest relative Frobenius distance between this machine's code paths, at least
    F_0 = √(eps_c · eps_out), what one ulp of the compute dtype leaves after rounding to the
    output dtype (a share eps_c / eps_out of the entries flips by one ulp; F_0 = eps_c when
    they are the same dtype); n = the largest relative change of the norm seen.
    norm:    rounding moves entries at random, so the norm moves by about F / √N (the part of
             the difference along x); |‖a‖ − ‖e‖| ≤ SAFETY · max(n, F / √N) · ‖e‖.
    entries: |a_j − e_j| ≤ SAFETY · F · rms(e) + one ulp of the output dtype at e_j (a value
             that lands on the other side of a rounding boundary flips by one ulp).
    """
    eps_c = torch.finfo(getattr(torch, compute)).eps
    for name, t in record["tensors"].items():
        eps_out = torch.finfo(getattr(torch, t["dtype"])).eps
        n = max(1, math.prod(t["shape"]))
        frob = max(spread[name][0], math.sqrt(eps_c * max(eps_out, eps_c)))
        t["rtol"] = SAFETY * max(spread[name][1], frob / math.sqrt(n))
        t["atol"] = SAFETY * frob * t["norm"] / math.sqrt(n)


def compare(actual: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Every way ``actual`` differs from the golden ``expected``, one line each."""
    errors = [f"{f}: text differs" for f in sorted(set(actual["files"]) | set(expected["files"]))
              if actual["files"].get(f) != expected["files"].get(f)]
    if actual["weights"] != expected["weights"]:
        errors.append(f"weight files {actual['weights']} != {expected['weights']}")
    got, want = actual["tensors"], expected["tensors"]
    errors += [f"{k}: missing" for k in sorted(set(want) - set(got))]
    errors += [f"{k}: unexpected" for k in sorted(set(got) - set(want))]
    for k in sorted(set(got) & set(want)):
        a, e = got[k], want[k]
        if (a["dtype"], a["shape"]) != (e["dtype"], e["shape"]):
            errors.append(f"{k}: {a['dtype']}{a['shape']} != {e['dtype']}{e['shape']}")
            continue
        if abs(a["norm"] - e["norm"]) > e["rtol"] * e["norm"]:
            errors.append(f"{k}: norm {a['norm']!r} != {e['norm']!r} "
                          f"(rel {abs(a['norm'] - e['norm']) / e['norm']:.2e} > {e['rtol']:.2e})")
        eps = torch.finfo(getattr(torch, e["dtype"])).eps
        bad = [j for j, (x, y) in enumerate(zip(a["sample"], e["sample"], strict=True))
               if abs(x - y) > e["atol"] + eps * abs(y)]
        if bad:
            j = bad[0]
            errors.append(f"{k}: {len(bad)} of {len(e['sample'])} sampled entries differ, e.g. "
                          f"{a['sample'][j]!r} != {e['sample'][j]!r}")
    return errors


def recipe_of(root: Path, model: str, case: tuple[str, str, dict[str, Any], dict[str, Any]],
              svc: bool, **override: Any) -> dict[str, Any]:
    _, method, params, extra = case
    mdir = root / model
    extra = dict(extra)
    k = extra.pop("experts", MODELS[model][1])
    recipe: dict[str, Any] = {"base_model": str(mdir / "base"),
                              "models": [str(mdir / f"expert_{i + 1}") for i in range(k)],
                              "merge_method": method, "parameters": params, **extra, **override}
    if svc:
        recipe["calibrate"] = {"method": "svc"}
    return recipe


def run_case(root: Path, model: str, case: tuple[str, str, dict[str, Any], dict[str, Any]],
             svc: bool, workers: int, tag: str = "", **override: Any) -> Path:
    out = root / "out" / f"{model}-{case[0]}-{svc}-{workers}{tag}"
    specmerge.merge(recipe_of(root, model, case, svc, **override), out, workers=workers,
                    shard_size="300KB", progress=False)
    return out


def make_models(root: Path) -> None:
    for model, (shape, k, dtype) in MODELS.items():
        write_example_models(root / model, shape, k, dtype=dtype, seed=1, progress=False)


def record_keys() -> list[tuple[str, str, tuple[str, str, dict[str, Any], dict[str, Any]], bool]]:
    return [(f"{model}-{case[0]}{'+svc' if svc else ''}", model, case, svc)
            for model in MODELS for case in CASES for svc in (False, True)]


# Other code paths of this machine's MKL and ATen, and other thread counts: the spread of a
# case's outputs over them measures how far rounding alone moves it (docs/numerics.md).
CODE_PATHS = {"mkl-compatible": {"MKL_CBWR": "COMPATIBLE"}, "mkl-avx2": {"MKL_CBWR": "AVX2"},
              "mkl-sse42": {"MKL_CBWR": "SSE4_2"},
              "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
              "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
              "threads-1": {"OMP_NUM_THREADS": "1"}, "threads-3": {"OMP_NUM_THREADS": "3"},
              "portable": {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default"}}


def run_all(root: Path, tag: str, names: list[str] | None = None) -> None:
    for _, model, case, svc in record_keys():
        if names is None or case[0] in names:
            run_case(root, model, case, svc, 1, tag)


def all_records(root: Path, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Record every case here (or the cases named in ``names``), then re-run them on each of
    ``CODE_PATHS`` (one process each) and derive each tensor's tolerance from the largest
    deviation seen."""
    import os
    import subprocess

    make_models(root)
    run_all(root, "", names)
    for tag, env in CODE_PATHS.items():
        subprocess.run([sys.executable, __file__, "--run-all", str(root), f"-{tag}",
                        *(names or [])], check=True, env={**os.environ, **env})
    records = {}
    for key, model, case, svc in record_keys():
        if names is not None and case[0] not in names:
            continue
        out = root / "out" / f"{model}-{case[0]}-{svc}-1"
        record = summarize(out, root)
        spread = dict.fromkeys(record["tensors"], (0.0, 0.0))
        for tag in CODE_PATHS:
            for k, d in deviations(out, out.with_name(f"{out.name}-{tag}")).items():
                spread[k] = (max(spread[k][0], d[0]), max(spread[k][1], d[1]))
        tolerances(record, spread, case[3].get("dtype", "float32"))
        records[key] = record
    return records


@pytest.fixture(scope="module")
def golden_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("golden")
    make_models(root)
    yield root


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case_id", _case_ids())
def test_golden(golden_root: Path, golden: dict[str, Any], case_id: str) -> None:
    """-w1: the values match the golden record; -w2: the bytes match -w1 of this session."""
    model, case, svc, workers = parse_case_id(case_id)
    if workers == 1:
        out = run_case(golden_root, model, case, svc, 1)
        assert compare(summarize(out, golden_root), golden[case_id.removesuffix("-w1")]) == []
        return
    first = golden_root / "out" / f"{model}-{case[0]}-{svc}-1"
    if not first.exists():  # -w2 run alone (pytest -k): make its -w1 here
        run_case(golden_root, model, case, svc, 1)
    assert (hash_dir(run_case(golden_root, model, case, svc, workers), golden_root)
            == hash_dir(first, golden_root))


@pytest.mark.parametrize("threads", [1, 3])
def test_workers_give_the_same_bytes_at_any_thread_count(golden_root: Path, threads: int) -> None:
    """Worker threads compute with the caller's torch thread count, not OpenMP's default (a
    new thread's): with 1 or 3 threads set, 2 workers wrote other bytes than 1 did."""
    case = next(c for c in CASES if c[0] == "tsv_m")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one, two = (hash_dir(run_case(golden_root, "quickstart", case, True, w, f"-t{threads}"),
                             golden_root) for w in (1, 2))
    finally:
        torch.set_num_threads(before)
    assert one == two


def test_example_models_are_the_same_bytes_on_another_code_path(tmp_path: Path) -> None:
    """The goldens' inputs: ``write_example_models`` writes the same bytes whatever kernels
    ATen and MKL pick (``torch.randn`` would not: its AVX and scalar kernels differ)."""
    import os
    import subprocess

    code = ("import sys; from specmerge.examples import *; "
            "write_example_models(sys.argv[1], llama_shape_for(1_000_000), 2, dtype='bfloat16', "
            "seed=1, progress=False)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "other")], check=True, env=env)
    write_example_models(tmp_path / "here", llama_shape_for(1_000_000), 2, dtype="bfloat16",
                         seed=1, progress=False)
    assert hash_dir(tmp_path / "other", tmp_path / "other") == hash_dir(tmp_path / "here",
                                                                         tmp_path / "here")


def _scaled(name: str, factor: float) -> Any:
    """A broken ``check_finite`` of the engine: it scales the merged tensor ``name`` (in the
    compute dtype, before the cast to the output dtype) in place."""
    from specmerge.engine import steps as engine

    real = engine.check_finite

    def broken(x: torch.Tensor, what: str, *args: Any, **kw: Any) -> None:
        if f"{name!r}" in what:
            x.mul_(factor)
        real(x, what, *args, **kw)
    return broken


BREAK_CASES = ["quickstart-tsv_m+svc", "quickstart-iso_c", "quickstart-swudi",
               "synthetic-swudi+svc", "synthetic-tsv_m+svc", "synthetic-iso_cts+svc",
               "synthetic-wudi_closed_form"]


@pytest.mark.parametrize("key", BREAK_CASES)
@pytest.mark.parametrize("kind", ["scale-1e-4", "swap", "drop", "card", "recipe", "svc-alpha",
                                  "ties-density"])
def test_the_goldens_catch_deliberate_breaks(golden_root: Path, golden: dict[str, Any],
                                             monkeypatch: pytest.MonkeyPatch, key: str,
                                             kind: str) -> None:
    """Each break of the code or the output that the goldens exist to catch is caught: a
    relative change of 1e-4 in one merged matrix (before rounding to the output dtype), two
    tensors swapped, a tensor dropped, a changed model card or resolved recipe, a changed
    default (SVC's α, TIES's density)."""
    model, case, svc, _ = parse_case_id(key + "-w1")
    name = "model.layers.1.self_attn.q_proj.weight"
    tag, override = f"-{kind}-{key}", {}
    if kind == "scale-1e-4":
        monkeypatch.setattr("specmerge.engine.steps.check_finite", _scaled(name, 1 + 1e-4))
    if kind == "svc-alpha":  # the default α = 1/K, as another default would be
        case = (case[0], case[1], case[2], {**case[3], "calibrate": {
            "method": "svc", "alpha": 1.1 / MODELS[model][1]}})
        svc = False
    if kind == "ties-density":
        key = f"{model}-ties{'+svc' if svc else ''}"
        case = next(c for c in CASES if c[0] == "ties")
        override = {"parameters": {"density": 0.21}}
    out = run_case(golden_root, model, case, svc, 1, tag, **override)
    record = summarize(out, golden_root)
    tensors = read_tensors(out)
    if kind == "swap":
        other = name.replace("layers.1", "layers.0")
        tensors[name], tensors[other] = tensors[other], tensors[name]
    if kind == "drop":
        del tensors[name]
    record["tensors"] = summarize_tensors(tensors)
    if kind in ("card", "recipe"):
        f = out / ("README.md" if kind == "card" else "specmerge_recipe.yaml")
        f.write_text(f.read_text().replace("\n", "\n\n", 1))
        record["files"] = summarize(out, golden_root)["files"]
    else:  # the values alone must show it (the recipe records a changed parameter too)
        record["files"] = golden[key]["files"]
    assert compare(record, golden[key]) != []


if __name__ == "__main__" and "--run-all" in sys.argv:
    run_all(Path(sys.argv[2]), sys.argv[3], sys.argv[4:] or None)
elif __name__ == "__main__" and "--write-new" in sys.argv:
    import tempfile

    old = json.loads(GOLDEN.read_text())
    new = sorted({case[0] for key, _, case, _ in record_keys() if key not in old})
    with tempfile.TemporaryDirectory() as d:
        added = {k: v for k, v in all_records(Path(d).resolve(), new).items() if k not in old}
    GOLDEN.write_text(json.dumps({**old, **added}, indent=0, sort_keys=True) + "\n")
    print(f"added {len(added)} records to {GOLDEN}: {sorted(added)}")
elif __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(all_records(Path(d).resolve()), indent=0, sort_keys=True)
                          + "\n")
    print(f"wrote {GOLDEN}")
