"""The files of an HF output directory beside the weights: config and tokenizer files copied
from the base, the resolved recipe, and the model card. Deterministic: no timings, no dates."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import yaml

from specmerge._version import __version__
from specmerge.errors import OutputError
from specmerge.io.writer import write_text
from specmerge.linalg import dtype_name
from specmerge.methods.registry import get_method
from specmerge.plan import Plan
from specmerge.recipe import Recipe

log = logging.getLogger(__name__)

# files of the base directory that are NOT copied next to the merged weights: weights, their
# indexes, the base's model card (the merge writes its own) and specmerge's marker; every
# other file is (config, tokenizer, processor, remote code, licence, params.json…)
NOT_COPIED = re.compile(
    r"^(.*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|tflite|ot)|"
    r".*\.index\.json|README\.md|SPECMERGE_INCOMPLETE|\..*)$")


def main_dtype(tensors: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> str | None:
    """The floating dtype that holds the most parameters (what config.json's dtype records)."""
    sizes: dict[torch.dtype, int] = {}
    for shape, dtype in tensors:
        if dtype.is_floating_point:
            sizes[dtype] = sizes.get(dtype, 0) + torch.Size(shape).numel()
    return dtype_name(max(sizes, key=lambda d: sizes[d])) if sizes else None


def input_home(directory: Path) -> Path:
    """The directory whose files an input may link to: the input directory itself, or, for a
    Hugging Face cache snapshot (``models--org--name/snapshots/REV``), the repository folder
    that holds its ``blobs``. Side files linking anywhere else are not copied."""
    home = directory.resolve()
    return home.parent.parent if home.parent.name == "snapshots" else home


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# a tokenizer's files: from the tokenizer source where it is a model, not from the base
# (mergekit 0.1.5's list in merge.py's _copy_tokenizer, less generation_config.json)
TOKENIZER_FILES = frozenset((
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja",
    "chat_template.json", "spiece.model", "sentencepiece.bpe.model"))


def write_side_files(out: Path, config_dir: Path | None, recipe: Recipe,
                     out_dtype: str | None, num_layers: int | None = None,
                     tokenizer_dir: Path | None = None) -> None:
    """Copy the base's config and tokenizer files (the tokenizer's from ``tokenizer_dir``
    where given), set config.json's dtype (and, for an output of another depth, its layer
    count), write the recipe."""
    if config_dir is not None:
        _copy_files(out, config_dir, lambda n: tokenizer_dir is None or n not in TOKENIZER_FILES)
    if tokenizer_dir is not None:
        _copy_files(out, tokenizer_dir, lambda n: n in TOKENIZER_FILES)
    _write_config_and_recipe(out, recipe, out_dtype, num_layers)


def _copy_files(out: Path, config_dir: Path, wanted: Callable[[str], bool]) -> None:
    if config_dir is not None:
        home = input_home(config_dir)
        for f in sorted(config_dir.iterdir()):
            if f.is_file() and not NOT_COPIED.match(f.name) and wanted(f.name):
                if not f.resolve().is_relative_to(home):
                    log.warning("not copied into the output: %s is a link to %s, outside the "
                                "input directory %s", f, f.resolve(), home)
                    continue
                try:
                    shutil.copy2(f, out / f.name)
                except OSError as err:
                    raise OutputError(f"{out / f.name}: cannot copy from {config_dir}: "
                                      f"{err}") from err


def _write_config_and_recipe(out: Path, recipe: Recipe, out_dtype: str | None,
                             num_layers: int | None) -> None:
    config = out / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
        except ValueError:
            log.warning("%s is not valid JSON; copied as is", config)
            cfg = None
        if isinstance(cfg, dict) and (out_dtype is not None or num_layers is not None):
            if out_dtype is not None:
                keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
                for k in keys:
                    cfg[k] = out_dtype
            if num_layers is not None:
                for k in [k for k in LAYER_COUNT_KEYS if k in cfg] or ["num_hidden_layers"]:
                    cfg[k] = num_layers
            write_text(config, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    header = f"# Resolved by specmerge {__version__}: every default filled in.\n"
    write_text(out / "specmerge_recipe.yaml",
               header + yaml.safe_dump(recipe.resolved(), sort_keys=False))


def check_auto_map(config_dir: Path | None) -> None:
    """Every module that the base's config.json ``auto_map`` names (remote code) must be in the
    base directory, since it is copied to the output; otherwise the merge would not load with
    trust_remote_code=True. Checked before any work."""
    cfg_path = config_dir / "config.json" if config_dir is not None else None
    if cfg_path is None or not cfg_path.is_file():
        return
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return  # reported where the config is read for the roles
    auto_map = cfg.get("auto_map") if isinstance(cfg, dict) else None
    if not isinstance(auto_map, Mapping):
        return
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v])
            if isinstance(r, str)]
    for ref in refs:
        if "--" in ref:  # "owner/repo--module.Class": the code lives in another Hub repository
            continue
        module = ref.rsplit(".", 1)[0].replace(".", "/") + ".py"
        if not (config_dir / module).is_file():
            raise OutputError(f"{cfg_path}: auto_map names {ref!r}, but {module} is not in the "
                              f"base directory, so the merge could not load with "
                              f"trust_remote_code=True; add the file to the base directory")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LAYER_NUMBER = re.compile(r"\.\d+\.")


def base_model_id(config_dir: Path | None, base_path: Path) -> str:
    """``_name_or_path`` of the base's config.json when it looks like a Hub id, else the base
    directory's name (the model card's ``base_model``)."""
    cfg_path = config_dir / "config.json" if config_dir is not None else None
    if cfg_path is not None and cfg_path.is_file():
        try:
            name = json.loads(cfg_path.read_text(encoding="utf-8")).get("_name_or_path")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            name = None
        if isinstance(name, str) and HUB_ID.match(name) and not Path(name).exists():
            return name
    return base_path.name


def _pattern(name: str) -> str:
    return LAYER_NUMBER.sub(".*.", name)


def roles_table(plan: Plan) -> list[str]:
    """One Markdown row per name pattern (layer numbers as *): role, action, SVC, layout."""
    groups: dict[tuple[str, ...], int] = {}
    for e in plan.entries:
        action = {"method": f"`{e.method}`", "copy": "copied",
                  "fallback": f"fallback `{plan.recipe.scope.fallback}`"}[e.action]
        layout = "Conv1D: merged transposed, as (out, in)" if e.transpose else ""
        key = (_pattern(e.name), e.role, action, "yes" if e.calibrate else "–", layout)
        groups[key] = groups.get(key, 0) + 1
    rows = ["| tensors | count | role | action | SVC | layout |", "|---|---:|---|---|---|---|"]
    rows += [f"| `{k[0]}` | {n} | {k[1]} | {k[2]} | {k[3]} | {k[4]} |" for k, n in groups.items()]
    return rows


INPUTS_NOTE = ("Paths are relative to the inputs' common directory; `specmerge_recipe.yaml` "
               "names them in full.")


def input_names(recipe: Recipe) -> list[str]:
    """The inputs, base first, as a model card names them: relative to their common directory
    (the resolved recipe names them in full). They depend on the inputs alone, not on where the
    recipe sits or on the current directory, so a re-run of the resolved recipe writes the same
    card; and no absolute path reaches a card that may be published."""
    paths = [recipe.base_model, *(m.model for m in recipe.models)]
    try:
        root = os.path.commonpath(paths)
    except ValueError:  # absolute and relative paths mixed (a Recipe built by hand)
        return paths
    return [os.path.relpath(p, root) for p in paths]


def model_card(plan: Plan, base_path: Path, config_dir: Path | None) -> str:
    """The model card, after the Hugging Face conventions: YAML front matter (base_model, tags,
    library_name), the method, calibration, scope and inputs (``input_names``), and what
    happened to every tensor, by name pattern. No timings, so it is deterministic."""
    recipe = plan.recipe
    base, *experts = input_names(recipe)
    method = get_method(recipe.merge_method)
    counts = plan.counts()
    lines = [
        "---", f"base_model: {json.dumps(base_model_id(config_dir, base_path))}",
        "library_name: transformers", f"tags: [merge, specmerge, {recipe.merge_method}]", "---",
        "", f"# Merged with specmerge {__version__}", "",
        f"- **Method:** `{recipe.merge_method}`: {method.summary} ({method.citation})",
        f"- **Parameters:** `{json.dumps(recipe.recorded_parameters, sort_keys=True)}`",
    ]
    if recipe.calibrate is not None:
        cal = get_method(recipe.calibrate["method"])
        params = {k: v for k, v in recipe.calibrate.items() if k != "method"}
        lines.append(f"- **Calibration:** `{cal.name}` after `{recipe.merge_method}`: "
                     f"{cal.summary} ({cal.citation}); parameters "
                     f"`{json.dumps(params, sort_keys=True)}`")
    else:
        lines.append("- **Calibration:** none")
    lines += [
        f"- **Scope:** exclude {recipe.scope.exclude}, fallback `{recipe.scope.fallback}`",
        f"- **Compute dtype:** {recipe.dtype}; seed {recipe.seed}",
        f"- **Tensors:** {counts.get('method', 0)} by the method, {counts.get('fallback', 0)} by "
        f"the fallback, {counts.get('copy', 0)} copied, {counts.get('calibrated', 0)} calibrated",
        "", "## Inputs", "", f"- base: `{base}`",
        *[f"- expert {i + 1}: `{name}` (weight {m.weight})"
          for i, (name, m) in enumerate(zip(experts, recipe.models, strict=True))],
        "", INPUTS_NOTE, "",
        "## What happened to each tensor", "", *roles_table(plan), "",
        "The full resolved recipe is in `specmerge_recipe.yaml`.", "",
    ]
    return "\n".join(lines)
