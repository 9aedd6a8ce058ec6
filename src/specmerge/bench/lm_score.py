"""The ``bench lm`` evaluator: one reusable causal LM that loads any checkpoint or adapter and
scores the tasks by lm_tasks's rules (log-likelihood of the choices; greedy generation, exact
match of the final number), plus token perplexity on a general-text sample.

The rules are lm-evaluation-harness's (``multiple_choice`` ``acc`` and ``generate_until`` with a
regex filter); ``lm_tasks.write_lm_eval_tasks`` writes them as lm-eval tasks, so any model
the benchmark scores can be re-scored with ``lm_eval`` alone.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import peft_rows as P
from .lm import encode_pair, load_lm
from .lm_tasks import STOP, LmTask, cut, is_correct

PPL = "ppl"  # the score key of the perplexity set
PPL_WINDOW = 512


@dataclass
class LmEvalSet:
    """A tokenised evaluation set: ``choice`` items (context, continuations, label),
    ``generate`` items (context, answer), or ``ppl`` windows of token ids."""

    kind: str
    items: list = field(default_factory=list)
    max_new_tokens: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.kind, self.items, self.max_new_tokens])
                              .encode()).hexdigest()


def task_set(tok, task: LmTask, rows: list[dict]) -> LmEvalSet:
    if task.kind == "choice":
        items = []
        for r in rows:
            pairs = [encode_pair(tok, r["prompt"], " " + c) for c in r["choices"]]
            items.append((pairs[0][0], [cont for _, cont in pairs], r["label"]))
        return LmEvalSet("choice", items)
    return LmEvalSet("generate", [(tok(r["prompt"], add_special_tokens=False)["input_ids"],
                                   r["answer"]) for r in rows], task.max_new_tokens)


def ppl_set(tok, texts: list[str], window: int = PPL_WINDOW) -> LmEvalSet:
    """Each text's tokens, in non-overlapping windows of at most ``window`` tokens."""
    items = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        items += [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]
    return LmEvalSet(PPL, items)


def _batches(seqs: list[list[int]], budget: int) -> list[list[int]]:
    """Indices of ``seqs`` sorted by length, in batches of at most ``budget`` padded tokens."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out, cur = [], []
    for i in order:
        if cur and len(seqs[i]) * (len(cur) + 1) > budget:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + ([cur] if cur else [])


@torch.inference_mode()
def continuation_logprobs(model, seqs: list[tuple[list[int], list[int]]], pad_id: int,
                          device: str, budget: int = 4096) -> list[float]:
    """Σ_j log p(cont_j | ctx, cont_<j) for each (ctx, cont) pair, in right-padded batches."""
    full = [ctx + cont for ctx, cont in seqs]
    out = [0.0] * len(seqs)
    for b in _batches(full, budget):
        n = max(len(full[i]) for i in b)
        ids = torch.full((len(b), n), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(b):
            ids[j, :len(full[i])] = torch.tensor(full[i])
            mask[j, :len(full[i])] = 1
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device))
                                 .logits.float(), dim=-1).cpu()
        for j, i in enumerate(b):
            ctx, cont = seqs[i]
            pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
            out[i] = float(logp[j, pos, torch.tensor(cont)].sum())
    return out


def choice_accuracy(model, es: LmEvalSet, pad_id: int, device: str) -> float:
    """% of items whose right continuation has the highest summed log-likelihood. Every
    (prompt, choice) sequence runs whole, in length-sorted batches: on a CPU that is faster
    than running each prompt once and its choices from its key/value cache (8 agnews_qa items:
    35 s against 96 s on this machine), because per-call overhead dominates short inputs."""
    pairs = [(ctx, c) for ctx, conts, _ in es.items for c in conts]
    lp = continuation_logprobs(model, pairs, pad_id, device)
    correct, k = 0, 0
    for _, conts, label in es.items:
        scores = lp[k:k + len(conts)]
        k += len(conts)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == label)
    return 100.0 * correct / max(1, len(es))


@torch.inference_mode()
def generate(model, tok, contexts: list[list[int]], max_new_tokens: int, device: str,
             batch_size: int = 16) -> list[str]:
    """Greedy continuations (left-padded batches), each cut at the first blank line."""
    out = [""] * len(contexts)
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    pad = tok.pad_token_id
    for s in range(0, len(order), batch_size):
        b = order[s:s + batch_size]
        n = max(len(contexts[i]) for i in b)
        ids = torch.full((len(b), n), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(b):
            ids[j, n - len(contexts[i]):] = torch.tensor(contexts[i])
            mask[j, n - len(contexts[i]):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             eos_token_id=tok.eos_token_id, stop_strings=[STOP], tokenizer=tok)
        for j, i in enumerate(b):
            out[i] = cut(tok.decode(gen[j, n:], skip_special_tokens=True))
    return out


def exact_match(model, tok, es: LmEvalSet, device: str) -> float:
    texts = generate(model, tok, [c for c, _ in es.items], es.max_new_tokens, device)
    return 100.0 * sum(is_correct(t, a) for t, (_, a) in zip(texts, es.items, strict=True)
                       ) / max(1, len(es))


@torch.inference_mode()
def perplexity(model, es: LmEvalSet, pad_id: int, device: str) -> float:
    """exp(mean token NLL) over the windows; a window's first token is not predicted."""
    lp = continuation_logprobs(model, [(w[:1], w[1:]) for w in es.items], pad_id, device)
    n = sum(len(w) - 1 for w in es.items)
    return math.exp(-sum(lp) / max(1, n))


class LmEvaluator:
    """One causal LM; ``load`` sets any checkpoint's (or adapter's) weights, ``scores`` runs
    the sets. The interface of runner.Evaluator, so runner.Bench's rows work unchanged."""

    loader = staticmethod(load_lm)

    def __init__(self, base: Path, device: str):
        self.model, self.tok = load_lm(base, device)
        self.base, self.device = base, device
        self.base_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load(self, ckpt: Path) -> None:
        from . import text8 as T

        if (Path(ckpt) / "adapter_config.json").is_file():
            self.load_deltas(P.PeftMerger(self.base, [Path(ckpt)], self.loader).deltas("e0"))
        else:
            T.load_weights(self.model, ckpt)

    def load_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        P.apply_deltas(self.model, self.base_state, deltas)

    def score(self, es: LmEvalSet) -> float:
        pad = self.tok.pad_token_id
        if es.kind == "choice":
            return choice_accuracy(self.model, es, pad, self.device)
        if es.kind == "generate":
            return exact_match(self.model, self.tok, es, self.device)
        return perplexity(self.model, es, pad, self.device)

    def scores(self, sets: dict[str, LmEvalSet], heads: dict | None = None) -> dict[str, float]:
        return {name: self.score(es) for name, es in sets.items()}
