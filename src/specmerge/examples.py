"""Example checkpoints: the tiny quickstart set and Llama-shaped synthetic models.

Both write real HF directories (``config.json`` + safetensors) for a base and K experts whose
task vectors are a shared low-rank part, a task-specific low-rank part and noise. They stream
one parameter at a time through the same writer as the merge, so a 500M-parameter set is
written in little memory.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specmerge.io.writer import OutTensor, ShardedWriter, atomic_output_dir, write_text
from specmerge.linalg import dtype_name, parse_dtype
from specmerge.plan import parameter_seed
from specmerge.synthetic import normal, structured_task_vectors


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int

    def config(self, dtype: torch.dtype) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads, "vocab_size": self.vocab,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": dtype_name(dtype),
        }

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i = self.hidden, self.intermediate
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
            out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i)),
                    (p + "input_layernorm.weight", (h,)),
                    (p + "post_attention_layernorm.weight", (h,))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def num_params(self) -> int:
        return sum(torch.Size(s).numel() for _, s in self.tensors())


QUICKSTART = LlamaShape(hidden=64, intermediate=160, layers=2, heads=4, vocab=256)


def parse_count(text: str | int) -> int:
    """'500M' → 500_000_000; '1.5B', '20k' and plain integers work too."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", text)
    if not m:
        raise ValueError(f"invalid parameter count {text!r}; use e.g. 500M, 1.5B or 20000")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def llama_shape_for(params: int, *, vocab: int | None = None,
                    hidden: int | None = None) -> LlamaShape:
    """A Llama shape with about ``params`` parameters (depth chosen to hit the target, at least
    one layer). ``vocab`` and ``hidden`` override the size tier's; with ``hidden`` the MLP width
    is ⌈2.75·hidden / 16⌉·16 (Llama's ratio) and heads of 64 dims."""
    if params >= 200_000_000:
        h, inter, heads, v = 1024, 2816, 16, 32000
    elif params >= 20_000_000:
        h, inter, heads, v = 512, 1408, 8, 8000
    else:
        h, inter, heads, v = 128, 352, 4, 1000
    if hidden is not None:
        if hidden < 16 or hidden % 16:
            raise ValueError(f"--hidden must be a multiple of 16, at least 16; got {hidden}")
        h, inter, heads = hidden, -(-hidden * 11 // 4 // 16) * 16, max(1, hidden // 64)
    if vocab is not None and vocab < 1:
        raise ValueError(f"--vocab must be positive, got {vocab}")
    hidden, vocab = h, v if vocab is None else vocab
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((params - fixed) / per_layer))
    return LlamaShape(hidden, inter, layers, heads, vocab)


def write_example_models(out_dir: str | Path, shape: LlamaShape, experts: int, *,
                         dtype: str | torch.dtype = "float32", seed: int = 0,
                         shard_size: int = 2 * 10**9, progress: bool = True) -> list[Path]:
    """Write ``out_dir/base`` and ``out_dir/expert_1..K``; return their paths.

    θ0 ~ N(0, 0.02²) for matrices and 1 for norms; τ_i = 1e-3 · (shared + task + noise). The
    same seed writes the same bytes on every CPU (``specmerge.synthetic.normal``).
    """
    dt = parse_dtype(dtype)
    root = Path(out_dir).expanduser().resolve()
    names = ["base"] + [f"expert_{i + 1}" for i in range(experts)]
    dirs = [root / n for n in names]
    existing = [d for d in dirs if d.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]} already exists; choose an empty directory")
    specs = [OutTensor(n, s, dt) for n, s in shape.tensors()]
    config = json.dumps(shape.config(dt), indent=2) + "\n"
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_output_dir(d)) for d in dirs]
        writers = [ShardedWriter(t, specs, shard_size) for t in tmps]
        for w in writers:
            stack.callback(w.close)
        for name, shp in tqdm(shape.tensors(), desc=f"writing {len(dirs)} checkpoints",
                              unit="tensor", disable=not progress):
            gen = torch.Generator().manual_seed(parameter_seed(seed, name, -1))
            if len(shp) == 2:
                base = 0.02 * normal(*shp, generator=gen)
                taus = structured_task_vectors(shp, experts, generator=gen)
            else:
                base = torch.ones(shp)
                taus = [1e-3 * normal(*shp, generator=gen) for _ in range(experts)]
            writers[0].write(name, base.to(dt))
            for w, tau in zip(writers[1:], taus, strict=True):
                w.write(name, (base + tau).to(dt))
        for w, t in zip(writers, tmps, strict=True):
            w.write_index(w.finish())
            write_text(t / "config.json", config)
    return dirs
