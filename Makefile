# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then W6A6 PTQ4SAM of LiteMedSAM (encoder + decoder) on the bundled data, FP beside it
#   make test   set up .venv, then ruff + the test suite
PY := .venv/bin/python
DEMO_WORK ?= work_dirs/demo

.PHONY: env demo test lint fp yolox-nano bench-speed gpu-bench
env:
	bash environment.sh

ckpt/yolox_nano_coco_from_onnx.pth: tools/convert_yolox_nano_onnx.py
	$(PY) tools/convert_yolox_nano_onnx.py

yolox-nano: env ckpt/yolox_nano_coco_from_onnx.pth

demo: env
	$(PY) ptq4sam/solver/test_quant.py --config projects/configs/lite_medsam/gt-box_lite-medsam.py \
	    --q_config exp/demo/config66.yaml --quant-encoder --fp-baseline --work-dir $(DEMO_WORK)

fp: env
	$(PY) ptq4sam/solver/test_quant.py --config projects/configs/lite_medsam/gt-box_lite-medsam.py --fp --work-dir work_dirs/fp

lint: env
	.venv/bin/ruff check .

test: env ckpt/yolox_nano_coco_from_onnx.pth
	.venv/bin/ruff check .
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=10

bench-speed: env
	$(PY) tools/benchmark_speed.py --model-type lite_medsam --boxes 1 50

gpu-bench:
	bash tools/gpu_bench.sh
