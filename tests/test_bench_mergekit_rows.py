"""bench's mergekit peer rows, with a stub mergekit: the YAML each row writes (the parameters
of the specmerge rows it mirrors), the refusals, a failing mergekit, the row cache, and a row's
output scored by the bench's evaluator. No real mergekit runs here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("transformers")
pytest.importorskip("psutil")

from specmerge.bench import mergekit_rows as M  # noqa: E402
from specmerge.bench import runner as R  # noqa: E402
from specmerge.bench import text8 as T  # noqa: E402
from tests.test_bench_lm import tiny_lm, write_tasks  # noqa: E402

RECIPES = R.default_recipes_dir()

# A stand-in for mergekit-yaml: logs its argv and recipe, then writes the weighted mean of the
# listed models (mergekit's linear; for slerp at t = 0.5 the chord's midpoint).
STUB = '''#!{python}
import json, sys
from pathlib import Path
import yaml
from safetensors.torch import load_file, save_file
if sys.argv[1:] == ["--help"]:
    sys.exit(0)
recipe_file, out = sys.argv[1], Path(sys.argv[2])
recipe = yaml.safe_load(open(recipe_file))
with open(Path(__file__).parents[1] / "calls.jsonl", "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "recipe": recipe}}) + "\\n")
print("stub mergekit: merging")
if {fail}:
    print("Traceback (most recent call last):", file=sys.stderr)
    print("RuntimeError: stub failure in model.layers.0.mlp.up_proj.weight", file=sys.stderr)
    sys.exit(1)
models = [m["model"] for m in recipe["models"]]
weights = [(m.get("parameters") or {{}}).get("weight", 1.0) for m in recipe["models"]]
states = [{{k: v for f in sorted(Path(p).glob("*.safetensors")) for k, v in load_file(f).items()}}
          for p in models]
merged = {{k: sum(w * s[k] for w, s in zip(weights, states)) / sum(weights) for k in states[0]}}
out.mkdir(parents=True, exist_ok=True)
save_file(merged, str(out / "model.safetensors"))
(out / "config.json").write_text((Path(models[0]) / "config.json").read_text())
'''


def stub_venv(root: Path, version: str = M.VERSION, fail: bool = False) -> Path:
    """A directory shaped like a virtualenv with mergekit ``version`` installed."""
    exe = root / "bin" / "mergekit-yaml"
    exe.parent.mkdir(parents=True)
    exe.write_text(STUB.format(python=sys.executable, fail=fail))
    exe.chmod(0o755)
    info = root / "lib" / "python3.12" / "site-packages" / f"mergekit-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Name: mergekit\nVersion: {version}\n")
    return root


def calls(venv: Path) -> list[dict]:
    f = venv / "calls.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines()] if f.is_file() else []


# ---------------------------------------------------------------------------------------------
# Recipes and refusals
# ---------------------------------------------------------------------------------------------

def test_each_row_writes_the_merge_of_the_specmerge_row_it_mirrors():
    t = {m: M.template(m, 3, RECIPES)[0] for m in M.METHODS}
    experts = ["EXPERT_1", "EXPERT_2", "EXPERT_3"]
    for m in ("task_arithmetic", "ties", "dare_ties"):
        assert t[m]["merge_method"] == m and t[m]["base_model"] == "BASE"
        assert [x["model"] for x in t[m]["models"]] == experts
        assert all(x["parameters"]["weight"] == 1.0 for x in t[m]["models"])
    # task_arithmetic.yaml: scaling 0.3 = λ Σ τ_i with weights 1
    assert t["task_arithmetic"]["parameters"] == {"lambda": 0.3, "normalize": False}
    # ties.yaml at the ties defaults: density 0.2, aggregate mean, scaling 1
    assert {x["parameters"]["density"] for x in t["ties"]["models"]} == {0.2}
    assert t["ties"]["parameters"] == {"lambda": 1.0, "normalize": True}
    # dare.yaml (drop_rate 0.5, scaling 0.3) with TIES's sign election
    assert {x["parameters"]["density"] for x in t["dare_ties"]["models"]} == {0.5}
    assert t["dare_ties"]["parameters"] == {"lambda": 0.3, "normalize": False, "rescale": True}
    # weight_average: the experts' mean, no base listed (mergekit's linear ignores none)
    assert "base_model" not in t["linear"] and t["linear"]["parameters"] == {"normalize": True}
    assert [x["model"] for x in t["linear"]["models"]] == experts
    assert t["slerp"] == {"merge_method": "slerp", "base_model": "EXPERT_1",
                          "models": [{"model": "EXPERT_1"}, {"model": "EXPERT_2"}],
                          "parameters": {"t": 0.5}, "dtype": "float32"}
    assert {x["dtype"] for x in t.values()} == {"float32"}
    with pytest.raises(T.BenchError, match="merges two experts"):
        M.template("slerp", 1, RECIPES)


def test_a_changed_row_recipe_changes_the_mergekit_row(tmp_path):
    for f in RECIPES.glob("*.yaml"):
        (tmp_path / f.name).write_text(f.read_text())
    rec = yaml.safe_load((tmp_path / "task_arithmetic.yaml").read_text())
    rec["parameters"] = {"scaling": 0.5}
    (tmp_path / "task_arithmetic.yaml").write_text(yaml.safe_dump(rec))
    assert M.template("task_arithmetic", 2, tmp_path)[0]["parameters"]["lambda"] == 0.5
    (tmp_path / "ties.yaml").unlink()
    with pytest.raises(T.BenchError, match="ties.yaml, which is missing"):
        M.template("ties", 2, tmp_path)


def test_mergekit_rows_are_refused_without_a_venv_with_lora_or_by_a_wrong_name(tmp_path):
    with pytest.raises(T.BenchError, match=r"--mergekit-venv DIR.*mergekit==0\.1\.5.*venv"):
        R.validate_methods(["task_arithmetic", "mergekit_ties"], RECIPES)
    venv = stub_venv(tmp_path / "venv")
    with pytest.raises(T.BenchError, match="'mergekit_ties' merges full checkpoints.*--experts "
                                           "full"):
        R.validate_methods(["mergekit_ties"], RECIPES, lora=True, mergekit_venv=venv)
    with pytest.raises(T.BenchError, match="unknown mergekit row 'mergekit_della'"):
        R.validate_methods(["mergekit_della"], RECIPES, mergekit_venv=venv)
    with pytest.raises(T.BenchError, match="no executable bin/mergekit-yaml"):
        R.validate_methods(["mergekit_ties"], RECIPES, mergekit_venv=tmp_path)
    assert R.validate_methods(list(M.ROWS), RECIPES, mergekit_venv=venv) == list(M.ROWS)


def test_the_refusal_comes_before_anything_runs(tmp_path):
    from typer.testing import CliRunner

    from specmerge.bench.cli import app

    data, cache = write_tasks(tmp_path / "data"), tmp_path / "cache"
    res = CliRunner().invoke(app, ["lm", "--data", str(data), "--tasks", "pick,sums",
                                   "--model", str(tmp_path / "no-model"), "--cache", str(cache),
                                   "--methods", "mergekit_slerp", "--quiet"])
    assert res.exit_code == 1 and "--mergekit-venv" in res.output
    assert "Traceback" not in res.output and not list(cache.glob("base*"))


def test_help_documents_the_option():
    from typer.testing import CliRunner

    from specmerge.bench.cli import app

    for cmd in ("lm", "text8"):
        res = CliRunner().invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
        assert "--mergekit-venv" in res.output and "mergekit==0.1.5" in res.output


def test_a_failing_mergekit_is_an_error_naming_the_row_and_the_last_line(tmp_path):
    job = M.MergekitJob.build("mergekit_ties", RECIPES, stub_venv(tmp_path / "v", fail=True),
                              ["a", "b"])
    out = tmp_path / "work" / "mergekit_ties-s0"
    with pytest.raises(T.BenchError) as e:
        job.run(tmp_path / "base", [tmp_path / "a", tmp_path / "b"], out,
                logs=tmp_path / "logs")
    msg = str(e.value)
    assert "'mergekit_ties'" in msg and "status 1" in msg
    assert "RuntimeError: stub failure in model.layers.0.mlp.up_proj.weight" in msg
    assert (tmp_path / "logs" / "mergekit_ties-s0.log").is_file()
    argv = calls(tmp_path / "v")[0]["argv"]
    assert argv[:2] == [str(out.with_name("mergekit_ties-s0.yaml")), str(out)]
    assert {"--allow-crimes", "--random-seed", "--device"} <= set(argv)
    written = yaml.safe_load(out.with_name("mergekit_ties-s0.yaml").read_text())
    assert written["base_model"] == str(tmp_path / "base")
    assert [m["model"] for m in written["models"]] == [str(tmp_path / "a"), str(tmp_path / "b")]


# ---------------------------------------------------------------------------------------------
# End to end on a tiny Llama
# ---------------------------------------------------------------------------------------------

def test_mergekit_rows_in_a_bench_lm_run(tmp_path):
    """The stub's output goes through the evaluator: its linear (the experts' mean) scores as
    specmerge's weight_average; time, memory and version are recorded; the cache key holds
    the mergekit version."""
    from typer.testing import CliRunner

    from specmerge.bench.cli import app

    venv = stub_venv(tmp_path / "venv")
    data, out, cache = write_tasks(tmp_path / "data"), tmp_path / "out", tmp_path / "cache"
    rows = "weight_average,mergekit_linear,mergekit_slerp,mergekit_ties"
    args = ["lm", "--data", str(data), "--tasks", "pick,sums", "--model",
            str(tiny_lm(tmp_path / "base")), "--cache", str(cache), "--quiet", "--threads", "1",
            "--steps", "2", "--test-cap", "5", "--methods", rows, "--out", str(out),
            "--mergekit-venv", str(venv)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    by = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert not any(r.get("errors") for r in by.values())
    assert by["mergekit_linear"]["acc"] == by["weight_average"]["acc"]
    assert by["mergekit_linear"]["metrics"]["ppl"] == pytest.approx(
        by["weight_average"]["metrics"]["ppl"], rel=1e-4)
    for r in ("mergekit_linear", "mergekit_slerp", "mergekit_ties"):
        assert by[r]["merge_s"] > 0 and by[r]["peak_rss_mb"] > 1 and math.isfinite(by[r]["avg"])
        assert by[r]["startup_s"] > 0
        assert by[r]["per_seed"][0]["mergekit_version"] == M.VERSION
    assert "pick and sums experts only" in by["mergekit_slerp"]["per_seed"][0]["notes"][0]
    assert "mergekit slerp (experts 1 and 2 only" in (out / "table.md").read_text()
    got = calls(venv)
    assert len(got) == 3
    experts = [e["path"] for e in json.loads((out / "results.json").read_text())["experts"]]
    slerp = next(c["recipe"] for c in got if c["recipe"]["merge_method"] == "slerp")
    assert slerp["base_model"] == experts[0]
    assert [m["model"] for m in slerp["models"]] == experts[:2]
    assert not list((cache / "merges").glob("*/mergekit_*"))  # outputs and recipes gone
    # a rerun reuses the rows; another mergekit version computes them again
    assert CliRunner().invoke(app, args).exit_code == 0 and len(calls(venv)) == 3
    info = next(venv.glob("lib/*/site-packages/mergekit-*.dist-info"))
    info.rename(info.with_name("mergekit-0.1.6.dist-info"))
    assert CliRunner().invoke(app, args).exit_code == 0 and len(calls(venv)) == 6


def test_a_failing_row_is_recorded_and_the_run_goes_on(tmp_path):
    from typer.testing import CliRunner

    from specmerge.bench.cli import app

    venv = stub_venv(tmp_path / "venv", fail=True)
    data, out = write_tasks(tmp_path / "data"), tmp_path / "out"
    res = CliRunner().invoke(app, [
        "lm", "--data", str(data), "--tasks", "pick,sums", "--model",
        str(tiny_lm(tmp_path / "base")), "--cache", str(tmp_path / "cache"), "--quiet",
        "--threads", "1", "--steps", "1", "--test-cap", "3", "--methods",
        "task_arithmetic,mergekit_dare_ties", "--out", str(out), "--mergekit-venv", str(venv)])
    assert res.exit_code == 0, res.output
    by = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert not by["task_arithmetic"].get("errors")
    (err,) = by["mergekit_dare_ties"]["errors"]
    assert "'mergekit_dare_ties'" in err and "stub failure" in err and "Traceback" not in err
