"""The text8 benchmark: heads, normalised accuracy, protocol hash, errors, and --quick end to end."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from specmerge.bench import report
from specmerge.bench import runner as R
from specmerge.bench import text8 as T

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "text"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_task(d: Path, n_train: int = 20, labels=("bad", "good"), validation: bool = False):
    d.mkdir(parents=True)
    (d / "labels.json").write_text(json.dumps(list(labels)))
    rows = [json.dumps({"text": f"text number {i}", "label": i % len(labels)})
            for i in range(n_train)]
    (d / "train.jsonl").write_text("\n".join(rows) + "\n")
    (d / "test.jsonl").write_text("\n".join(rows[:6]) + "\n")
    if validation:
        (d / "validation.jsonl").write_text("\n".join(rows[:4]) + "\n")
    return d


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------

def test_build_head_is_the_normalised_mean_of_normalised_prompt_embeddings():
    table = {"a1": [2.0, 0.0], "a2": [0.0, 1.0], "b1": [0.0, -3.0], "b2": [0.0, -1.0],
             "b3": [-1.0, 0.0]}

    def embed_fn(texts):
        return torch.tensor([table[t] for t in texts])

    head = T.build_head([["a1", "a2"], ["b1", "b2", "b3"]], embed_fn)
    s = 1 / math.sqrt(2)
    # class a: mean of (1, 0) and (0, 1) → (1/2, 1/2) → (s, s); class b: (−1/3, −2/3) normalised
    expected_b = torch.tensor([-1 / 3, -2 / 3]) / math.sqrt(5 / 9)
    assert head.shape == (2, 2)
    torch.testing.assert_close(head[0], torch.tensor([s, s]))
    torch.testing.assert_close(head[1], expected_b)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(2))


def test_logits_are_scaled_cosines():
    head = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    z = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    out = T.logits(z, head)
    assert out.abs().max() <= T.HEAD_SCALE + 1e-4
    torch.testing.assert_close(out[1, 2], T.HEAD_SCALE * torch.dot(z[1], head[2]))


def test_prompts_use_task_templates_and_a_generic_fallback(tmp_path):
    generic = T.load_task(tmp_path, _write_task(tmp_path / "mine", labels=("red_wine", "beer")).name)
    assert generic.prompts()[0] == [t.format("red wine") for t in T.GENERIC_TEMPLATES]
    custom = _write_task(tmp_path / "custom")
    (custom / "templates.json").write_text(json.dumps(
        {"templates": ["It is {}."], "names": {"good": "great"}}))
    assert T.load_task(tmp_path, "custom").prompts() == [["It is bad."], ["It is great."]]


# ---------------------------------------------------------------------------------------------
# Normalised accuracy, splits, steps
# ---------------------------------------------------------------------------------------------

def test_normalized_accuracy_is_the_mean_ratio_to_the_expert():
    assert T.normalized_accuracy({"a": 50.0, "b": 90.0}, {"a": 100.0, "b": 90.0}) == 75.0
    assert T.normalized_accuracy({"a": 80.0}, {"a": 80.0, "b": 1.0}) == 100.0
    # a mean of ratios, not a ratio of means
    r = T.normalized_accuracy({"a": 10.0, "b": 90.0}, {"a": 20.0, "b": 90.0})
    assert r == pytest.approx(75.0) and r != pytest.approx(100 * 100 / 110)
    with pytest.raises(ValueError, match="no expert accuracy"):
        T.normalized_accuracy({"c": 1.0}, {"a": 1.0})


def test_held_out_validation_is_seeded_and_disjoint(tmp_path):
    task = T.load_task(tmp_path, _write_task(tmp_path / "t", n_train=50).name)
    pool, val = T.split_train_val(task, 0.1)
    assert len(val) == 5 and len(pool) == 45
    assert not set(val) & set(pool)
    assert T.split_train_val(task, 0.1) == (pool, val)
    own = T.load_task(tmp_path, _write_task(tmp_path / "v", validation=True).name)
    assert T.split_train_val(own) == (own.train, own.validation)


def test_training_steps_follow_the_protocol():
    cfg = T.TrainConfig()
    assert cfg.steps(10_000) == 187 and cfg.steps(3000) == 187
    assert cfg.steps(320) == 20
    assert replace(cfg, max_steps=20).steps(10_000) == 20


# ---------------------------------------------------------------------------------------------
# Protocol hash
# ---------------------------------------------------------------------------------------------

def test_protocol_hash_changes_with_everything_that_changes_an_expert(tmp_path):
    cfg = T.TrainConfig()
    h = T.protocol_hash("sha", "task", cfg, 0)
    assert h == T.protocol_hash("sha", "task", T.TrainConfig(), 0)
    assert len(h) == 64
    others = {T.protocol_hash("sha2", "task", cfg, 0), T.protocol_hash("sha", "task2", cfg, 0),
              T.protocol_hash("sha", "task", cfg, 1),
              T.protocol_hash("sha", "task", replace(cfg, lr=1e-4), 0),
              T.protocol_hash("sha", "task", replace(cfg, max_steps=20), 0)}
    assert h not in others and len(others) == 5


def test_task_digest_tracks_training_data_and_prompts_but_not_the_test_set(tmp_path):
    d = _write_task(tmp_path / "t")
    digest = T.load_task(tmp_path, "t").files_digest()
    (d / "test.jsonl").write_text('{"text": "other", "label": 0}\n')
    assert T.load_task(tmp_path, "t").files_digest() == digest
    (d / "templates.json").write_text(json.dumps({"templates": ["It is {}."]}))
    digest2 = T.load_task(tmp_path, "t").files_digest()
    assert digest2 != digest
    with open(d / "train.jsonl", "a") as f:
        f.write('{"text": "one more", "label": 1}\n')
    assert T.load_task(tmp_path, "t").files_digest() != digest2


# ---------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------

def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(T.BenchError, match="data directory not found"):
        T.load_task(tmp_path / "nowhere", "sst2")
    with pytest.raises(T.BenchError, match="--data"):
        T.load_task(None, "sst2")


def test_unknown_task_is_a_clear_error_listing_the_tasks(tmp_path):
    _write_task(tmp_path / "alpha")
    with pytest.raises(T.BenchError, match=r"unknown task 'beta'.*alpha"):
        T.load_task(tmp_path, "beta")


def test_bad_labels_are_a_clear_error(tmp_path):
    d = _write_task(tmp_path / "t")
    (d / "test.jsonl").write_text('{"text": "x", "label": 7}\n')
    with pytest.raises(T.BenchError, match="label 7 outside"):
        T.load_task(tmp_path, "t")


def test_wrong_model_hash_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not the model")
    with pytest.raises(T.BenchError, match="hash mismatch"):
        T.verify_model(tmp_path)
    with pytest.raises(T.BenchError, match="not found"):
        T.verify_model(tmp_path / "empty")


def test_cli_reports_errors_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from specmerge.bench.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["text8", "--data", str(tmp_path / "nowhere"), "--tasks", "sst2",
                              "--cache", str(tmp_path / "c"), "--quiet"])
    assert res.exit_code == 1
    assert "data directory not found" in res.output
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"x")
    res = runner.invoke(app, ["text8", "--model-dir", str(tmp_path / "m"), "--cache",
                              str(tmp_path / "c"), "--quiet"])
    assert res.exit_code == 1 and "hash mismatch" in res.output
    res = runner.invoke(app, ["text8", "--methods", "no_such_method", "--data", str(tmp_path),
                              "--tasks", "x", "--cache", str(tmp_path / "c"), "--quiet"])
    assert res.exit_code == 1


def test_every_preset_row_has_a_recipe_for_a_registered_method():
    recipes = R.default_recipes_dir()
    for preset in R.PRESETS.values():
        assert R.validate_methods(preset, recipes) == list(preset)
    with pytest.raises(T.BenchError, match="unknown method row"):
        R.validate_methods(["nope+svc"], recipes)



def test_the_packaged_recipes_are_the_examples():
    """A non-editable install reads the recipes from specmerge.bench/recipes (a link to
    examples/text8 in the source tree, copied into the wheel)."""
    from importlib import resources

    packaged = Path(str(resources.files("specmerge.bench") / "recipes"))
    examples = REPO / "examples" / "text8"
    assert sorted(p.name for p in packaged.glob("*.yaml")) == sorted(
        p.name for p in examples.glob("*.yaml"))
    assert R.validate_methods(R.PRESETS["full"], packaged) == list(R.PRESETS["full"])

# ---------------------------------------------------------------------------------------------
# Report on a synthetic result
# ---------------------------------------------------------------------------------------------

def _fake_results() -> dict:
    tasks = ["a", "b"]
    rows = []
    for i, name in enumerate([R.ZERO_SHOT, R.EXPERTS, "task_arithmetic", "task_arithmetic+svc",
                              "ties@val"]):
        acc = {t: 50.0 + 10 * i + j for j, t in enumerate(tasks)}
        row = {"name": name, "acc": acc, "avg": sum(acc.values()) / 2, "norm": 70.0 + i,
               "avg_per_seed": [1.0, 2.0], "norm_per_seed": [3.0, 4.0]}
        if name.startswith("task"):
            row["merge_s"] = 1.5
        if name.endswith("@val"):
            row["lambda"] = [0.3, 0.4]
        rows.append(row)
    sv = {"L3.q": {"τ_a": [3.0, 2.0, 1.0], "τ_b": [2.0, 1.0, 0.5],
                   "task_arithmetic": [4.0, 1.0, 0.1], "task_arithmetic+svc": [2.0, 1.0, 0.5]}}
    return {"tasks": [{"name": t} for t in tasks], "rows": rows, "spectra": sv,
            "protocol": {"seeds": 2}, "timings": {}}


def test_report_writes_every_row_and_png_plots(tmp_path):
    res = _fake_results()
    files = report.write_all(res, tmp_path)
    table = (tmp_path / "table.md").read_text()
    for label in ("zero-shot", "individual experts", "task arithmetic (λ=0.3)",
                  "task arithmetic (λ=0.3) + SVC", "TIES, λ on validation (λ=0.3, 0.4)"):
        assert f"| {label} |" in table
    assert "| 60.5 (1.0, 2.0) | 71.0 (3.0, 4.0) |" in table
    for key in ("bars", "heatmap", "spectra"):
        data = files[key].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["name"] == "zero_shot"
    assert report.svc_deltas(res) == [("task_arithmetic", 70.5, 80.5, 72.0, 73.0)]


# ---------------------------------------------------------------------------------------------
# --quick end to end
# ---------------------------------------------------------------------------------------------

def test_the_tasks_ship_with_the_repository_and_are_the_default() -> None:
    assert R.default_data_dir() == DATA
    readme = (DATA / "README.md").read_text()
    for name in T.TASKS:
        task = T.load_task(R.default_data_dir(), name)
        assert task.test and task.train and f"| {name} |" in readme, name
    # nothing in the package points outside the repository
    for f in (REPO / "src").rglob("*.py"):
        assert "../shared" not in f.read_text(), f


def test_headline_shows_tsv_m_with_svc_at_both_alphas() -> None:
    assert {"tsv_m+svc", "tsv_m+svc_a1"} <= set(R.PRESETS["headline"])


def test_quick_run_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from specmerge.bench.cli import app

    out = tmp_path / "out"
    # no --data: the default location, data/text of this checkout
    res = CliRunner().invoke(app, ["text8", "--quick", "--cache", str(tmp_path / "cache"),
                                   "--out", str(out), "--quiet", "--threads", "1"])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == [R.ZERO_SHOT, R.EXPERTS, *R.PRESETS["quick"]]
    for t in R.QUICK_TASKS:
        assert rows[R.EXPERTS]["acc"][t] > rows[R.ZERO_SHOT]["acc"][t], t
    assert all(e["steps"] == 20 for e in results["experts"])
    assert results["tasks"][0]["n_test"] == 100
    table = (out / "table.md").read_text()
    for name in rows:
        assert f"| {report.label(name)} |" in table
    assert "| individual experts |" in res.output
    for png in ("text8_normalised.png", "text8_heatmap.png", "text8_svc_spectra.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, png
    assert all(math.isfinite(r["norm"]) for r in results["rows"])
    rep = (out / "report.md").read_text()
    assert "a seeded subsample of at most 100 test examples per task" in rep
    assert table.strip() in rep and "## Run" in rep
    # --doc: the report with hand-written notes before the results, its plots and JSON beside it
    written = report.write_doc(results, tmp_path / "doc" / "q.md", notes="## About\nnotes here")
    doc = (tmp_path / "doc" / "q.md").read_text()
    assert doc.index("notes here") < doc.index("## Results")
    assert {p.name for p in written} >= {"q.md", "q_results.json", "q_normalised.png",
                                         "q_heatmap.png", "q_svc_spectra.png"}
    assert "![normalised accuracy](q_normalised.png)" in doc


def test_prebuilt_experts_are_found_in_the_shared_directory_first(tmp_path):
    name = T.expert_dirname("sst2", 0, "ab" * 32)
    cfg = R.RunConfig(data=None, cache=tmp_path / "cache", shared=tmp_path / "shared")
    assert R.find_expert(cfg, "sst2", 0, "ab" * 32) is None
    for d in (tmp_path / "cache" / "experts" / name, tmp_path / "shared" / "experts" / name):
        d.mkdir(parents=True)
        (d / "expert.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"")
    assert R.find_expert(cfg, "sst2", 0, "ab" * 32) == tmp_path / "shared" / "experts" / name
    incomplete = tmp_path / "cache" / "experts" / T.expert_dirname("trec", 0, "cd" * 32)
    incomplete.mkdir(parents=True)
    assert R.find_expert(cfg, "trec", 0, "cd" * 32) is None


# ---------------------------------------------------------------------------------------------
# --experts lora
# ---------------------------------------------------------------------------------------------

def test_lora_experts_hash_apart_from_full_experts_which_keep_their_hash():
    cfg, lora = T.TrainConfig(), T.LoraSpec()
    full = T.protocol_hash("sha", "task", cfg, 0)
    assert T.protocol_hash("sha", "task", cfg, 0, None) == full
    keyed = T.protocol_hash("sha", "task", cfg, 0, lora)
    assert keyed != full and keyed != T.protocol_hash("sha", "task", cfg, 0, replace(lora, r=4))
    assert T.expert_dirname("sst2", 1, keyed, lora) == f"sst2-seed1-lora8-{keyed[:16]}"
    assert T.lora_train_config(5).max_steps == 5


def test_peft_rows_need_lora_experts_and_a_known_combination():
    recipes = R.default_recipes_dir()
    assert R.validate_methods(R.PEFT_ROWS, recipes, lora=True) == list(R.PEFT_ROWS)
    with pytest.raises(T.BenchError, match="needs --experts lora"):
        R.validate_methods(["peft_svd"], recipes)
    with pytest.raises(T.BenchError, match="unknown PEFT row"):
        R.validate_methods(["peft_magic"], recipes, lora=True)


def test_quick_lora_run_end_to_end(tmp_path):
    """LoRA experts trained two steps and saved as adapters; a method row with SVC and a PEFT
    peer row merge them; the adapters' merged weights are PEFT's merge_and_unload."""
    peft = pytest.importorskip("peft")
    from specmerge.bench import peft_rows as P

    cfg = R.RunConfig(data=DATA, tasks=["trec", "subj"],
                      methods=["task_arithmetic+svc", "peft_ties"], cache=tmp_path / "cache",
                      test_cap=20, train=T.lora_train_config(max_steps=2), lora=T.LoraSpec(),
                      threads=1, progress=False)
    res = R.run(cfg)
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == [R.ZERO_SHOT, R.EXPERTS, "task_arithmetic+svc", "peft_ties"]
    assert all(math.isfinite(r["avg"]) and not r.get("errors") for r in rows.values())
    assert rows["peft_ties"]["per_seed"][0]["peft"] == {
        "weights": [1.0, 1.0], "combination_type": "ties", "density": 0.2}
    assert res["protocol"]["experts"] == "lora" and res["protocol"]["lora"]["r"] == 8
    assert len(list((cfg.cache / "rows").glob("*.json"))) == 4  # a re-run resumes from these
    paths = [Path(e["path"]) for e in res["experts"]]
    for e, d in zip(res["experts"], paths, strict=True):
        assert d.name.startswith(f"{e['task']}-seed0-lora8-")
        assert (d / "adapter_model.safetensors").is_file()
        config = json.loads((d / "adapter_config.json").read_text())
        assert config["r"] == 8 and set(config["target_modules"]) == set(T.LORA_TARGETS)
    # an adapter expert is evaluated with the weights of PEFT's merge_and_unload
    ev = R.Evaluator(next(cfg.cache.glob("base-*")), "cpu")
    ev.load(paths[0])
    fresh, _ = T.load_encoder(ev.base)
    ref = peft.PeftModel.from_pretrained(fresh, str(paths[0])).merge_and_unload().state_dict()
    name = "encoder.layer.2.intermediate.dense.weight"
    assert not torch.equal(ref[name], ev.base_state[name])
    got = ev.model.state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)
    # PEFT's cat at weight 1 is exactly the sum of the experts' updates
    merger = P.PeftMerger(ev.base, paths)
    cat, _ = merger.merged_deltas(P.merge_kwargs("cat", 1.0, 2))
    one, two = merger.deltas("e0"), merger.deltas("e1")
    torch.testing.assert_close(cat[name], one[name] + two[name], rtol=1e-5, atol=1e-7)


def test_a_reference_row_missing_for_one_seed_keeps_the_other(tmp_path):
    """The full fine-tunes' reference row exists for the seeds whose experts are cached."""
    task = T.Task("a", tmp_path, ["x", "y"], [("t", 0)], [("t", 0)], None, ["{}"])
    acc = {"acc": {"a": 80.0}, "compute_s": 1.0}
    per_seed = {R.ZERO_SHOT: [acc, acc], R.EXPERTS: [{"acc": {"a": 90.0}}] * 2,
                R.FULL_EXPERTS: [{"acc": {"a": 94.5}}, None]}
    res = R.assemble(R.RunConfig(data=None, seeds=2, lora=T.LoraSpec()), [task], "sha",
                     list(per_seed), per_seed, [], {}, {}, timings={})
    full = next(r for r in res["rows"] if r["name"] == R.FULL_EXPERTS)
    assert full["seeds"] == [0] and full["norm"] == pytest.approx(105.0)
    assert res["timings"]["rows_compute_s"] == 2.0
    assert "(seed 0 only)" in report.markdown_table(res)


def test_the_lambda_grid_reaches_down_to_0_05():
    assert R.LAMBDAS[0] == 0.05 and R.LAMBDAS[-1] == 1.0
    assert list(R.LAMBDAS) == sorted(set(R.LAMBDAS))
    assert {0.05, 0.1, 0.15, 0.2, 0.25, 0.3} <= set(R.LAMBDAS)  # 1/K for K = 8 lies inside
    assert {round(0.1 * i, 1) for i in range(1, 11)} <= set(R.LAMBDAS)  # the old grid stays


def test_the_full_preset_validates_the_wudi_family_scale():
    from specmerge.recipe import load_recipe

    family = ("wudi", "wudi_closed_form", "swudi", "swudi_a")
    assert {f"{m}@val" for m in family} <= set(R.PRESETS["full"])
    recipes = R.default_recipes_dir()
    assert R.validate_methods([f"{m}@val" for m in family], recipes) == [f"{m}@val"
                                                                        for m in family]
    for m in family:  # the sweep sets parameters.scaling, which each method accepts
        rec = R.load_recipe(recipes, f"{m}@val", Path("/b"), [Path("/e0"), Path("/e1")])
        rec.setdefault("parameters", {})["scaling"] = R.LAMBDAS[0]
        assert load_recipe(rec).parameters["scaling"] == 0.05
    assert report.label("swudi@val") == "SWUDI, λ on validation"
    assert report.label("peft_cat@val") == "PEFT cat, weight λ on validation"


def test_the_table_shows_a_lambda_of_0_05():
    res = _fake_results()
    res["rows"][-1]["lambda"] = [0.05, 0.15]
    assert "TIES, λ on validation (λ=0.05, 0.15)" in report.markdown_table(res)


# ---------------------------------------------------------------------------------------------
# Concurrent runs and the sweep rows
# ---------------------------------------------------------------------------------------------

class _SavesBeside:
    """A stand-in model/tokenizer whose save also writes the finished base into ``out``, as a
    concurrent run (one per half of --tasks) does while this one is writing."""

    def __init__(self, out: Path):
        self.out = out

    def save_pretrained(self, path: str, **_: object) -> None:
        (Path(path) / "config.json").write_text("{}")
        if not self.out.exists():
            self.out.mkdir(parents=True)
            (self.out / "config.json").write_text("{}")
            (self.out / "model.safetensors").write_bytes(b"x")


def test_ensure_base_uses_a_base_that_another_run_saved_meanwhile(tmp_path, monkeypatch):
    out = tmp_path / "base-0123456789ab"
    stub = _SavesBeside(out)
    monkeypatch.setattr(T, "load_encoder", lambda _d: (stub, stub))
    assert R.ensure_base(tmp_path, "0123456789abcdef", tmp_path) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no partial left behind


def test_sweep_rows_name_what_they_sweep_and_their_grid():
    assert R.sweep_of("swudi@val") == "scaling" and R.sweep_of("ties+svc@alpha") == "alpha"
    assert R.sweep_of("swudi_auto") is None
    assert R.sweep_grid("swudi@val", 8) == R.LAMBDAS
    assert R.sweep_grid("tsv_m+svc@alpha", 8) == (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
    assert R.sweep_grid("tsv_m+svc@alpha", 4) == (0.25, 0.5, 1.0, 2.0, 4.0)  # 1/K is in the grid
    with pytest.raises(T.BenchError, match="calibrates with no SVC"):
        R.validate_methods(["tsv_m@alpha"], R.default_recipes_dir())


def test_the_lora_rows_have_recipes_and_labels():
    rows = R.validate_methods(R.LORA_ROWS + R.ALPHA_SWEEPS, R.default_recipes_dir(), lora=True)
    assert rows == list(R.LORA_ROWS + R.ALPHA_SWEEPS)
    for r in rows:
        assert report.label(r) != r, r  # every row has a readable label
