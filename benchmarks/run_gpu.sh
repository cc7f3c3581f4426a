#!/usr/bin/env bash
# One call on a lent GPU machine (nothing persists, no package index): build the extension
# from source, run the tests with CUDA, then `verify` and `bench`. Logs and results go to
# $OUT (default ./gpu-out), at most 8 files. Budget: ten minutes in all.
#   usage: bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
status=0

{
  echo "== $(date -u) on $(hostname)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "== build"
  $PY -m pip install --no-build-isolation --no-deps -e . || $PY setup.py build_ext --inplace || status=1
  echo "== info"; $PY -m bam_fused.cli info
} > "$OUT/setup.log" 2>&1

timeout 240 $PY -m pytest -q -m "not slow" -p no:cacheprovider --continue-on-collection-errors tests > "$OUT/tests.log" 2>&1 || status=1
timeout 100 $PY -m bam_fused.cli verify > "$OUT/verify.log" 2>&1 || status=1
# --quick: compiling every reference graph with Inductor for the full sweep does not fit ten
# minutes; run the full `bam-fused bench --out DIR` when a longer session allows.
timeout 150 $PY -m bam_fused.cli bench --quick --no-progress --out "$OUT" > "$OUT/bench.log" 2>&1 || status=1
tail -n 3 "$OUT"/tests.log "$OUT"/verify.log
exit $status
