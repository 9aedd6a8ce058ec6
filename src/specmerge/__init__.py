"""specmerge: data-free model merging with spectral methods, streaming over safetensors.

Python API::

    import specmerge
    result = specmerge.merge("recipe.yaml", "out/merged")           # streaming, HF output
    merged = specmerge.merge_state_dicts(recipe_dict, base_sd, [sd1, sd2])  # in memory
"""

import os
import sys

from specmerge._version import __version__

# MKL's LAPACK (eigh, svd) slows down 100-200x when it follows torch's own parallel ops while
# OpenMP threads spin-wait (measured on a 2-core box: eigh of a 768x768 matrix 11 s instead of
# 0.05 s). A passive wait policy removes it and costs nothing measurable elsewhere. It only takes
# effect before torch starts OpenMP, so it is a default that an explicit setting overrides.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from specmerge.engine import MergeResult, merge, merge_state_dicts  # noqa: E402
from specmerge.errors import SpecmergeError  # noqa: E402
from specmerge.recipe import Recipe, load_recipe  # noqa: E402

__all__ = ["MergeResult", "Recipe", "SpecmergeError", "__version__", "load_recipe", "merge",
           "merge_state_dicts"]
