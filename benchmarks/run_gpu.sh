#!/usr/bin/env bash
# One call on a lent GPU machine (nothing persists, no package index): build the extension
# from source, run the GPU tests, benchmark, verify, compute-sanitizer, the eval paths side by
# side, profile, then the rest of the tests. Each step gets a time box inside one ten-minute
# budget (BUDGET_S); steps run in the order given, by default most important first (on the H200
# of 2026-11-29: build 93 s with info and errors, cuda-tests 165, bench 140, verify 55, sanitize
# 55, profile 45, passes 78, overhead 14; gate, with 9 tiles a row, not yet run).
# Logs and results go to $OUT (default ./gpu-out), at most 8 files.
#   usage: bash benchmarks/run_gpu.sh [STEP ...]   (steps: build cuda-tests bench verify sanitize
#                                                    passes profile overhead gate tests; default
#                                                    all but overhead and gate)
#   RACECHECK=1 adds the (inconclusive, 90 s) racecheck pass to the sanitize step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
END=$((SECONDS + ${BUDGET_S:-570}))
STEPS=${*:-build cuda-tests bench verify sanitize passes profile tests}
status=0

# box [--soft] SECONDS LOG CMD...: runs CMD for at most SECONDS (less if the budget is nearly
# spent); a failure fails the script unless --soft.
box() {
  local soft=0; [[ $1 == --soft ]] && { soft=1; shift; }
  local limit=$1 log=$2; shift 2
  local left=$((END - SECONDS - 5))
  ((left < limit)) && limit=$left
  if ((limit < 20)); then echo "== skipped (budget spent): $*" >> "$log"; status=1; return; fi
  echo "== $* (up to ${limit}s)" >> "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" >> "$log" 2>&1 || { echo "== exit $? after $((SECONDS - t0))s" >> "$log"; ((soft)) || status=1; }
  echo "== took $((SECONDS - t0))s" >> "$log"
}

step_build() {
  {
    echo "== $(date -u) on $(hostname)"; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  } >> "$OUT/checks.log" 2>&1
  box 240 "$OUT/checks.log" $PY -m pip install -q --no-build-isolation --no-deps -e .
  box 30 "$OUT/checks.log" $PY -m bam_fused.cli info
  box 60 "$OUT/checks.log" $PY benchmarks/gpu_probe.py errors
}
step_cuda-tests() {
  box 220 "$OUT/tests.log" $PY -m pytest -q -n 8 -p no:cacheprovider -rfE tests/test_cuda.py tests/test_pass_triton.py \
    "tests/test_threads.py::test_shared_cuda_eval_modules_and_gates_in_threads"
}
step_passes() { box 130 "$OUT/profile.log" $PY benchmarks/gpu_probe.py passes; }
step_bench() { box 200 "$OUT/bench.log" $PY -m bam_fused.cli bench --quick --no-progress --out "$OUT"; }
step_sanitize() {
  # memcheck on every kernel must be clean.
  local san="env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --error-exitcode 9"
  box 100 "$OUT/checks.log" $san --tool memcheck $PY benchmarks/gpu_probe.py sanitize
  # racecheck: on the H100 run of 2026-11-25 it reported Triton's same-value writes
  # (triton-lang/triton#4736, #7264) and, with --kernel-name filters, failed with "Internal
  # Sanitizer Error"; it is logged for reading, not failed.
  [[ ${RACECHECK:-0} == 1 ]] &&
    box --soft 90 "$OUT/checks.log" $san --tool racecheck --print-limit 5 $PY benchmarks/gpu_probe.py sanitize
  return 0
}
step_verify() { box 100 "$OUT/checks.log" $PY -m bam_fused.cli verify --quick; }
step_profile() { box 100 "$OUT/profile.log" $PY benchmarks/gpu_probe.py profile; }
step_overhead() { box --soft 60 "$OUT/profile.log" $PY benchmarks/gpu_probe.py overhead; }
step_gate() { box --soft 210 "$OUT/profile.log" $PY benchmarks/gpu_probe.py gate; }
# -v: xdist prints each failure as it happens, so a time-boxed run still names them.
step_tests() {
  box --soft 300 "$OUT/tests.log" $PY -m pytest -v -n 8 -p no:cacheprovider -rfE -m "not slow" \
    --ignore=tests/test_cuda.py --ignore=tests/test_pass_triton.py tests
}

for step in $STEPS; do
  if declare -F "step_$step" > /dev/null; then "step_$step"; else echo "unknown step: $step" >&2; exit 2; fi
done
tail -n 4 "$OUT"/*.log
exit $status
