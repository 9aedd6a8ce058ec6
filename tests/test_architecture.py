"""The four parts: one plan for every entry point, picklable jobs, no method names in the engine,
constraints declared once, and a core that never imports the benchmark."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import accepts_experts, recipe_for

import specmerge
from specmerge.backends import LocalBackend
from specmerge.engine import MergeStep, run_statistics
from specmerge.methods.registry import AnyOf, Interval, Options, all_methods, get_method
from specmerge.plan import build_plan
from specmerge.recipe import load_recipe
from specmerge.sources import CheckpointSource, StateDictSource

SRC = Path(specmerge.__file__).parent
# every merge method that takes the toy models' 3 experts (slerp and nearswap take one: their
# end-to-end tests are in test_mergekit_methods.py)
MERGE_METHODS = [m.name for m in all_methods()
                 if not m.is_calibration and accepts_experts(m.name, 3)]


def _params(method: str) -> dict:
    return {"iterations": 5} if method == "wudi" else {}


@pytest.mark.parametrize("svc", [False, True])
@pytest.mark.parametrize("method", MERGE_METHODS)
def test_state_dicts_equal_files_bit_for_bit_with_out_dtype(toy_models, tmp_path, method,
                                                           svc) -> None:
    from safetensors.torch import load_file

    extra = {"calibrate": {"method": "svc"}} if svc else {}
    recipe = recipe_for(toy_models, method, parameters=_params(method), out_dtype="bfloat16",
                        **extra)
    res = specmerge.merge(recipe, tmp_path / "out", progress=False)
    files = load_file(str(res.out_dir / "model.safetensors"))
    mem = specmerge.merge_state_dicts(recipe, toy_models["base_sd"], toy_models["expert_sds"])
    assert list(mem) == list(toy_models["base_sd"])
    for name, t in mem.items():
        assert t.dtype == files[name].dtype == torch.bfloat16, name
        assert torch.equal(t, files[name]), name


def test_state_dicts_run_the_whole_model_statistics(toy_models, tmp_path) -> None:
    recipe = recipe_for(toy_models, "ties", parameters={"trim_scope": "global"})
    res = specmerge.merge(recipe, tmp_path / "out", progress=False)
    from safetensors.torch import load_file

    files = load_file(str(res.out_dir / "model.safetensors"))
    mem = specmerge.merge_state_dicts(recipe, toy_models["base_sd"], toy_models["expert_sds"],
                                      workers=2)
    assert all(torch.equal(mem[n], files[n]) for n in files)


def test_inputs_of_merge_state_dicts_are_not_modified(toy_models) -> None:
    base = {k: v.clone() for k, v in toy_models["base_sd"].items()}
    experts = [{k: v.clone() for k, v in e.items()} for e in toy_models["expert_sds"]]
    specmerge.merge_state_dicts(recipe_for(toy_models, "ties"), base, experts)
    assert all(torch.equal(base[k], toy_models["base_sd"][k]) for k in base)
    assert all(torch.equal(e[k], r[k]) for e, r in zip(experts, toy_models["expert_sds"],
                                                       strict=True) for k in e)


def test_one_plan_for_files_and_memory(toy_models) -> None:
    rec = load_recipe(recipe_for(toy_models, "tsv_m", out_dtype="float16",
                                 calibrate={"method": "svc"}))
    files = CheckpointSource(toy_models["base"], toy_models["experts"]).index()
    memory = StateDictSource(toy_models["base_sd"], toy_models["expert_sds"]).index()
    assert files == memory  # same names, shapes and dtypes (a file lists them sorted)
    a, b = build_plan(rec, files), build_plan(rec, memory)
    assert sorted(a.entries, key=lambda e: e.name) == sorted(b.entries, key=lambda e: e.name)
    assert (a.calibration, a.statistics, a.compute_dtype) == (b.calibration, b.statistics,
                                                              b.compute_dtype)


def test_jobs_and_sources_are_picklable(toy_models) -> None:
    rec = load_recipe(recipe_for(toy_models, "dare", calibrate={"method": "svc"}))
    source = CheckpointSource(toy_models["base"], toy_models["experts"])
    plan = build_plan(rec, source.index())
    step = MergeStep(plan.calibration, {}, "cpu", plan.compute_dtype)
    step2, source2, plan2 = pickle.loads(pickle.dumps((step, source, plan)))
    for entry in plan.entries:
        assert torch.equal(step(entry, source), step2(entry, source2))
    assert plan2 == plan


def test_statistics_do_not_depend_on_the_backend(toy_models) -> None:
    rec = load_recipe(recipe_for(toy_models, "ties", parameters={"trim_scope": "global",
                                                                 "density": 0.35}))
    source = CheckpointSource(toy_models["base"], toy_models["experts"])
    plan = build_plan(rec, source.index())
    assert len(plan.statistics) == 1
    values = [run_statistics(plan, source, LocalBackend(w), "cpu", False) for w in (1, 2, 3)]
    assert values[0] == values[1] == values[2]
    # and a plan whose method declares no wanted statistic runs none
    plain = build_plan(load_recipe(recipe_for(toy_models, "ties")), source.index())
    assert plain.statistics == ()


def test_engine_backends_and_sinks_name_no_method() -> None:
    names = sorted({m.name for m in all_methods()})
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    files = [*(SRC / "engine").glob("*.py"), SRC / "backends.py", SRC / "io" / "sinks.py",
             SRC / "io" / "report.py"]
    for f in files:
        hits = [(i + 1, line.strip()) for i, line in enumerate(f.read_text().splitlines())
                if pattern.search(line)]
        assert not hits, (f.name, hits)
    # the grep can fail: a method name in one of these files is found
    assert pattern.search("kwargs = ties_thresholds if method == 'ties' else None")


def test_constraints_are_declared_once_and_refuse_their_invalid_values() -> None:
    checked = 0
    for m in all_methods():
        for p in m.params:
            for c in p.constraints:
                assert isinstance(c, (Interval, Options, AnyOf)), (m.name, p.name)
                for bad in c.invalid_values():
                    with pytest.raises(ValueError, match=p.name):
                        m.validate({p.name: bad})
                    checked += 1
    assert checked > 50
    # Literal choices need no second declaration
    assert get_method("ties").param("aggregate").choices == ("mean", "sum")
    assert get_method("ties").param("density").range == "(0, 1]"


def test_direct_calls_are_validated_by_the_same_objects() -> None:
    from specmerge.methods.elementwise import dare, ties

    taus = [torch.ones(3, 2), torch.zeros(3, 2)]
    with pytest.raises(ValueError, match=r"'drop_rate' of method 'dare' must be .*\[0, 1\)"):
        dare(taus, drop_rate=1.0)
    with pytest.raises(ValueError, match=r"'aggregate' of method 'ties' must be one of"):
        ties(taus, aggregate="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        ties(taus, scaling=float("nan"))


def test_a_long_bad_value_is_echoed_short() -> None:
    with pytest.raises(ValueError) as info:
        get_method("ties").validate({"aggregate": "x" * 10_000})
    assert len(str(info.value)) < 400


def test_the_core_never_imports_the_benchmark() -> None:
    code = ("import sys, specmerge, specmerge.cli, specmerge.analysis; "
            "bad = [m for m in sys.modules if m.startswith('specmerge.bench') "
            "or m in ('transformers', 'matplotlib')]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    for f in SRC.rglob("*.py"):  # the CLI imports it inside the bench command only
        if "bench" not in f.relative_to(SRC).parts:
            assert not re.search(r"^(from|import) specmerge\.bench", f.read_text(), re.M), f


def test_no_core_module_imports_the_package_root() -> None:
    """No import cycle through ``specmerge/__init__`` (it imports the engine): the version
    lives in ``specmerge._version``. Only the benchmark, a user of the public API, may."""
    for f in SRC.rglob("*.py"):
        if "bench" in f.relative_to(SRC).parts or f.name == "__init__.py" and f.parent == SRC:
            continue
        assert not re.search(r"^\s*(from specmerge import|import specmerge\s*$)", f.read_text(),
                             re.M), f
    code = "import specmerge.io.sinks, specmerge.cli; import specmerge; print(specmerge.__version__)"
    subprocess.run([sys.executable, "-c", code], check=True)
