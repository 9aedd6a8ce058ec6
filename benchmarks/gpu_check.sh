#!/usr/bin/env bash
# The GPU path, measured in one go (issue #13, item 5). About 6-8 minutes on an H100/H200.
#
#   make install-dev                      # once; GPU users install their CUDA torch first (README)
#   bash benchmarks/gpu_check.sh          # from the repository root
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh    # any python with a CUDA torch and
#                                         # specmerge's dependencies (pytest, safetensors, ...)
#   bash benchmarks/gpu_check.sh --dry-run    # the same steps on the CPU at tiny sizes (<1 min)
#
# Needs no network and installs nothing: the python is $PYTHON, else .venv/bin/python (made by
# `make install-dev`), else python3; src/ is put first on PYTHONPATH, so the working tree is what
# runs even where specmerge is not installed. Results go to $OUT/gpu.md if $OUT is set, else to
# ./gpu_results.md, and are printed. Scratch files (about 14 GB: 10 GB of 1B-model inputs, two 2 GB merges)
# go to $GPU_CHECK_WORK (default: a temporary directory, removed at the end).
#
# Steps:
#   (a) pytest -m cuda: every method, SVC and a quickstart merge on CUDA against the CPU (1e-4);
#   (b) per-matrix timings at Llama-7B shapes (4096×4096, 11008×4096, 4096×11008) for SVC after
#       task arithmetic, SWUDI, SWUDI-A, TSV-M and Iso-C, K = 8: median of 3 after a warm-up
#       (benchmarks/gpu_timings.py matrices; fewer runs for a cell whose warm-up is slow);
#   (c) an end-to-end SWUDI + SVC merge of a bf16 1B-class synthetic Llama with 4 experts on the
#       GPU: wall, GPU peak memory, and the I/O share (a task arithmetic merge of the same inputs
#       and a read-only pass, against the SWUDI + SVC wall);
#   (d) a projection of (b) to Llama-7B's 224 matrices.
# A failed step is reported in the Markdown and the script goes on; it exits 1 if any failed.
set -euo pipefail

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export TQDM_DISABLE=1
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"  # no spinning OpenMP threads (README, Performance)
RESULT="${OUT:+$OUT/gpu.md}"
RESULT="${RESULT:-$ROOT/gpu_results.md}"

if [[ -n "${GPU_CHECK_WORK:-}" ]]; then WORK="$GPU_CHECK_WORK"; mkdir -p "$WORK"
else WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"; trap 'rm -rf "$WORK"' EXIT
fi

if [[ $DRY_RUN == 1 ]]; then
  DEVICE=cpu; TEST_DEVICE=cpu; SCALE=32; BUDGET=10; PARAMS=1M; HIDDEN=128; DRY=(--dry-run)
else
  DEVICE=cuda; TEST_DEVICE=cuda; SCALE=1; BUDGET=150; PARAMS=1B; HIDDEN=2048; DRY=()
fi

log() { printf '\n== [%3ds] %s\n' "$SECONDS" "$*"; }

log "preflight: $PY"
if ! "$PY" - "$DEVICE" <<'EOF'
import sys
try:
    import torch, safetensors, pydantic, yaml, typer, tqdm, pytest  # noqa: F401
    import specmerge
except ImportError as err:
    sys.exit(f"missing module: {err}. Run `make install-dev` (needs the network) or set PYTHON "
             "to a python that has specmerge's dev dependencies")
print(f"specmerge from {specmerge.__file__}, torch {torch.__version__}, "
      f"CUDA available: {torch.cuda.is_available()}")
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit(f"torch {torch.__version__} sees no CUDA device (built for CUDA "
                 f"{torch.version.cuda}); run with --dry-run to rehearse on the CPU")
    print(torch.cuda.get_device_name(0))
EOF
then exit 1; fi

FAILED=()
step() {  # step NAME CMD...: run, keep going on failure
  local name="$1"; shift
  log "$name"
  if ! "$@"; then echo "!! step failed: $name" >&2; FAILED+=("$name"); fi
}

# (a) the CUDA-marked tests
run_tests() {
  SPECMERGE_TEST_DEVICE="$TEST_DEVICE" "$PY" -m pytest -o addopts="" -q -p no:cacheprovider -m cuda \
    tests/test_cuda.py 2>&1 | tee "$WORK/tests.txt"
}
step "(a) pytest -m cuda (device under test: $TEST_DEVICE)" run_tests

# (b) per-matrix timings
step "(b) per-matrix timings, dimensions / $SCALE, budget ${BUDGET}s" \
  "$PY" benchmarks/gpu_timings.py matrices --device "$DEVICE" --scale "$SCALE" \
  --budget "$BUDGET" --json "$WORK/matrices.json"

# (c) end to end: write the inputs, then merge them
e2e() {
  local start=$SECONDS
  rm -rf "$WORK/models" "$WORK/merged"
  "$PY" -m specmerge.cli example synthetic "$WORK/models" --params "$PARAMS" --hidden "$HIDDEN" \
    --experts 4 --dtype bf16
  "$PY" benchmarks/gpu_timings.py e2e "$WORK/models" "$WORK/merged" --device "$DEVICE" \
    --generate-s $((SECONDS - start)) --json "$WORK/e2e.json"
  rm -rf "$WORK/merged"
}
step "(c) end to end: $PARAMS bf16 synthetic Llama, 4 experts, SWUDI + SVC on $DEVICE" e2e

# (d) the projection, and the report
log "(d) projection to 7B and the report -> $RESULT"
report=("$PY" benchmarks/gpu_timings.py report --out "$RESULT" ${DRY[@]+"${DRY[@]}"})
[[ -s "$WORK/tests.txt" ]] && report+=(--tests "$WORK/tests.txt")
[[ -s "$WORK/e2e.json" ]] && report+=(--e2e "$WORK/e2e.json")
if [[ -s "$WORK/matrices.json" ]]; then
  "${report[@]}" --matrices "$WORK/matrices.json"
else
  FAILED+=("(d) report: no per-matrix timings")
fi
if ((${#FAILED[@]})); then
  { echo; echo "## Failed steps"; echo; printf -- '- %s\n' "${FAILED[@]}"; } | tee -a "$RESULT"
fi
log "done in ${SECONDS}s; results in $RESULT"
((${#FAILED[@]} == 0))
