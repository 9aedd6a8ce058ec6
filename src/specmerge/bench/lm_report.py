"""The Markdown report of a ``bench lm`` run (report.md, or ``--doc``), on text8's sections."""

from __future__ import annotations

from . import report as Rep


def markdown_report(results: dict, prefix: str = "lm", json_name: str = "results.json") -> str:
    """Protocol, the table (scores per task, average, normalised, perplexity, merge time),
    SVC's effect, the sweeps, the plots and the run."""
    p, tasks = results["protocol"], results["tasks"]
    tr, lora, ppl = p["train"], p.get("lora"), p.get("perplexity") or {}
    trained = ("every decoder layer trained, embeddings and tied head frozen" if not lora else
               f"PEFT LoRA adapters, r = {lora['r']}, α = {lora['alpha']}, on "
               f"{', '.join(lora['targets'])} of every layer")
    kinds = ", ".join(f"{t['name']} ({'choice' if t['kind'] == 'choice' else 'generation'}, "
                      f"{t['n_test']})" for t in tasks)
    lines = [
        f"# lm: {p['model']} × {len(tasks)} LM tasks" + (", LoRA experts" if lora else ""),
        "",
        f"Experts fine-tuned from {p['model']} (GGUF sha256 `{p['model_sha256'][:16]}…`), merged "
        "by each method through `specmerge.merge` with the recipes in `examples/text8/`.",
        "",
        f"- Experts: {trained}; causal-LM loss on the completion, AdamW lr {tr['lr']:g}, "
        f"batch {tr['batch_size']}, {tr['steps']} steps, ≤ {tr['max_length']} tokens, "
        f"{tr['warmup']:.0%} warm-up then linear decay.",
        f"- Tasks (test examples): {kinds}. Multiple choice: accuracy by log-likelihood of the "
        "choices; generation: exact match of the last number of the greedy continuation "
        "(data/lm/README.md). The same rules as lm-eval task YAMLs are in `lm_eval/` beside "
        "the results.",
        f"- *ppl*: token perplexity on {ppl.get('texts', 0)} general-text paragraphs "
        f"({ppl.get('tokens', 0)} tokens, windows of {ppl.get('window', 512)}); for the experts "
        f"row, the mean over the experts. {p['seeds']} seed(s).",
        "",
        "## Results",
        "",
        Rep.markdown_table(results),
        "",
    ]
    deltas = Rep.svc_deltas(results)
    if deltas:
        lines += ["## Does SVC help?", "", "| method | avg | avg + SVC | Δ |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {Rep.label(n)} | {a:.1f} | {a2:.1f} | {a2 - a:+.1f} |"
                  for n, a, a2, _, _ in deltas]
        lines.append("")
    lines += Rep.sweeps_section(results) + Rep.plots_section(results, prefix)
    return "\n".join(lines + Rep.run_section(results, json_name))
