"""specmerge: data-free model merging with spectral methods, streaming over safetensors.

Python API::

    import specmerge
    result = specmerge.merge("recipe.yaml", "out/merged")           # streaming, HF output
    merged = specmerge.merge_state_dicts(recipe_dict, base_sd, [sd1, sd2])  # in memory
"""

__version__ = "0.1.0"

from specmerge.engine import MergeResult, merge, merge_state_dicts  # noqa: E402
from specmerge.errors import SpecmergeError  # noqa: E402
from specmerge.recipe import Recipe, load_recipe  # noqa: E402

__all__ = ["MergeResult", "Recipe", "SpecmergeError", "__version__", "load_recipe", "merge",
           "merge_state_dicts"]
