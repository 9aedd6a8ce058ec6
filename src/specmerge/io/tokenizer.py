"""Vocabularies of the inputs, and the union tokenizer an output gets with
``tokenizer: {source: union}``. Read and written with the ``tokenizers`` library (tokenizer.json);
never parsed by hand."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from specmerge.errors import CheckpointError, OutputError


def _tokenizer(directory: Path | None, what: str):  # -> tokenizers.Tokenizer
    try:
        from tokenizers import Tokenizer
    except ImportError as err:  # pragma: no cover - a dependency of transformers
        raise CheckpointError("tokenizer source 'union' needs the tokenizers library: pip "
                              "install tokenizers") from err
    path = directory / "tokenizer.json" if directory is not None else None
    if path is None or not path.is_file():
        raise CheckpointError(f"{directory}: no tokenizer.json in {what}; tokenizer source "
                              f"'union' reads every input's tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises its own types
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({err})") from err


@dataclass
class VocabularyUnion:
    """The base's vocabulary plus every token an expert added, in order of first appearance.

    ``new`` lists (token, special, union id); ``sources[u]`` the (expert index, expert id) pairs
    that hold union id u. Every expert must keep the base's token → id mapping.
    """

    base_dir: Path
    base_size: int
    new: list[tuple[str, bool, int]] = field(default_factory=list)
    sources: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    extra_special: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.base_size + len(self.new)


def vocabulary_union(base_dir: Path | None, expert_dirs: Sequence[Path | None]
                     ) -> VocabularyUnion:
    base = _tokenizer(base_dir, "the base")
    assert base_dir is not None
    base_vocab = base.get_vocab(with_added_tokens=True)
    union = VocabularyUnion(base_dir, base.get_vocab_size(with_added_tokens=True))
    ids: dict[str, int] = {}
    for i, d in enumerate(expert_dirs):
        tok = _tokenizer(d, f"expert {i + 1}")
        vocab = tok.get_vocab(with_added_tokens=True)
        moved = next((t for t, j in base_vocab.items() if vocab.get(t) != j), None)
        if moved is not None:
            raise CheckpointError(
                f"{d}: token {moved!r} has id {vocab.get(moved)} here and {base_vocab[moved]} in "
                f"the base; tokenizer source 'union' needs experts whose vocabularies extend the "
                f"base's (tokens added at the end)")
        special = {a.content for a in tok.get_added_tokens_decoder().values() if a.special}
        for token, j in sorted(vocab.items(), key=lambda kv: kv[1]):
            if token in base_vocab:
                continue
            if token not in ids:
                ids[token] = union.size
                union.new.append((token, token in special, ids[token]))
            union.sources.setdefault(ids[token], []).append((i, j))
        cfg = d / "tokenizer_config.json" if d is not None else None
        if cfg is not None and cfg.is_file():
            extra = json.loads(cfg.read_text(encoding="utf-8")).get("extra_special_tokens")
            if isinstance(extra, list):
                union.extra_special += [t for t in extra
                                        if isinstance(t, str) and t not in union.extra_special]
    return union


def write_union_tokenizer(out: Path, union: VocabularyUnion, vocab_rows: int) -> None:
    """The base's tokenizer with the union's new tokens added (same ids as ``union``), and its
    tokenizer_config.json listing the experts' extra special tokens; config.json's vocab_size."""
    from tokenizers import AddedToken

    tok = _tokenizer(union.base_dir, "the base")
    for token, special, uid in union.new:
        added = AddedToken(token, special=special, normalized=not special)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
        if tok.token_to_id(token) != uid:
            raise OutputError(f"{out}: the union tokenizer gave {token!r} id "
                              f"{tok.token_to_id(token)}, expected {uid}; nothing was written")
    tok.save(str(out / "tokenizer.json"))
    cfg_path = out / "tokenizer_config.json"
    if cfg_path.is_file() and union.extra_special:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["extra_special_tokens"] = union.extra_special
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    config = out / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text(encoding="utf-8"))
        cfg["vocab_size"] = vocab_rows
        config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
