#!/usr/bin/env bash
# One GPU check, under 6 minutes: the gpu-marked tests, then the headline attention benchmarks.
# Usage: bash bench/gpu_check.sh OUT_DIR      (writes logs, JSON and Markdown into OUT_DIR)
set -uo pipefail
out=${1:-bench/results/gpu-$(date +%Y-%m-%d)}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/device.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/device.txt"
cat "$out/device.txt"
# xdist spreads the first-call kernel compilations over the CPU cores.
timeout 200 python -m pytest -m gpu -q -n 8 -p no:cacheprovider tests/test_kernels_triton_gpu.py tests/test_pareto.py 2>&1 | tee "$out/gpu_tests.log" | tail -25
timeout 150 python -m bench.bench_attention --device cuda --out "$out" --dtypes bf16 fp32 \
    --providers triton sdpa_mass reference sdpa_plain > "$out/attention.log" 2>&1
tail -5 "$out/attention.log"
mkdir -p "$out/flex"
timeout 60 python -m bench.bench_attention --device cuda --out "$out/flex" --dtypes bf16 \
    --modes causal bidir --shapes 256,2,200,32 64,2,800,32 --providers triton flex > "$out/flex.log" 2>&1
tail -12 "$out/flex.log"
