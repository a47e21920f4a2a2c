#!/usr/bin/env bash
# The prepared GPU check (issue 14), one command on a machine with an NVIDIA GPU, torch (2.11+),
# transformers (5.17+), Triton and pytest; no ROS, no internet, nothing installed: the package
# runs from this checkout on PYTHONPATH (everything it imports is pure Python). In order:
#
#   1. kernels   every Triton kernel against its torch reference ON the GPU, the fused step
#                against the unfused one with teacher forcing (fp16, bf16), graph replay
#                bit-identical to eager, greedy tokens identical on builtin:tiny, device
#                preprocessing within its tolerance of the exact path
#   2. bench     the real-size architecture (random fp16 weights), 336 px frame: torch:fused,
#                torch:graph, torch:eager and stock transformers, with the copy bandwidth, the
#                decode ceiling and a short profile (torch.profiler top ops)
#   3. bench-1080p  a 1920x1080 frame, preprocessing included, on the device for torch:fused;
#                peak GPU memory of torch:fused and transformers (one child process each)
#
# Each stage has its own time limit (under 8 minutes in all) and its own log; a failed stage
# does not stop the next. Results land in $OUT (default /tmp/gpu_check): logs, summary.txt, the
# bench JSON (commit it under bench/results/), PNG plots and profile.txt.
#
#   OUT=/tmp/gpu_check bash bench/gpu_check.sh
#
# A dry run of the plumbing on a CPU (what CI cannot do for the GPU: it checks the script runs):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_CONFIG=tiny GPU_CHECK_PATHS=torch:fused,torch:eager \
#       bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
PY="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
CONFIG="${GPU_CHECK_CONFIG:-llava-phi-3b}"
PATHS="${GPU_CHECK_PATHS:-torch:fused,torch:graph,torch:eager}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="$OUT/.triton"  # a fresh kernel cache: compile times show in the logs
unset TRITON_INTERPRET
status=0

stage() {  # stage NAME SECONDS COMMAND...: run it under a limit, log it, record its exit code
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/summary.txt"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

"$PY" - > "$OUT/machine.txt" 2>&1 <<'PYEOF'
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
PYEOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version \
    --format=csv >> "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

stage kernels 100 env LLAVA_PHI_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider -rs \
    test/test_fused_step.py test/test_preprocess.py -k "not compiles"

DAY=$(date -u +%Y-%m-%d)
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())" \
      2>/dev/null || echo "$DEVICE")
stage bench 190 "$PY" -m llava_phi_ros.cli bench --config "$CONFIG" --random-weights \
    --device "$DEVICE" --dtype float16 --backend "$PATHS,transformers" \
    --new-tokens 64 --repeats 5 --warmup 2 --no-memory --ceiling \
    --json "$OUT/$GPU-$CONFIG-fp16-$DAY.json" --plot "$OUT/$GPU-$CONFIG-fp16-$DAY.png" \
    --profile "$OUT/profile.txt"

stage bench-1080p 170 "$PY" -m llava_phi_ros.cli bench --config "$CONFIG" --random-weights \
    --device "$DEVICE" --dtype float16 --backend torch:fused,transformers --image 1080p \
    --preprocess device --new-tokens 32 --repeats 5 --warmup 2 --ceiling \
    --json "$OUT/$GPU-$CONFIG-fp16-1080p-$DAY.json" \
    --plot "$OUT/$GPU-$CONFIG-fp16-1080p-$DAY.png"

rm -rf "$OUT/.triton"
echo "gpu_check: $([ $status -eq 0 ] && echo all stages passed || echo SOME STAGE FAILED)" \
    | tee -a "$OUT/summary.txt"
exit $status
