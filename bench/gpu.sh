#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one run: GPT-2 base's shape (12 x 768, 50,257-token
# vocabulary, random init), second order, 4 inner AdamW steps.
#   bash bench/gpu.sh [OUTPUT_DIR]        (default: runs/bench-gpu)
# Each benchmark's output is kept in OUTPUT_DIR/<name>.txt. Needs a CUDA GPU with >= 80 GB to run
# every cell; a cell that does not fit is reported as OOM.
set -uo pipefail
out="${1:-runs/bench-gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" bench/memory_modes.py --models gpt2 --device cuda --tasks 1,8 --inner-steps 4 \
    --modes second-order,checkpoint,checkpoint+per-task,bf16,first-order,higher --repeats 3 \
    2>&1 | tee "$out/memory_modes.txt"
"$py" bench/bilevel_step.py --models gpt2 --device cuda --orders second,first --impls batched,looped,higher,torchopt \
    --big-batch 1,2 --big-inner-steps 4 --repeats 3 --min-time 0 --memory none \
    2>&1 | tee "$out/bilevel_step.txt"
