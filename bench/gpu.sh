#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one run: GPT-2 base's shape (12 x 768, 50,257-token
# vocabulary, random init), second order, 4 inner AdamW steps, batches of 1, 2 and 8 tasks.
#   bash bench/gpu.sh [OUTPUT_DIR]        (default: runs/bench-gpu)
# Each benchmark's output is kept in OUTPUT_DIR/<name>.txt. A cell that does not fit on the GPU is
# reported as OOM. Sized for under 10 minutes on one H100/H200 (each memory cell is a fresh process
# that builds the model); each benchmark is cut at BENCH_TIMEOUT seconds (default 280) so the
# first one's tables always come back.
#   1. bilevel_step: tasks/s of the fused engine against `higher` (float64 agreement checked first)
#   2. memory_modes: peak memory and s/step per memory mode against `higher`
#   3. memory_modes at scale: GPT-2 medium, large and XL shapes, every weight against LoRA (rank 16)
# MODEL=tiny DEVICE=cpu bash bench/gpu.sh /tmp/gpu-smoke runs the same commands on the tiny shape
# on a CPU in about two minutes, to check the script before a GPU is at hand.
set -uo pipefail
out="${1:-runs/bench-gpu}"
model="${MODEL:-gpt2}"
device="${DEVICE:-cuda}"
limit="${BENCH_TIMEOUT:-280}"
py="${PYTHON:-python3}"
# the shapes of benchmark 3 (the CPU smoke run with MODEL=tiny runs it on its own shape)
if [ "$model" = gpt2 ]; then scale="${SCALE_MODELS:-gpt2-medium,gpt2-large,gpt2-xl}"; else scale="${SCALE_MODELS:-$model}"; fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
cd "$(dirname "$0")/.."
if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi
timeout "$limit" "$py" bench/bilevel_step.py --models "$model" --device "$device" --orders second \
    --impls fused,higher --batch 1,2,8 --big-batch 1,2,8 --inner-steps 4 --big-inner-steps 4 \
    --repeats 3 --min-time 0 --memory none \
    2>&1 | tee "$out/bilevel_step.txt"
timeout "$limit" "$py" bench/memory_modes.py --models "$model" --device "$device" --tasks 1,2,8 --inner-steps 4 \
    --modes second-order,checkpoint,checkpoint+per-task,higher --repeats 1 \
    2>&1 | tee "$out/memory_modes.txt"
# 3. memory_modes at scale: every weight against LoRA inner loops on GPT-2 base to XL shapes (one
#    step each; the XL cells need about 10 GB with LoRA and inner.checkpoint, far more without)
timeout "$limit" "$py" bench/memory_modes.py --models "$scale" --device "$device" \
    --tasks 1 --inner-steps 4 --modes checkpoint,lora-r16,lora-r16+checkpoint --repeats 0 \
    2>&1 | tee "$out/memory_modes_scale.txt"
