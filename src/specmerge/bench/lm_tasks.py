"""The task folders of ``specmerge bench lm`` (data/lm/README.md) and their scoring rules.

A task folder holds ``task.json`` (``kind``: ``choice`` or ``generate``; for ``generate`` also
``max_new_tokens``), ``train.jsonl``, ``test.jsonl`` and optionally ``validation.jsonl``:

- ``choice`` rows: ``{"prompt": str, "choices": [str, ...], "label": int}``, scored by
  log-likelihood: the prediction is argmax_c Σ_j log p(c_j | prompt, c_<j) over the tokens of
  " " + choice (lm-evaluation-harness's ``acc`` of a ``multiple_choice`` task);
- ``generate`` rows: ``{"prompt": str, "target": str, "answer": str}``; ``target`` is what an
  expert is trained to write, ``answer`` the final answer. The greedy continuation, cut at the
  first blank line, is right when the last number in it (commas removed) equals ``answer``
  (lm-eval's ``generate_until`` with a ``regex`` filter, ``group_select: -1``, ``exact_match``).

The same rules are written as lm-eval task YAMLs by ``write_lm_eval_tasks``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from specmerge.io.writer import atomic_write_text

from .text8 import BenchError, file_sha256, jsonl_records, resolve_task_dir

KINDS = ("choice", "generate")
# The last number of a continuation: an optional sign, digits with thousands commas, decimals.
NUMBER = r"(-?[0-9][0-9,]*(?:\.[0-9]+)?)"
STOP = "\n\n"  # a continuation ends at the first blank line (lm-eval's ``until``)
PPL_FILE = "perplexity.jsonl"  # top-level file of a data directory: {"text": str} per line
RESERVED = ("ppl",)  # score keys that are not tasks


@dataclass
class LmTask:
    """One task folder: its kind, splits and generation length."""

    name: str
    path: Path
    kind: str
    train: list[dict]
    test: list[dict]
    validation: list[dict] | None
    max_new_tokens: int = 0
    description: str = ""

    def files_digest(self) -> str:
        """Hash of what changes an expert: task.json and the train and validation files."""
        h = hashlib.sha256()
        for fname in ("task.json", "train.jsonl", "validation.jsonl"):
            p = self.path / fname
            h.update(fname.encode())
            h.update(file_sha256(p).encode() if p.is_file() else b"-")
        return h.hexdigest()

    def completion(self, row: dict) -> str:
        """What an expert learns to write after the prompt: the right choice, or the target."""
        return row["choices"][row["label"]] if self.kind == "choice" else row["target"]


def _read_rows(path: Path, kind: str) -> list[dict]:
    keys = {"choice": ("prompt", "choices", "label"), "generate": ("prompt", "target", "answer")}
    rows = []
    for i, d in jsonl_records(path):
        missing = [k for k in keys[kind] if k not in d]
        if missing:
            raise BenchError(f"{path}:{i}: a {kind!r} row needs {list(keys[kind])}; "
                             f"missing {missing}")
        if kind == "choice" and not (isinstance(d["choices"], list) and len(d["choices"]) > 1
                                     and isinstance(d["label"], int)
                                     and 0 <= d["label"] < len(d["choices"])):
            raise BenchError(f"{path}:{i}: 'choices' must be a list of ≥ 2 strings and "
                             f"'label' an index into it, got label {d['label']!r}")
        rows.append(d)
    if not rows:
        raise BenchError(f"{path}: no rows")
    return rows


def load_lm_task(data_dir: Path | None, task: str) -> LmTask:
    """A task folder by name under ``data_dir`` or by path (see the module docstring)."""
    d = resolve_task_dir(data_dir, task)
    meta_path = d / "task.json"
    if not meta_path.is_file():
        raise BenchError(f"task {task!r}: missing {meta_path} (an LM task folder has task.json, "
                         "train.jsonl and test.jsonl; see data/lm/README.md)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    kind = meta.get("kind")
    if kind not in KINDS:
        raise BenchError(f"{meta_path}: 'kind' must be one of {list(KINDS)}, got {kind!r}")
    if d.name in RESERVED:
        raise BenchError(f"task {task!r}: the name {d.name!r} is reserved")
    mnt = int(meta.get("max_new_tokens", 0))
    if kind == "generate" and mnt < 1:
        raise BenchError(f"{meta_path}: a 'generate' task needs 'max_new_tokens' ≥ 1")
    for fname in ("train.jsonl", "test.jsonl"):
        if not (d / fname).is_file():
            raise BenchError(f"task {task!r}: missing {d / fname}")
    val = d / "validation.jsonl"
    return LmTask(d.name, d, kind, _read_rows(d / "train.jsonl", kind),
                  _read_rows(d / "test.jsonl", kind),
                  _read_rows(val, kind) if val.is_file() else None, mnt,
                  str(meta.get("description", "")))


def read_texts(path: Path) -> list[str]:
    """The general-text sample for perplexity: one ``{"text": str}`` per line."""
    out = []
    for i, d in jsonl_records(Path(path)):
        if not isinstance(d.get("text"), str):
            raise BenchError(f"{path}:{i}: expected {{'text': str}}")
        out.append(d["text"])
    return out


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------

def format_number(x: float) -> str:
    """A number as the data writes answers: an integer without ".0", else at most 4 decimals."""
    if not math.isfinite(x):
        raise ValueError(f"not a finite number: {x}")
    if abs(x - round(x)) < 1e-9:
        return str(int(round(x)))
    return f"{round(x, 4):.4f}".rstrip("0").rstrip(".")


def cut(text: str) -> str:
    """The continuation up to its first blank line."""
    return text.split(STOP, 1)[0]


def final_answer(text: str) -> str | None:
    """The last number of the continuation (cut at the first blank line), commas removed."""
    found = re.findall(NUMBER, cut(text))
    return found[-1].replace(",", "") if found else None


def is_correct(text: str, answer: str) -> bool:
    return final_answer(text) == answer.replace(",", "")


# --------------------------------------------------------------------------------------------
# lm-evaluation-harness task definitions
# --------------------------------------------------------------------------------------------

def _yaml_for(task: LmTask, test_file: Path) -> dict:
    common = {"task": f"specmerge_{task.name}", "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(test_file)}},
              "test_split": "test", "doc_to_text": "{{prompt}}", "num_fewshot": 0}
    if task.kind == "choice":
        return {**common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}", "target_delimiter": " ",
                "metric_list": [{"metric": "acc", "aggregation": "mean",
                                 "higher_is_better": True}]}
    return {**common, "output_type": "generate_until", "doc_to_target": "{{answer}}",
            "target_delimiter": " ",
            "generation_kwargs": {"until": [STOP], "do_sample": False,
                                  "max_gen_toks": task.max_new_tokens},
            "filter_list": [{"name": "last_number", "filter": [
                {"function": "regex", "regex_pattern": NUMBER, "group_select": -1},
                {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                             "higher_is_better": True, "regexes_to_ignore": [","]}]}


def ppl_yaml(text_file: Path) -> dict:
    """lm-eval's rolling log-likelihood over the general-text sample (word/byte perplexity)."""
    return {"task": "specmerge_ppl", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(text_file)}}, "test_split": "test",
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target":
            "{{text}}", "num_fewshot": 0,
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity",
                                                     "bits_per_byte")]}


def write_lm_eval_tasks(tasks: list[LmTask], out: Path, ppl_file: Path | None = None,
                        relative_to: Path | None = None) -> list[Path]:
    """One lm-eval YAML per task (and the perplexity sample) under ``out``: run them with
    ``lm_eval --model hf --model_args pretrained=DIR --include_path OUT --tasks specmerge_x``.
    Data paths are absolute, or relative to ``relative_to`` (then run lm_eval from there)."""
    import yaml

    def where(p: Path) -> Path:
        p = Path(p).resolve()
        return p.relative_to(relative_to.resolve()) if relative_to is not None else p

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for t in tasks:
        files.append(atomic_write_text(out / f"specmerge_{t.name}.yaml", yaml.safe_dump(
            _yaml_for(t, where(t.path / "test.jsonl")), sort_keys=False, allow_unicode=True)))
    if ppl_file is not None:
        files.append(atomic_write_text(out / "specmerge_ppl.yaml", yaml.safe_dump(
            ppl_yaml(where(ppl_file)), sort_keys=False)))
    return files
