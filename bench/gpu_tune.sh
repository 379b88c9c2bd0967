#!/usr/bin/env bash
# The tile sweep on a GPU, under 3 minutes (a second device call after bench/gpu_check.sh):
# bf16, D 32 (the paper preset's and the small preset's head width), L 50 / 200 / 800,
# bidirectional and causal. Usage: bash bench/gpu_tune.sh OUT_DIR
# OUT_DIR gets tiles.{json,md}: every candidate's time and ratio to the untuned rule, and the
# kernels.attention.tiles.TUNED entries the measurements support (copy them in by hand, then rerun
# bench/gpu_check.sh, which also compile-checks them in CI's test).
set -uo pipefail
out=${1:-bench/results/gpu-$(date +%Y-%m-%d)}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout 170 python -m bench.tune_tiles --device cuda --out "$out" --dtype bf16 --head-dims 32 \
    > "$out/tune.log" 2>&1
tail -12 "$out/tiles.md"
