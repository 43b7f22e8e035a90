#!/usr/bin/env bash
# Multi-process evaluation: bash tools/dist_test.sh CONFIG NUM_PROCS [test_quant.py args...]
set -euo pipefail
CONFIG=$1
N=$2
shift 2
PORT=${PORT:-29500}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
exec "$PY" -m torch.distributed.run --nproc_per_node="$N" --master_port="$PORT" \
    "$ROOT/ptq4sam/solver/test_quant.py" --config "$CONFIG" --launcher pytorch "$@"
