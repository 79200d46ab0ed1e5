#!/usr/bin/env bash
# One prepared command for a machine with a CUDA GPU: the GPU tests, then the kernel, layer, end-to-end and
# mixed-adapter benchmarks, all within 8 minutes; results go to benchmarks/results/ (JSON + PNG per suite, and
# gpu_check.log / gpu_check_summary.txt from this script). Installs nothing and reaches no network: it
# uses the Python environment it finds (lora_core installed, with the test and hf extras).
#
#   bash benchmarks/gpu_check.sh                 # from anywhere; PYTHON=/path/to/python to choose one
#   GPU_CHECK_RESULTS=/some/folder bash benchmarks/gpu_check.sh     # results elsewhere
#
# Each step has its own time limit (seconds, below); a step that fails or runs out of time is recorded
# in the summary and the next one still runs. Exit status: 0 when every step passed, 1 otherwise.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${GPU_CHECK_RESULTS:-$ROOT/benchmarks/results}"
PYTHON="${PYTHON:-python}"
BUDGET=480  # seconds for everything (8 minutes)
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
SUMMARY="$RESULTS/gpu_check_summary.txt"
: >"$LOG"
: >"$SUMMARY"

# Nothing from the network: pip, the Hugging Face hub and transformers stay offline.
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
unset TRITON_INTERPRET  # real kernels, not the CPU interpreter

# The benchmarks run from a scratch folder: in the repository root, the top-level kernels/ folder would
# shadow the `kernels` package transformers imports.
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT

failed=0
step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, log it, record the outcome
    local name="$1" limit="$2" start status left
    shift 2
    left=$((BUDGET - SECONDS))
    if ((left <= 10)); then
        echo "$name: SKIPPED (out of the ${BUDGET} s budget)" | tee -a "$SUMMARY"
        failed=1
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    status=$?
    if ((status == 0)); then
        echo "$name: ok in $((SECONDS - start)) s" | tee -a "$SUMMARY"
    else
        ((status == 124)) && status="timed out"
        echo "$name: FAILED ($status) after $((SECONDS - start)) s; see gpu_check.log" | tee -a "$SUMMARY"
        failed=1
    fi
}

"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "no CUDA device visible to $PYTHON: nothing to do" | tee -a "$SUMMARY"
    exit 2
}
"$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(), torch.__version__)' | tee -a "$SUMMARY"

# 1. GPU tests: bf16 and large shapes, bit-exactness with FMA contraction possible (about 1 minute)
step "pytest -m gpu" 110 bash -c "cd '$SCRATCH' && '$PYTHON' -m pytest -c '$ROOT/pyproject.toml' \
    --rootdir '$ROOT' -q -p no:cacheprovider -m gpu '$ROOT/tests'"

# 2. Kernels vs cuBLAS bf16 and bitsandbytes: the shapes and M of issue 16's targets
step "bench kernels" 130 bash -c "cd '$SCRATCH' && '$PYTHON' -m lora_core.cli bench kernels \
    --shapes 8192x8192 28672x8192 --m 1 16 64 4096 --out '$RESULTS'"

# 3. One LoRA / QLoRA / DoRA layer vs the frozen linear and PEFT
step "bench layer" 50 bash -c "cd '$SCRATCH' && '$PYTHON' -m lora_core.cli bench layer \
    --shapes 4096x4096 --m 4096 --dropout 0.0 --out '$RESULTS'"

# 4. End-to-end QLoRA / LoRA training steps vs PEFT + bitsandbytes (random-weight Llama, no download)
step "bench e2e" 130 bash -c "cd '$SCRATCH' && '$PYTHON' -m lora_core.cli bench e2e \
    --steps 5 --warmup 2 --out '$RESULTS'"

# 5. Mixed-adapter batches: 8 adapters, one per row, vs one adapter for the batch and PEFT's adapter_names
step "bench mixed" 50 bash -c "cd '$SCRATCH' && '$PYTHON' -m lora_core.cli bench mixed --size full \
    --out '$RESULTS'"

echo "total $SECONDS s of ${BUDGET} s" | tee -a "$SUMMARY"
exit "$failed"
