"""The output's chat template (mergekit's ``chat_template``): a template name, ``auto`` (the
template most of the inputs have), or a Jinja template given as text. Written into the
output's ``tokenizer_config.json`` (and into ``chat_template.jinja`` / ``chat_template.json``
where the tokenizer has one, so that every file transformers reads agrees).

mergekit 0.1.5's rules (mergekit/merge.py, ``_set_chat_template``): a value shorter than 256
characters with no newline and no "{" is a name; anything else is a template, and a template
shorter than 20 characters or without "{" is invalid. ``auto`` takes the plurality among the
inputs (unchanged when none has one). specmerge knows the name ``chatml`` (its template written
here from the ChatML format); other names are refused, naming the ones it knows.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from specmerge.errors import OutputError
from specmerge.io.writer import write_text

log = logging.getLogger(__name__)

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt "
          "%}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT_TEMPLATES = {"chatml": CHATML}


def is_name(value: str) -> bool:
    return len(value) < 256 and "\n" not in value and "{" not in value


def check_chat_template(value: str) -> str:
    """``value`` if it is ``auto``, a known name or a plausible template; else ValueError."""
    if value == "auto" or value in CHAT_TEMPLATES:
        return value
    if is_name(value):
        raise ValueError(f"chat_template {value[:80]!r}: not a template name specmerge knows "
                         f"({sorted(CHAT_TEMPLATES)} or auto); give the Jinja template itself")
    if len(value) < 20 or "{" not in value:
        raise ValueError(f"chat_template {value[:80]!r} is not a Jinja template")
    return value


def _template_of(directory: Path) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8").strip()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(value, dict):  # mergekit reads a dict's "default"
                value = value.get("default")
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def resolve_chat_template(value: str, inputs: Sequence[Path | None]) -> str | None:
    """The template text of ``value`` (None: ``auto`` and no input has a template)."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if value != "auto":
        return value
    found = [t for d in inputs if d is not None and (t := _template_of(d)) is not None]
    if not found:
        log.warning("chat_template auto: no input has a chat template; the output's is left "
                    "as it is")
        return None
    return Counter(found).most_common(1)[0][0]


def write_chat_template(out: Path, template: str) -> None:
    """Set ``template`` in ``out``'s tokenizer_config.json, and in its chat_template.jinja or
    chat_template.json where they exist (transformers prefers those)."""
    cfg_path = out / "tokenizer_config.json"
    if not cfg_path.is_file():
        raise OutputError(f"{out}: no tokenizer_config.json to write the chat_template into "
                          f"(the tokenizer source has none)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = template
    write_text(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if (out / "chat_template.jinja").is_file():
        write_text(out / "chat_template.jinja", template)
    side = out / "chat_template.json"
    if side.is_file():
        write_text(side, json.dumps({"chat_template": template}, indent=2,
                                    ensure_ascii=False) + "\n")
