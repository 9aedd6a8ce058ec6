"""How each expert is lined up with the base before any tensor is merged: a tied output head
stored by one and not the other, tokens an expert adds to the vocabulary (dropped, or placed by
a union vocabulary), and an adapter trained on another base. ``CheckpointSource`` calls these
once, when it opens its experts."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from specmerge.errors import CheckpointError, IncompatibleCheckpointError
from specmerge.io.adapter import Adapter
from specmerge.io.checkpoint import Checkpoint
from specmerge.plan import ParamInfo
from specmerge.roles import TIED_EMBEDDING, ModelInfo, parameter_role

log = logging.getLogger(__name__)

VocabularySource = Literal["error", "base", "union"]


def vocabulary_tensors(index: Mapping[str, ParamInfo], info: ModelInfo,
                       vocab_size: int) -> dict[str, int]:
    """The embedding and head tensors with the input embedding's row count, each with its output
    rows: enough for ``vocab_size`` tokens, and never fewer than the base has (padding)."""
    embed = next((n for n, p in index.items() if TIED_EMBEDDING.search(n) and len(p.shape) == 2),
                 None)
    if embed is None:
        raise CheckpointError("tokenizer source 'union': no input embedding found among the "
                              "base's tensors")
    rows = index[embed].shape[0]
    return {n: max(rows, vocab_size) for n, p in index.items() if len(p.shape) == 2
            and p.shape[0] == rows
            and parameter_role(n, p.shape, p.dtype, info) in ("embedding", "head")}


def added_token_rows(base: Checkpoint, expert: Checkpoint, info: ModelInfo,
                     vocabulary: VocabularySource) -> dict[str, int]:
    """The embedding and head tensors where ``expert`` has more rows than the base (added
    tokens), each with the base's row count. With ``vocabulary`` "base" they are read up to the
    base's rows (the added rows are dropped, with a warning that counts them); otherwise such an
    expert is an error that names the recipe key that resolves it."""
    rows = {}
    for name, b in base.infos.items():
        e = expert.infos.get(name)
        if (e is not None and len(b.shape) == 2 and e.shape[1:] == b.shape[1:]
                and e.shape[0] > b.shape[0]
                and parameter_role(name, b.shape, b.dtype, info) in ("embedding", "head")):
            rows[name] = b.shape[0]
    if not rows:
        return rows
    name = next(iter(rows))
    added = expert.infos[name].shape[0] - rows[name]
    if vocabulary == "union":
        return rows  # merged on the base's rows; the added ones are placed from the experts
    if vocabulary != "base":
        raise IncompatibleCheckpointError(
            f"{expert.infos[name].file}: tensor {name!r} has {expert.infos[name].shape[0]} rows, "
            f"the base {rows[name]}: this expert adds {added} token(s) to the vocabulary. Set "
            f"'tokenizer: {{source: base}}' in the recipe to keep the base's vocabulary and drop "
            f"the added rows ('tokenizer_source: base' in a mergekit recipe)")
    log.warning("%s: dropping the %d row(s) past the base's vocabulary (added tokens) of %s "
                "(tokenizer source: base)", expert.path, added, ", ".join(sorted(rows)))
    return rows


def warn_other_base(adapter: Adapter, base: Checkpoint) -> None:
    """Warn when an adapter says it was trained on another base than the recipe's."""
    named = adapter.base_model
    if not named:
        return
    cfg = base.config_dir / "config.json" if base.config_dir else None
    known = {str(base.path), base.path.name}
    if cfg is not None and cfg.is_file():
        try:
            known.add(str(json.loads(cfg.read_text(encoding="utf-8")).get("_name_or_path")))
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            pass
    if named not in known and Path(named).name not in known:
        log.warning("%s: the adapter names %r as its base, the recipe %s", adapter.path, named,
                    base.path)


def tied_pair(index: Mapping[str, ParamInfo], info: ModelInfo) -> tuple[str, str] | None:
    """(head, embedding) names of a model whose config ties them, where the head may be stored
    or not: the input embedding and the output head of the same shape."""
    if not info.tie_word_embeddings:
        return None
    embeds = [n for n, p in index.items()
              if parameter_role(n, p.shape, p.dtype, info) == "embedding"
              and info.vocab_size in (None, p.shape[0])]
    heads = {"lm_head.weight", "embed_out.weight", "cls.predictions.decoder.weight"}
    embed = next((n for n in embeds if TIED_EMBEDDING.search(n)), None)
    if embed is None:
        return None
    stored = [n for n in index if n in heads]
    return (stored[0] if stored else "lm_head.weight"), embed


def match_tied_head(base: Checkpoint, expert: Checkpoint, head: str, embed: str) -> None:
    """With tied embeddings, an input may store the head or not: write what the base writes.
    An expert's extra head copy is left out; a head it lacks is read as its embedding."""
    if head not in base.infos and head in expert.infos:
        expert.drop(head)
        log.info("%s: leaving out %r, a stored copy of the tied %r that the base does not "
                 "store", expert.path, head, embed)
    elif head in base.infos and head not in expert.infos and embed in expert.infos:
        expert.alias(head, embed)
        log.info("%s: reading the tied %r as %r, which this expert stores", expert.path, head,
                 embed)
