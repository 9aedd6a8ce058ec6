"""The output-format table and the merge options: every format is a registered row, the engine
names none, options a format has no use for are refused, and the options object and keyword
arguments are one API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import recipe_for, tree_hash

import specmerge
from specmerge.engine import MergeOptions
from specmerge.formats import FORMATS, STREAM_OPTIONS, Target, get_format, refuse_unused

SRC = Path(specmerge.__file__).parent


def test_every_format_is_a_row_with_the_whole_interface() -> None:
    for name in FORMATS:
        fmt = get_format(name)
        assert fmt.name == name
        assert set(fmt.refuses) <= set(STREAM_OPTIONS), name
        for member in ("check", "entries", "step", "sink", "describe"):
            assert callable(getattr(fmt, member)), (name, member)
    with pytest.raises(specmerge.SpecmergeError, match=r"unknown output format 'gguf'.*hf"):
        get_format("gguf")


def test_the_engine_and_the_backends_name_no_format() -> None:
    names = "|".join(map(re.escape, FORMATS))
    pattern = re.compile(rf"""["']({names})["']""")
    files = [*(SRC / "engine").glob("*.py"), SRC / "backends.py", SRC / "ray_backend.py"]
    assert len(files) > 5
    for f in files:
        hits = [line.strip() for line in f.read_text().splitlines() if pattern.search(line)]
        assert not hits, (f.name, hits)
    assert pattern.search('fmt = get_format("peft")')  # the grep can fail


def test_an_option_a_format_refuses_is_refused_by_name() -> None:
    fmt = get_format("state_dict")
    refuse_unused(fmt, ["workers"])
    with pytest.raises(specmerge.SpecmergeError,
                       match=r"block_size \(--block-size\) does not apply to output format "
                             r"state_dict: the tensors are in memory"):
        refuse_unused(fmt, ["workers", "block_size"])
    assert MergeOptions().given() == []
    assert MergeOptions(workers=2, prefetch=False, block_size="1MiB").given() == [
        "block_size", "prefetch", "workers"]
    # a default value given explicitly counts as given: it is the user's choice
    assert MergeOptions(prefetch=True, shard_size="5GB").given() == ["prefetch", "shard_size"]
    assert Target(None).claim is None


def test_options_object_and_keywords_are_one_api(toy_models, tmp_path: Path) -> None:
    recipe = recipe_for(toy_models, "ties")
    a = specmerge.merge(recipe, tmp_path / "a", workers=2, block_size="64B", progress=False)
    b = specmerge.merge(recipe, tmp_path / "b",
                        MergeOptions(workers=2, block_size="64B", progress=False))
    assert tree_hash(a.out_dir) == tree_hash(b.out_dir)
    with pytest.raises(TypeError, match="not both"):
        specmerge.merge(recipe, tmp_path / "c", MergeOptions(), workers=2)
    with pytest.raises(TypeError, match="merge: .*blocksize"):
        specmerge.merge(recipe, tmp_path / "c", blocksize="1MiB")
    assert not (tmp_path / "c").exists()


def test_plan_entries_carry_their_inputs(toy_models) -> None:
    from specmerge.engine import plan_recipe
    from specmerge.plan import TensorRef

    plan = plan_recipe(recipe_for(toy_models, "ties"))
    for e in plan.entries:
        assert e.inputs == tuple(TensorRef(i, e.name) for i in range(4)) and e.same_inputs
    moved = plan.entries[0].__class__(**{**plan.entries[0].__dict__,
                                         "inputs": (TensorRef(0, "other"),)})
    assert not moved.same_inputs


def test_a_plan_with_inputs_the_sources_cannot_read_is_refused(toy_models, tmp_path: Path,
                                                               monkeypatch) -> None:
    import dataclasses

    import specmerge.engine.api as api
    from specmerge.plan import TensorRef

    real = api.build_plan

    def elsewhere(*args, **kw):  # what a slice would plan: layer 0's q_proj from layer 1's
        plan = real(*args, **kw)
        first = dataclasses.replace(plan.entries[0], inputs=(TensorRef(1, "x"),))
        return dataclasses.replace(plan, entries=(first, *plan.entries[1:]))

    monkeypatch.setattr(api, "build_plan", elsewhere)
    with pytest.raises(specmerge.SpecmergeError, match="inputs from other tensors"):
        specmerge.merge(recipe_for(toy_models), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
