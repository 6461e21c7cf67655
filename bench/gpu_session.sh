#!/usr/bin/env bash
# Every GPU-only check of the project in one call of a lent GPU machine (15 minutes of device time
# per session, so one prepared script rather than many small calls). In priority order, each step
# cut to what is left of DEADLINE seconds:
#   1. build vigface._C with CUDA (sm_90) as `pip install -e .` does, without build isolation
#   2. the tests marked cuda (cudagraph = eager images, the fused update op, the CUDA warp, nvJPEG)
#   3. bench/loader_throughput.py on the GPU (torch loader: PIL workers vs nvJPEG)
#   4. bench/fast_sampler_identity.py with the shipped toy model: DPM-Solver++ (time and logSNR
#      spacing) step counts vs DDIM-100, and the cudagraph engine's identity drift from eager
#   5. bench/denoiser_profile.py: where a ViT-B/4 forward's time goes (GEMMs, attention, the rest)
#      and bench/fp8_gelu_gemm.py: the fused fp8 MLP kernel against what it replaces, its tiles
#   6. bench/sample_throughput.py at ViT-B/4 (eager, cudagraph, Triton kernels, compile, fp8, trt)
#   7. bench/margin_softmax.py, and bench/margin_softmax_tune.py: the fused kernels' tiles tuned
#   8. the Triton kernel tests natively, bench/kernels.py
# Results land in $OUT (at most 8 files come back): logs and the JSON files for bench/results/.
#   usage: OUT=/tmp/out DEADLINE=500 bash bench/gpu_session.sh
#   STEPS=tests_cuda,profile,...  runs only the named steps (build always runs); TESTS= the pytest
#   paths of tests_cuda (default tests/), TESTS_MARK= their -m (default cuda); ENGINES= / SAMPLERS=
#   for sample_bench; FORWARDS= / PROFILED= for profile; FS_SETTINGS= for fast_sampler
#   (engine[+fast][@precision]/sampler:steps,...); KERNEL_TESTS= the pytest paths of kernel_tests.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vigface_gpu}
DEADLINE=${DEADLINE:-500}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$SECONDS
LOG="$OUT/session.log"

# step NAME LIMIT CMD...: run CMD under min(LIMIT, time left before DEADLINE - 5 s); skip it when
# under 20 s are left. Its output goes to the session log; its status to the summary.
SUMMARY=""
step() {
  local name=$1 limit=$2
  shift 2
  if [[ -n "${STEPS:-}" && ",$STEPS," != *",$name,"* ]]; then
    return
  fi
  local left=$((DEADLINE - (SECONDS - START) - 5))
  if ((left < 20)); then
    SUMMARY+="$name: skipped (no time left)"$'\n'
    return
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s, at $((SECONDS - START))s)" >>"$LOG"
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  SUMMARY+="$name: rc=$rc in $((SECONDS - t0))s"$'\n'
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, triton, torchvision; print('torch', torch.__version__, 'triton', triton.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
  nvcc --version | tail -1
} >>"$LOG" 2>&1

if [[ -z "${SKIP_BUILD:-}" ]]; then  # SKIP_BUILD=1: a dry run of this script on a CPU machine
  step build 150 env CUDAARCHS=90 VIGFACE_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -e .
fi
if ! python3 -c "import vigface" 2>/dev/null; then
  export PYTHONPATH=$PWD  # the install failed: the pure-Python package from the tree, without vigface._C
fi
python3 -c "import vigface._C as C; print('vigface._C', C.build_info, 'devices', C.cuda_device_count())" >>"$LOG" 2>&1

# VIGFACE_AUTOTUNE=0: the tests check numbers, so each Triton kernel compiles once (its pinned tile)
step tests_cuda 150 env VIGFACE_AUTOTUNE=0 python3 -m pytest -q -rs -m "${TESTS_MARK:-cuda}" -p no:cacheprovider ${TESTS:-tests/} --junitxml="$OUT/tests_cuda.xml" -s

step loader_bench 90 python3 bench/loader_throughput.py --device cuda --workers 4 16 --epochs 3 \
  --data /tmp/loader_bench --out "$OUT/loader_throughput_gpu.json"

# the compile engine in Inductor's default mode: max-autotune spent over 100 s on the toy model alone
step fast_sampler 150 env VIGFACE_COMPILE_MODE=default python3 bench/fast_sampler_identity.py --model vigface/assets/tiny_model --work /tmp/fs \
  --num-ids 50 --per-id 8 --out "$OUT/fast_sampler_identity_toy_gpu.json" \
  --settings "${FS_SETTINGS:-eager/ddim:100,cudagraph/ddim:100,eager/dpm++logsnr:15,cudagraph/dpm++logsnr:15,compile+fast@fp8/dpm++logsnr:15,eager/dpm++logsnr:10}"

step profile 170 python3 bench/denoiser_profile.py ${FORWARDS:+--forwards "$FORWARDS"} ${PROFILED:+--profile "$PROFILED"} \
  --out "$OUT/denoiser_profile_cuda.json"

# the fused fp8 GELU GEMM (pointer and TMA loads) against _scaled_mm + the GELU pass, over tiles
step fp8_gemm_bench 180 python3 bench/fp8_gelu_gemm.py --out "$OUT/fp8_gelu_gemm_cuda.json"

step sample_bench 230 python3 bench/sample_throughput.py \
  --engines "${ENGINES:-eager,compile+fast,cudagraph+fast,trt}" \
  --samplers "${SAMPLERS:-ddim:100,dpm++:20,dpm++logsnr:15}" --compile-mode default --out "$OUT/sample_throughput_cuda.json"

step margin_softmax_bench 60 python3 bench/margin_softmax.py --out "$OUT/margin_softmax_cuda.json"
# GPU_TUNING of the fused margin-softmax kernels was a first guess: tune it (ieee and tf32 dots)
step margin_softmax_tune 260 python3 bench/margin_softmax_tune.py --deadline 200 \
  --out "$OUT/margin_softmax_tune_cuda.json"

# natively the margin-softmax tests compile many tiles: the first 5 took 57-80 s on an H200
# -v: a run cut off by the deadline prints no summary (nor a junit XML); session.log then names
# each test that finished, with its outcome
step kernel_tests 300 env VIGFACE_AUTOTUNE=0 python3 -m pytest -v -p no:cacheprovider -rs --durations=5 \
  ${KERNEL_TESTS:-tests/test_kernels_attention.py tests/test_kernels_adaln.py tests/test_kernels_margin_softmax.py}
step kernels_bench 60 python3 bench/kernels.py --out "$OUT/kernels_cuda.json"

echo "=== summary (total $((SECONDS - START))s)" | tee -a "$LOG"
printf "%s" "$SUMMARY" | tee -a "$LOG"
# the reply carries the end of stdout: the tables and test outcomes, briefly
grep -E "^(engine|eager|cudagraph|compile|trt)|^floor|^(aligned|unaligned|source) |passed|failed|rror|nvJPEG|warp CUDA|^\{|^  " \
  "$LOG" | cut -c1-400 | tail -110
