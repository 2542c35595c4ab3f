#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one run: GPT-2 base's shape (12 x 768, 50,257-token
# vocabulary, random init), second order, 4 inner AdamW steps.
#   bash bench/gpu.sh [OUTPUT_DIR]        (default: runs/bench-gpu)
# Each benchmark's output is kept in OUTPUT_DIR/<name>.txt. A cell that does not fit on the GPU is
# reported as OOM. Sized for about 10 minutes on one H100/H200 (each cell is a fresh process that
# builds the model); each benchmark is cut at BENCH_TIMEOUT seconds (default 300) so the first
# one's tables always come back.
set -uo pipefail
out="${1:-runs/bench-gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
limit="${BENCH_TIMEOUT:-300}"
timeout "$limit" "$py" bench/memory_modes.py --models gpt2 --device cuda --tasks 1,8 --inner-steps 4 \
    --modes second-order,checkpoint,checkpoint+per-task,first-order,higher --repeats 1 \
    2>&1 | tee "$out/memory_modes.txt"
timeout "$limit" "$py" bench/bilevel_step.py --models gpt2 --device cuda --orders second,first --impls batched,looped,higher,torchopt \
    --big-batch 1,2 --big-inner-steps 4 --repeats 3 --min-time 0 --memory none \
    2>&1 | tee "$out/bilevel_step.txt"
