# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then FP and the recommended W6A6 CPU recipe of LiteMedSAM (encoder + decoder) side by
#               side on the first DEMO_IMAGES images of the test split (DEMO_OPTIONS: extra --q-options)
#   make test   set up .venv, then ruff + the test suite (two pytest workers)
PY := .venv/bin/python
DEMO_WORK ?= work_dirs/demo
DEMO_RECIPE ?= exp/recipes/w6a6-cpu.yaml
DEMO_IMAGES ?= 24
DEMO_OPTIONS ?=
TEST_WORKERS ?= 2

.PHONY: env demo test lint fp yolox-nano bench-speed gpu-bench
env:
	bash environment.sh

ckpt/yolox_nano_coco_from_onnx.pth: tools/convert_yolox_nano_onnx.py
	$(PY) tools/convert_yolox_nano_onnx.py

yolox-nano: env ckpt/yolox_nano_coco_from_onnx.pth

demo: env
	$(PY) ptq4sam/solver/test_quant.py --config projects/configs/lite_medsam/gt-box_lite-medsam.py \
	    --q_config $(DEMO_RECIPE) $(if $(DEMO_OPTIONS),--q-options $(DEMO_OPTIONS)) --quant-encoder --fp-baseline --max-images $(DEMO_IMAGES) \
	    --work-dir $(DEMO_WORK) --show-dir $(DEMO_WORK)/show

fp: env
	$(PY) ptq4sam/solver/test_quant.py --config projects/configs/lite_medsam/gt-box_lite-medsam.py --fp --work-dir work_dirs/fp

lint: env
	.venv/bin/ruff check .

test: env ckpt/yolox_nano_coco_from_onnx.pth
	.venv/bin/ruff check .
	$(PY) -m pytest tests -q -p no:cacheprovider -n $(TEST_WORKERS) --dist worksteal --durations=10

bench-speed: env
	$(PY) tools/benchmark_speed.py --model-type lite_medsam --boxes 1 50

gpu-bench:
	bash tools/gpu_bench.sh
