"""Vocabularies of the inputs, and the union tokenizer an output gets with
``tokenizer: {source: union}``. Read and written with the ``tokenizers`` library (tokenizer.json);
never parsed by hand."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specmerge.errors import CheckpointError, OutputError

log = logging.getLogger(__name__)


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
    # union id → (model, row) whose row it takes whatever the merge gives (model 0: the base,
    # i: the i-th expert; None: a zero row): the recipe's ``tokens`` with ``force``
    forced: dict[int, tuple[int, int] | None] = field(default_factory=dict)
    copied_from: Path | None = None  # the tokenizer is this model's, copied (not rebuilt)

    @property
    def size(self) -> int:
        return self.base_size + len(self.new)


def _extends(vocab: dict[str, int], base_vocab: dict[str, int], where: Path | None,
             source: str) -> None:
    moved = next((t for t, j in base_vocab.items() if vocab.get(t) != j), None)
    if moved is not None:
        raise CheckpointError(
            f"{where}: token {moved!r} has id {vocab.get(moved)} here and {base_vocab[moved]} in "
            f"the base; tokenizer source {source} needs vocabularies that extend the base's "
            f"(tokens added at the end); mergekit's re-ordering of rows is not supported")


def vocabulary_union(base_dir: Path | None, expert_dirs: Sequence[Path | None],
                     target: Path | None = None, added: bool = True) -> VocabularyUnion:
    """The output vocabulary: the base's plus every expert's added tokens in order of first
    appearance, or with ``target`` (tokenizer source: a model) that model's vocabulary, which
    must extend the base's. An added token's rows come from the experts that have it.
    ``added`` False: the base's vocabulary (experts are not read)."""
    base = _tokenizer(base_dir, "the base")
    assert base_dir is not None
    base_vocab = base.get_vocab(with_added_tokens=True)
    union = VocabularyUnion(base_dir, base.get_vocab_size(with_added_tokens=True),
                            copied_from=target)
    source = "'union'" if target is None else repr(str(target))
    vocabs, specials = [], []
    for i, d in enumerate(expert_dirs if added else ()):
        tok = _tokenizer(d, f"expert {i + 1}")
        vocabs.append(tok.get_vocab(with_added_tokens=True))
        _extends(vocabs[-1], base_vocab, d, source)
        specials.append({a.content for a in tok.get_added_tokens_decoder().values()
                         if a.special})
        union.extra_special += [t for t in _extra_special(d) if t not in union.extra_special]
    vocabs_of_special = vocabs
    if not added:
        tokens: list[str] = []
    elif target is None:
        added_tokens = [t for v in vocabs for t, _ in sorted(v.items(), key=lambda kv: kv[1])
                 if t not in base_vocab]
        tokens = list(dict.fromkeys(added_tokens))
    else:
        tok = _tokenizer(target, "the tokenizer source")
        wanted = tok.get_vocab(with_added_tokens=True)
        _extends(wanted, base_vocab, target, source)
        specials = [{a.content for a in tok.get_added_tokens_decoder().values() if a.special}]
        vocabs_of_special = [wanted]
        tokens = [t for t, _ in sorted(wanted.items(), key=lambda kv: kv[1])
                  if t not in base_vocab]
        dropped = {t for v in vocabs for t in v if t not in base_vocab and t not in wanted}
        if dropped:
            log.warning("tokenizer source %s: %d token(s) that experts added are not in it; "
                        "their rows are dropped", target, len(dropped))
    for k, token in enumerate(tokens):
        uid = union.base_size + k
        special = next(sp for v, sp in zip(vocabs_of_special, specials, strict=True) if token in v)
        union.new.append((token, token in special, uid))
        union.sources[uid] = [(i, v[token]) for i, v in enumerate(vocabs) if token in v]
    if target is not None and added:
        lacking = [t for t, _, uid in union.new if not union.sources[uid]]
        if lacking:
            raise CheckpointError(f"{target}: the tokenizer source's tokens {lacking[:5]} are "
                                  f"in no expert's vocabulary, so no embedding row exists for "
                                  f"them; use a model of the recipe that has them")
        if any(wanted[t] != uid for t, _, uid in union.new):
            raise CheckpointError(f"{target}: the tokenizer source's added token ids are not "
                                  f"contiguous after the base's {union.base_size}")
    return union


def _extra_special(d: Path | None) -> list[str]:
    cfg = d / "tokenizer_config.json" if d is not None else None
    if cfg is None or not cfg.is_file():
        return []
    extra = json.loads(cfg.read_text(encoding="utf-8")).get("extra_special_tokens")
    return [t for t in extra if isinstance(t, str)] if isinstance(extra, list) else []


def write_union_tokenizer(out: Path, union: VocabularyUnion, vocab_rows: int) -> None:
    """The base's tokenizer with the union's new tokens added (same ids as ``union``), and its
    tokenizer_config.json listing the experts' extra special tokens; config.json's vocab_size.
    A tokenizer copied from a model (``copied_from``) is its own already: vocab_size only."""
    from tokenizers import AddedToken

    if union.copied_from is not None:
        _set_vocab_size(out, vocab_rows)
        return
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
    _set_vocab_size(out, vocab_rows)


def _set_vocab_size(out: Path, vocab_rows: int) -> None:
    config = out / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text(encoding="utf-8"))
        cfg["vocab_size"] = vocab_rows
        config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _model_of(path: Any, paths: Sequence[Path], where: str) -> int:
    real = [os.path.realpath(p) for p in paths]
    if not isinstance(path, (str, os.PathLike)) or os.path.realpath(path) not in real:
        raise CheckpointError(f"{where}: {str(path)[:200]!r} is neither the base_model nor one "
                              f"of 'models'")
    return real.index(os.path.realpath(path))


def force_tokens(union: VocabularyUnion, tokens: Mapping[str, Any], dirs: Sequence[Path | None],
                 paths: Sequence[Path]) -> None:
    """The recipe's per-token rows (mergekit's ``tokenizer.tokens``) into ``union.forced``.

    With ``force: true`` every model's row of the token is the source's, so every merge gives
    that row (mergekit/tokenizer/embed.py): a model's own row of the token (``source: MODEL``),
    another token's row (``{kind: model_token, model, token | token_id}``) or zeros
    (``{kind: zero}``). Without ``force`` mergekit uses the source only for the models that
    lack the token: a token every model has is unchanged (logged); an added token is refused.
    ``dirs`` and ``paths``: the base's then each expert's (config directory, path)."""
    out_vocab = {**_tokenizer(union.base_dir, "the base").get_vocab(with_added_tokens=True),
                 **{t: uid for t, _, uid in union.new}}
    vocabs: dict[int, dict[str, int]] = {}

    def vocab(model: int) -> dict[str, int]:
        if model not in vocabs:
            vocabs[model] = _tokenizer(dirs[model], str(paths[model])).get_vocab(
                with_added_tokens=True)
        return vocabs[model]

    for token, spec in tokens.items():
        where = f"tokenizer.tokens[{token!r}]"
        if token not in out_vocab:
            raise CheckpointError(f"{where}: the token is not in the output's vocabulary; "
                                  f"adding tokens through 'tokens' is not supported yet")
        uid, source = out_vocab[token], spec.get("source")
        if not spec.get("force"):
            if uid < union.base_size:
                log.info("%s: every model has the token and force is false: unchanged, as in "
                         "mergekit", where)
                continue
            raise CheckpointError(f"{where}: without force: true, mergekit merges an added "
                                  f"token's row from the models that have it and the source's "
                                  f"for those that lack it; specmerge places one row: set force")
        if isinstance(source, Mapping) and source.get("kind") == "zero":
            union.forced[uid] = None
            continue
        if isinstance(source, Mapping):  # {kind: model_token, model, token | token_id}
            model = _model_of(source.get("model"), paths, f"{where}.source.model")
            row = source.get("token_id")
            if row is None:
                row = vocab(model).get(source.get("token"))
                if row is None:
                    raise CheckpointError(f"{where}.source.token {source.get('token')!r} is not "
                                          f"in {paths[model]}'s vocabulary")
        else:
            model = _model_of(source, paths, f"{where}.source")
            row = vocab(model).get(token)
            if row is None:
                raise CheckpointError(f"{where}: {paths[model]} has no token {token!r}")
        union.forced[uid] = (model, int(row))
