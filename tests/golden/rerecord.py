"""Re-record the golden hashes of the cases of one method only, checking that nothing else moved.

For an intended change of one method's bytes (explained in the commit), e.g. DARE's counter-based
masks (issue #13)::

    PYTHONPATH=src python tests/golden/rerecord.py dare

It re-runs ``test_golden.run_case`` (one torch thread, as the test) for every case whose method
is the one named, asserts that only ``.safetensors`` files changed, and rewrites those entries
of ``hashes.json``; every other entry is left as it is.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import test_golden as G  # noqa: E402

log = logging.getLogger("rerecord")


def main(method: str) -> None:
    torch.set_num_threads(1)
    golden = json.loads(G.GOLDEN.read_text())
    changed = 0
    with tempfile.TemporaryDirectory() as d:
        root = Path(d).resolve()
        G.make_models(root)
        for key in G._case_ids():
            model, rest = key.split("-", 1)
            rest, w = rest.rsplit("-w", 1)
            case = next(c for c in G.CASES if c[0] == rest.removesuffix("+svc"))
            if case[1] != method:
                continue
            new = G.run_case(root, model, case, rest.endswith("+svc"), int(w))
            old = golden[key]
            if set(new) != set(old):
                raise SystemExit(f"{key}: the output files changed: {sorted(set(new) ^ set(old))}")
            moved = [f for f in new if new[f] != old[f]]
            bad = [f for f in moved if not f.endswith(".safetensors")]
            if bad:
                raise SystemExit(f"{key}: non-weight files changed: {bad}")
            log.info("%s: %d weight file(s) changed", key, len(moved))
            changed += bool(moved)
            golden[key] = new
    G.GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    log.info("rewrote %d of %d entries of %s", changed, len(golden), G.GOLDEN)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(sys.argv) != 2:
        raise SystemExit("usage: rerecord.py METHOD")
    main(sys.argv[1])
