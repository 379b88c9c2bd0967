#!/usr/bin/env bash
# One GPU check, under 6 minutes: the gpu-marked tests (kernels, the sync-free step, the
# Inductor-compiled step, graph replay = eager), then the headline attention benchmark (eager
# and CUDA-graph replay times) and the training-step benchmark (eager, compiled and graph
# modes, the small and the paper preset). Usage: bash bench/gpu_check.sh OUT_DIR
# OUT_DIR gets device.txt, gpu_tests.log, bench.log, attention.{json,md}, train_full.{json,md},
# train_paper.{json,md}, flex/attention.json. The tile sweep is a second call:
# bash bench/gpu_tune.sh OUT_DIR.
set -uo pipefail
out=${1:-bench/results/gpu-$(date +%Y-%m-%d)}
mkdir -p "$out/flex"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$out/device.txt" 2>&1
cat "$out/device.txt"
# xdist spreads the first-call kernel compilations over the CPU cores.
timeout 150 python -m pytest -q -n 8 -p no:cacheprovider -m "gpu or not slow" \
    tests/test_kernels_triton_gpu.py tests/test_kernels_triton_interpret.py tests/test_pareto.py \
    tests/test_step.py tests/test_one_layer_step.py \
    2>&1 | tee "$out/gpu_tests.log" | tail -15
{
  timeout 70 python -m bench.bench_attention --device cuda --out "$out" --dtypes bf16 \
      --providers triton sdpa_mass reference sdpa_plain
  timeout 45 python -m bench.bench_train --device cuda --out "$out" --backends triton \
      --modes eager compiled graph
  timeout 60 python -m bench.bench_train --device cuda --out "$out" --backends triton \
      --preset paper --modes eager compiled graph --reuse
  timeout 10 python -m bench.bench_solver --device cuda
  timeout 25 python -m bench.bench_attention --device cuda --out "$out/flex" --dtypes bf16 \
      --modes causal bidir --shapes 256,2,200,32 64,2,800,32 --providers triton flex flex_per_batch
  rm -f "$out/flex/attention.md"
} > "$out/bench.log" 2>&1
cat "$out/train_full.md" "$out/train_paper.md"
tail -9 "$out/bench.log"
