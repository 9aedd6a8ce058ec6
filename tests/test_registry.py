"""The method registry: names, and what may register under a taken one."""

from __future__ import annotations

import pytest


def test_a_taken_name_is_refused_unless_the_same_function_registers_again() -> None:
    """A module executed again (a re-import after a failed one, as in a Ray worker) registers
    its methods again: allowed for the same module and function, refused for another one."""
    from specmerge.methods import registry as reg

    def make(qualname: str):
        def fn(task_vectors, *, scaling: float = 1.0):
            return task_vectors[0] * scaling
        fn.__qualname__ = qualname
        return fn

    try:
        reg.register("zz_probe", family="elementwise", summary="s", citation="c", docs={
            "scaling": "x"})(make("probe_a"))
        reg.register("zz_probe", family="elementwise", summary="s", citation="c", docs={
            "scaling": "x"})(make("probe_a"))
        with pytest.raises(ValueError, match="registered twice"):
            reg.register("zz_probe", family="elementwise", summary="s", citation="c", docs={
                "scaling": "x"})(make("probe_b"))
    finally:
        reg._REGISTRY.pop("zz_probe", None)
