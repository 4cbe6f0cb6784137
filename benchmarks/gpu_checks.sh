#!/usr/bin/env bash
# The GPU checks of issues 10 §6 and 14 §4 in one run on a CUDA machine, each step under its own time limit so that
# one failure leaves the others' results:
#   1. the CUDA paths of the tests: ATS (ragged padded executor, static Top-K, the batch-1 route, ATS on FAN) and
#      ToMe on the GPU against the CPU, fp32 and bf16 autocast (tests/test_token_reduction_devices.py), and the 19
#      corruptions on the GPU against the CPU (tests/test_corruptions.py::test_cuda_matches_cpu);
#   2. FAN against the released code, each in its own process, bf16 autocast, batch 8 and 64 (fp32 batch 8 for the
#      max |Δlogit| of the two on the GPU);
#   3. benchmarks/token_reduction.py speed on timm deit_small_patch16_224 in fp32 and in bf16 autocast, with the
#      released ToMe beside ravit's, and benchmarks/ats_speed.py (the paper's placement, fixed K and adaptive).
#
#   benchmarks/gpu_checks.sh OUT FAN_SRC TOME_SRC TIMM054
#
# OUT: folder for the JSON results and logs; FAN_SRC: a folder holding the released FAN code's models/ package;
# TOME_SRC: a clone of facebookresearch/ToMe; TIMM054: a folder holding timm 0.5.4 (pip install --target).
# PYTHON (default python) must import ravit and a CUDA torch. Nothing in ravit depends on this script. About 12
# minutes in all on one H200 (the first run, with shorter limits, spent 300 s on two FAN steps that ran out of time).
set -u
if [ $# -ne 4 ]; then
    echo "usage: $0 OUT FAN_SRC TOME_SRC TIMM054" >&2
    exit 2
fi
out=$1 fan=$2 tome=$3 timm054=$4
py=${PYTHON:-python}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, log its output, note a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%T), limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v -e "it/s]" -e "s/it]"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc $rc, $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$py -c "import torch, timm, ravit; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)"

step tests 240 $py -m pytest -q -p no:cacheprovider tests/test_token_reduction_devices.py \
    tests/test_corruptions.py::test_cuda_matches_cpu
# Each side's process takes ~11 s to start on an H200 machine here (torch + CUDA initialisation), so two models at two
# pairs are 10 processes, ~2 minutes per batch size.
for batch in 8 64; do
    step "fan_bf16_b$batch" 200 $py benchmarks/fan_speed.py --official-src "$fan" --official-timm "$timm054" \
        --device cuda --amp --batch-size "$batch" --iters 20 --pairs 2 --json "$out/fan_bf16_b$batch.json"
done
for precision in fp32 bf16; do
    amp=()
    [ "$precision" = bf16 ] && amp=(--amp)
    step "token_reduction_$precision" 150 $py benchmarks/token_reduction.py speed --device cuda "${amp[@]}" \
        --batch 1 64 256 --runs 10 --tome-src "$tome" --no-progress \
        --methods tome ats ats-topk ats-topk-fused-r6 ats-topk-fused-r6-alt --json "$out/token_reduction_$precision.json"
done
step fan_fp32_b8 120 $py benchmarks/fan_speed.py --official-src "$fan" --official-timm "$timm054" \
    --device cuda --batch-size 8 --iters 20 --pairs 1 --json "$out/fan_fp32_b8.json"
step ats_speed_bf16 100 $py benchmarks/ats_speed.py --device cuda --amp --batch-sizes 1 64 \
    --json "$out/ats_speed_bf16.json"
exit $failed
