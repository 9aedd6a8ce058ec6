"""The engine: run a plan from a source, through a backend, into an output format's sink.

    Source ──index──► Plan ──► format.entries ──► [statistics: rounds of map/reduce]
                           ──► Backend.map(format.step, entries, source) ──► format.sink.put

Its files are the pipeline's stages:

- ``api``: ``merge``, ``merge_state_dicts``, ``plan_recipe``, ``MergeOptions`` and ``run``, the
  one pipeline they all go through;
- ``steps``: ``MergeStep``, one parameter merged whole or in row blocks written into place;
- ``statistics``: the statistics pre-pass (whole-model and per-tensor statistics);
- ``update``: the maths of one parameter (method, calibration, cast to the output dtype);
- ``execute``: a step through a backend into a sink, with SIGTERM as a clean-up; ``Sink``;
- ``runtime``: device, backend, option sizes and memory meters.

It knows no method and no output format by name: each plan entry names its function
(``specmerge.methods``), and each format is a row of ``specmerge.formats``.
"""

from specmerge.engine.api import (
    MergeOptions,
    MergeResult,
    merge,
    merge_state_dicts,
    plan_of,
    plan_recipe,
    run,
)
from specmerge.engine.execute import Sink, execute
from specmerge.engine.runtime import make_backend, resolve_device
from specmerge.engine.statistics import DEFAULT_BLOCK_SIZE, run_statistics
from specmerge.engine.steps import MergeStep
from specmerge.engine.update import matrix_apply, merged_update, run_method, to_output

__all__ = ["DEFAULT_BLOCK_SIZE", "MergeOptions", "MergeResult", "MergeStep", "Sink", "execute",
           "make_backend", "matrix_apply", "merge", "merge_state_dicts", "merged_update",
           "plan_of", "plan_recipe", "resolve_device", "run", "run_method", "run_statistics",
           "to_output"]
