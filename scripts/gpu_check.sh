#!/usr/bin/env bash
# Issue 31's checks on a lent GPU machine, in one run of about 10 minutes (device tool: `bash scripts/gpu_check.sh`;
# its image has torch, numpy, tifffile, scikit-image, safetensors and pytest; results land in $OUT).
#   1. predict() Mpx/s per level, host vs device pipeline vs the network alone (32 x 512^2, 4 x 2048^2, fp16);
#   2. the memory table after predict, fine-tuning and a cancel, and fine-tuning steps in bf16 / fp16 / fp32;
#   3. live training on CUDA from a fresh network (first snapshot, steps per second);
#   4. the core tests and the Qt-free controller tests on the GPU (the CUDA-only ones run there).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}" NAPARI_UNETPP_HOME=/tmp/unetpp-home
nvidia-smi -L | tee "$OUT/gpu.txt"
timeout 200 python3 benchmarks/bench_device.py --json "$OUT/bench_device.json" 2>&1 | tee "$OUT/bench_device.log"
timeout 150 python3 benchmarks/bench_gpu.py --sections memory steps --json "$OUT/bench_gpu.json" 2>&1 |
  tee "$OUT/bench_gpu.log"
timeout 100 python3 benchmarks/bench_live.py --shifts nuclei-to-em --starts fresh --seconds 45 --skip-next \
  --json "$OUT/bench_live.json" 2>&1 | tee "$OUT/bench_live.log"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_on_device.py tests/test_prediction.py \
  tests/test_tiling.py tests/test_recipe.py tests/test_segment_controller.py 2>&1 | tee "$OUT/pytest_gpu.log"
