"""The memory bound: its formula on a known plan, and the pre-flight refusal before any
tensor is read."""

from __future__ import annotations

import pytest
from conftest import SHAPES, recipe_for

import specmerge
from specmerge import memory
from specmerge.engine import plan_recipe
from specmerge.errors import SpecmergeError
from specmerge.sources import CheckpointSource


def test_the_estimate_follows_the_formula(toy_models) -> None:
    k, numel = 3, 16 * 8  # the largest toy tensors: embed_tokens and lm_head, 16 × 8
    for method, per_worker in [
        ("tsv_m", (k + 3) * numel * 4),  # the head's fallback, in one block, outweighs 12 × 8
        ("swudi", (k + 3) * 12 * 8 * 4 + memory.CORE_COPIES * 12 * 8 * 8),  # + the float64 core
        ("task_arithmetic", (k + 3) * numel * 4),  # one block: whole
    ]:
        plan = plan_recipe(recipe_for(toy_models, method))
        est = memory.estimate(plan, block_size=2**20, workers=2)
        assert est.per_worker == per_worker, method
        assert est.peak == 2 * per_worker + memory.BASELINE
    # row blocks: a block size below the tensor bounds it by (3K + 6) blocks, (2K + 4) without
    plan = plan_recipe(recipe_for(toy_models, "task_arithmetic"))
    assert memory.estimate(plan, block_size=64).per_worker == (3 * k + 6) * 64
    assert memory.estimate(plan, block_size=64, prefetch=False).per_worker == (2 * k + 4) * 64
    assert max(SHAPES.values(), key=lambda s: s[0] * (s[1] if len(s) > 1 else 1)) == (16, 8)


def test_a_merge_that_cannot_fit_is_refused_before_any_tensor_is_read(toy_models, tmp_path,
                                                                       monkeypatch) -> None:
    reads = []
    real = CheckpointSource.task_vectors

    def spy(self, *args, **kw):
        reads.append(args[0])
        return real(self, *args, **kw)

    monkeypatch.setattr(CheckpointSource, "task_vectors", spy)
    monkeypatch.setattr(memory, "available_memory", lambda: 100 * 2**20)
    with pytest.raises(SpecmergeError, match=r"not enough memory: this merge needs about .* "
                                             r"and 100 MiB is available"):
        specmerge.merge(recipe_for(toy_models, "tsv_m"), tmp_path / "out", progress=False)
    assert reads == [] and not (tmp_path / "out").exists()
    # close to the limit: a warning, and the merge runs
    est = memory.estimate(plan_recipe(recipe_for(toy_models, "tsv_m")),
                          block_size=2**23)
    monkeypatch.setattr(memory, "available_memory", lambda: int(est.peak / 0.9))
    specmerge.merge(recipe_for(toy_models, "tsv_m"), tmp_path / "out", progress=False)


def test_available_memory_reads_proc_meminfo() -> None:
    found = memory.available_memory()
    assert found is None or found > 0
