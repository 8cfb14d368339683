#!/usr/bin/env bash
# The GPU check (issue 13), run once on a lent GPU machine from the repository root:
#   OUT=/some/dir bash tools/gpu_check.sh [budget_seconds]
# Stages, in order of what matters most if time runs out: the environment; the build (pip, in place
# for that machine's Python and torch, CUDA for sm_90); the CUDA tests; the CUDA benchmark against
# cuBLAS / torch; `lepton train` on the GPU (NCCL) and on the CPU of the same machine; the CUDA tests
# under compute-sanitizer memcheck and racecheck (a short subset: the sanitizer is slow); one ncu
# profile of our GEMM and quantize kernels. Every stage has its own time limit, cut to what is left of
# the budget, so a hang in one still returns the others' logs. Logs go to $OUT (at most 8 files come
# back): env.log build.log tests.log bench.log train.log sanitizer.log ncu.log summary.txt.
# Environment knobs: GPU_CHECK_STAGES (default "env build tests bench train memcheck racecheck ncu"),
# GPU_CHECK_TESTS (extra pytest files, e.g. tests/test_cuda_qlinear.py).
set -u
budget=${1:-420}
start=$(date +%s)
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
stages=${GPU_CHECK_STAGES:-"env build tests bench train memcheck racecheck ncu"}
py=${PYTHON:-python3}
summary=$OUT/summary.txt
: >"$summary"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Tests and benchmarks import the installed package, never the source tree (which has no _C): run
# them from a scratch directory, with pytest's configuration and rootdir taken from the repository.
work=$(mktemp -d)
tests_cuda="tests/test_cuda.py ${GPU_CHECK_TESTS:-}"

left() { echo $((budget - ($(date +%s) - start))); }
# run_stage NAME LIMIT LOG CMD...: runs CMD with min(LIMIT, time left - 5 s), appends to LOG, records
# the exit code and the seconds in summary.txt.
run_stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  case " $stages " in *" $name "*) ;; *) return 0 ;; esac
  local rest=$(($(left) - 5))
  if ((rest < 20)); then
    echo "$name: skipped (budget spent)" | tee -a "$summary"
    return 0
  fi
  ((limit > rest)) && limit=$rest
  local t0=$(date +%s)
  echo "===== $name (limit ${limit}s) $(date -u +%T) =====" >>"$log"
  timeout -k 10 "$limit" bash -c '"$@"' stage "$@" >>"$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $(($(date +%s) - t0))s (limit ${limit}s)$( ((rc == 124)) && echo ' TIMED OUT')" | tee -a "$summary"
  return $rc
}

stage_env() {
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  nvcc --version
  "$py" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
  "$py" -m pip list 2>/dev/null | grep -i -E "^(scikit-build-core|pybind11|cmake|ninja|numpy|pytest|pytest-timeout|torch) "
  which compute-sanitizer ncu cuobjdump || true
  lscpu | head -20
}

stage_build() {
  "$py" -m pip install -v --no-build-isolation --no-deps . \
    -C cmake.define.LEPTON_CUDA=ON -C cmake.define.LEPTON_CUDA_ARCHS=90 -C build-dir=build/gpu
  cd "$work" && "$py" -c "import lepton_core as lc, json; print(lc.__file__); print(json.dumps(lc.info(), indent=1, default=str))"
}

pytest_in_work() {  # pytest from the scratch directory against the repository's tests
  (cd "$work" && "$py" -m pytest -c "$repo/pyproject.toml" --rootdir "$repo" -p no:cacheprovider "$@")
}

stage_tests() {
  pytest_in_work -q --timeout 120 -W default $(for f in $tests_cuda; do echo "$repo/$f"; done)
}

stage_bench() {
  (cd "$work" && "$py" -m lepton_core.benchmarks.cuda --quick)
}

stage_train() {
  # The main job on the GPU (one process: NCCL; the trainer picks cuda when the backend is usable),
  # then the same default run on this machine's CPU, for the accuracy comparison.
  (cd "$work" && "$py" -m lepton_core train --nproc 1 --no-progress --checkpoint-dir "$work/run_gpu" &&
     tail -n 2 "$work/run_gpu/metrics.jsonl")
  (cd "$work" && CUDA_VISIBLE_DEVICES= "$py" -m lepton_core train --nproc 1 --threads 8 --no-progress \
     --checkpoint-dir "$work/run_cpu" && tail -n 2 "$work/run_cpu/metrics.jsonl")
}

# Short subsets for the sanitizer (it is slow): memcheck runs small shapes of every kernel (float and
# int8 GEMM in every tile config, scaled_gemm, quantize / dequantize in every format, stochastic
# rounding, QuantLinear's kernels and its split-K reduction); racecheck, the kernels that use shared
# memory, on shapes with edges in every dimension. PyTorch's caching allocator is off so that each
# tensor is its own allocation and an overrun is seen.
MEM_K="test_gemm_float and 7 or test_gemm_int8_exact or test_gemm_into_direct or test_scaled_gemm or test_gemm_bias or test_gemm_wide or test_quantize_gpu_equals or test_dequantize_gpu or test_quantize_gpu_stochastic or test_quantize_gpu_extreme or test_quantize_gpu_reports"
MEM_Q="test_matches_cpu_and_reference or test_views or test_deterministic or test_empty_k"
RACE_K="test_gemm_float and 129-257-65 and nt or test_gemm_float and 257-31-1000 and tn and None or test_gemm_int8_exact and 129-257-65 or test_quantize_gpu_equals and int8"
RACE_Q="test_matches_cpu_and_reference and (7-1101 or 1-1101 or 33-300) and (w8-128 or w4-32)"
stage_sanitizer() {  # $1 = memcheck | racecheck
  local k_cuda=$MEM_K k_q=$MEM_Q
  [[ $1 == racecheck ]] && k_cuda=$RACE_K k_q=$RACE_Q
  local files=("$repo/tests/test_cuda.py") ks=("$k_cuda")
  [[ -f $repo/tests/test_cuda_qlinear.py ]] && files+=("$repo/tests/test_cuda_qlinear.py") ks+=("$k_q")
  local rc=0 i
  for i in "${!files[@]}"; do
    (cd "$work" && PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$1" --error-exitcode 99 \
       --print-limit 20 "$py" -m pytest -c "$repo/pyproject.toml" --rootdir "$repo" -p no:cacheprovider -q \
       --timeout 600 -W default "${files[$i]}" -k "${ks[$i]}") || rc=$?
  done
  return $rc
}

stage_ncu() {
  (cd "$work" && ncu --clock-control none --target-processes all -k "regex:gemm_tc|quant_blockwise|dequant|qlinear" \
     --launch-skip 7 --launch-count 7 --section SpeedOfLight --section Occupancy --section LaunchStats \
     --section MemoryWorkloadAnalysis "$py" "$repo/tools/gpu_profile.py")
}

export -f stage_env stage_build pytest_in_work stage_tests stage_bench stage_train stage_sanitizer stage_ncu
export py repo work tests_cuda MEM_K MEM_Q RACE_K RACE_Q
run_stage env 30 "$OUT/env.log" stage_env
if ! run_stage build 240 "$OUT/build.log" stage_build; then
  echo "build failed: see build.log" | tee -a "$summary"
  tail -n 60 "$OUT/build.log"
  cat "$summary"
  exit 1
fi
run_stage tests 150 "$OUT/tests.log" stage_tests
run_stage bench 120 "$OUT/bench.log" stage_bench
run_stage train 120 "$OUT/train.log" stage_train
run_stage memcheck 90 "$OUT/sanitizer.log" stage_sanitizer memcheck
run_stage racecheck 60 "$OUT/sanitizer.log" stage_sanitizer racecheck
run_stage ncu 45 "$OUT/ncu.log" stage_ncu
# The short report (the reply carries the end of the output); a stage that did not run says so.
report() {  # report TITLE LOG COMMAND...: COMMAND reads LOG on stdin
  local title=$1 log=$2
  shift 2
  echo "----- $title -----"
  if [[ -f $log ]]; then "$@" <"$log"; else echo "(not run)"; fi
}
report "test summary" "$OUT/tests.log" bash -c 'grep -E "passed|failed|error" | tail -n 3'
report "test failures" "$OUT/tests.log" bash -c 'grep -E "^(FAILED|ERROR)" | head -n 30'
report sanitizer "$OUT/sanitizer.log" bash -c 'grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|========= (Invalid|Race|Error)" | head -n 20'
report bench "$OUT/bench.log" bash -c "sed -n '/copy .* GB\\/s/,\$p' | tail -n 40"
report train "$OUT/train.log" bash -c 'grep -E "accuracy|final|error|Error" | tail -n 8'
echo "----- stages -----"
cat "$summary"
